"""Neural collapse of a timm network, layer by layer, with nctools.measure_model.

    python examples/timm_layers.py                     # 2,000 images
    NCTOOLS_EXAMPLES_TINY=1 python examples/timm_layers.py    # 200 images (CI)

`timm.create_model(..., pretrained=True)` and a real DataLoader are what you would use;
here the network keeps its random weights and the images are synthetic, so nothing is
downloaded. The classifier's name (`fc`) stands for its input, the penultimate features,
which get every metric; the other layers' outputs are average-pooled and get the
classifier-free metrics.
"""

import os

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import nctools

TINY = os.environ.get("NCTOOLS_EXAMPLES_TINY") == "1"
N = 200 if TINY else 2000

torch.manual_seed(0)
model = timm.create_model("resnet18", pretrained=False, num_classes=4)
labels = torch.arange(N) % 4
images = 0.5 * labels[:, None, None, None] + torch.randn(N, 3, 32, 32)
loader = DataLoader(TensorDataset(images, labels), batch_size=100)

result = nctools.measure_model(model, loader, layers=["layer1", "layer2", "layer3", "fc"])
for layer, metrics in result.items():
    print(f"{layer:8} nc1 {metrics['nc1']:10.4f}  ncc_accuracy {metrics['ncc_accuracy']:.3f}")
print("fc keys include ncc_mismatch:", "ncc_mismatch" in result["fc"])
