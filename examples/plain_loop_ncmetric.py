"""Neural collapse in a plain PyTorch training loop, with the torchmetrics metric NCMetric.

    python examples/plain_loop_ncmetric.py             # 60 epochs, seconds on a CPU
    NCTOOLS_EXAMPLES_TINY=1 python examples/plain_loop_ncmetric.py   # 3 epochs (CI)

`NCMetric` is a `torchmetrics.Metric`: update it with each batch's penultimate features and
labels, compute at the epoch's end. `keep_features=True` adds the NC4 keys (the features are
kept so the nearest-class-centre rule can be applied with the final class means).
"""

import os
import warnings

import torch
from torch import nn

import nctools

TINY = os.environ.get("NCTOOLS_EXAMPLES_TINY") == "1"
EPOCHS = 3 if TINY else 60

torch.manual_seed(0)
centres = torch.randn(5, 10) * 2
labels = torch.arange(1000) % 5
inputs = centres[labels] + torch.randn(1000, 10)

body = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
head = nn.Linear(32, 5)  # the classifier W (5, 32), b (5,)
optimizer = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.05,
                            momentum=0.9, weight_decay=5e-4)
# the classifier is read at compute(), so the metric always sees the current head
metric = nctools.NCMetric(num_classes=5, classifier=head, keep_features=True)
# a metric of an inner layer, without a classifier, needs the feature width: dim=
inner = nctools.NCMetric(num_classes=5, dim=64)
# its classifier metrics are NaN by design; nctools says so once per compute()
warnings.filterwarnings("ignore", message="NCMetric: (no classifier|keep_features=False)")

for epoch in range(1, EPOCHS + 1):
    body.train()
    for xb, yb in zip(inputs.split(50), labels.split(50), strict=True):
        loss = nn.functional.cross_entropy(head(body(xb)), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    body.eval()
    with torch.no_grad():  # measure the training set as the network now classifies it
        for xb, yb in zip(inputs.split(200), labels.split(200), strict=True):
            metric.update(body(xb), yb)
            inner.update(body[1](body[0](xb)), yb)
    values = metric.compute()
    print(f"epoch {epoch} nc1 {values['nc1']:.4f} ncc_mismatch {values['ncc_mismatch']:.3f} "
          f"accuracy {values['accuracy']:.3f} inner nc1 {inner.compute()['nc1']:.4f}")
    metric.reset()
    inner.reset()
