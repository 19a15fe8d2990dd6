"""Neural collapse inside a PyTorch Lightning training, left as an nctools run folder.

    python examples/lightning_callback.py            # 40 epochs, about a minute on a CPU
    NCTOOLS_EXAMPLES_TINY=1 python examples/lightning_callback.py   # 2 epochs (CI)

The callback logs `nc/train/nc1`, `nc/val/nc1`, ... to every Lightning logger and, with
`save_snapshots=True`, writes the run folder that `nctools analyze` and `nctools plot` read.
"""

import os
import shutil

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nctools
from nctools.integrations.lightning import NeuralCollapseCallback

TINY = os.environ.get("NCTOOLS_EXAMPLES_TINY") == "1"
EPOCHS = 2 if TINY else 40
OUT = "runs/lightning-example"


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)  # the classifier W, b: layer="head"

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, _):
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)  # -> history.csv
        return loss

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def loader(centres, n):
    y = torch.arange(n) % 4
    return DataLoader(TensorDataset(centres[y] + torch.randn(n, 20), y), batch_size=32)


if __name__ == "__main__":
    torch.manual_seed(0)
    centres = torch.randn(4, 20) * 3
    shutil.rmtree(OUT, ignore_errors=True)  # a new fit refuses a folder that holds a run
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        callbacks=[NeuralCollapseCallback(layer="head", every_n_epochs=1 if TINY else 5,
                                          save_snapshots=True, out=OUT)],
        enable_progress_bar=False,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(), loader(centres, 512), loader(centres, 128))
    print("logged nc/train/nc1", round(float(trainer.logged_metrics["nc/train/nc1"]), 6))

    table = nctools.analyze(OUT)  # the same numbers, from the saved snapshots
    last = table[(table.epoch == table.epoch.max()) & (table.split == "train")]
    print("analyze  train nc1", round(float(last.set_index("metric").value["nc1"]), 6))
