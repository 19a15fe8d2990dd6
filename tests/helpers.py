"""What several test files share: tiny run configs, class clusters, free ports, forked
gloo ranks, tree hashes, a user network factory (``tests.helpers:make_net`` on the
command line), and language-model batches with their token samples built by hand."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from torch import nn

from nctools.config.schema import Config, DataConfig, ModelConfig, SnapshotConfig, TrainConfig


def tiny_config(
    *,
    num_classes: int = 3,
    train_per_class: int = 16,
    test_per_class: int = 8,
    channels: int = 1,
    image_size: int = 8,
    width: int = 8,
    seed: int = 3,
    snapshots: str | list[int] = "all",
    **train: object,
) -> Config:
    """A run on synthetic images that trains in well under a second an epoch on the CPU:
    convnet of ``width`` (D = 4 x width), ``train`` overriding TrainConfig's fields
    (epochs 3, batch size 16, lr 0.05 and the CPU unless given)."""
    return Config(
        name="tiny",
        seed=seed,
        data=DataConfig(dataset="synthetic", num_classes=num_classes,
                        train_per_class=train_per_class, test_per_class=test_per_class,
                        channels=channels, image_size=image_size),
        model=ModelConfig(arch="convnet", width=width),
        train=TrainConfig(**{"epochs": 3, "batch_size": 16, "lr": 0.05, "device": "cpu",
                             **train}),  # type: ignore[arg-type]
        snapshot=SnapshotConfig(epochs=snapshots),
    )


def clusters(num_classes, dim, per_class, spread=1.0, offset=0.0, imbalance=False, seed=0):
    """Gaussian class clusters with a classifier near the means (float64 NumPy):
    features (N, dim), labels (N,), weight (C, dim), bias (C,)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * 3 + offset
    if imbalance:
        sizes = rng.integers(2, 3 * per_class, size=num_classes)
    else:
        sizes = np.full(num_classes, per_class)
    labels = np.repeat(np.arange(num_classes), sizes)
    rng.shuffle(labels)
    features = means[labels] + spread * rng.normal(size=(labels.size, dim))
    weight = means - means.mean(0) + 0.7 * rng.normal(size=(num_classes, dim))
    bias = 0.1 * rng.normal(size=num_classes)
    return features, labels, weight, bias


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a gloo process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_rank(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(rank, *args)


def run_ranks(fn, *args, world: int = 2) -> None:
    """``fn(rank, *args)`` in ``world`` forked processes with torchrun's environment."""
    mp.start_processes(as_rank, args=(world, free_port(), fn, args), nprocs=world,
                       join=True, start_method="fork")


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (temp files too), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def no_temp_files(folder: Path) -> bool:
    """Whether no writer left a temporary file (``.NAME.tmp-...``) under ``folder``."""
    return not [p for p in folder.rglob(".*") if ".tmp-" in p.name]


class SmallNet(nn.Module):
    """A user's own network: two conv blocks, pooling, and a linear head."""

    def __init__(self, num_classes: int = 3, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block2(self.block1(x))).flatten(1))


def make_net(num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """Factory for ``--model tests.helpers:make_net``."""
    torch.manual_seed(0)
    return SmallNet(num_classes, in_channels)


def hooked(net: nn.Module, images: torch.Tensor, module: nn.Module | str,
           use_input: bool = False) -> torch.Tensor:
    """The output (or with ``use_input`` the input) of ``module`` (a module of ``net`` or
    its name) over ``images``, from one eval-mode forward pass with the test's own hook;
    a 4-D activation averaged over space; float64. An independent extractor to hold
    nctools' feature taps to."""
    if isinstance(module, str):
        module = dict(net.named_modules())[module]
    out = []

    def take(_module, inputs, output):
        value = inputs[0] if use_input else output
        out.append(value.mean(dim=(2, 3)) if value.ndim == 4 else value)

    handle = module.register_forward_hook(take)
    net.eval()
    with torch.no_grad():
        net(images)
    handle.remove()
    return out[0].double()


def measure_json(capsys, *argv: str) -> dict:
    """``nctools measure ARGV --json``: exit status 0 and the parsed output."""
    import json

    from nctools.cli import main

    assert main(["measure", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


class Tokens(torch.utils.data.Dataset):
    """``n`` sequences of 6 token ids whose first id is the label (``i % num_classes``): a
    text task a tiny BERT separates at once. Items are the Trainer's dicts."""

    def __init__(self, n: int, seed: int, num_classes: int = 3) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.ids = torch.randint(3, 30, (n, 6), generator=gen)
        self.ids[:, 0] = self.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert(num_classes: int = 3) -> nn.Module:
    """A randomly initialised one-layer BERT classifier built from a config (nothing
    downloaded), for the Tokens task."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=num_classes,
                        max_position_embeddings=8)
    return BertForSequenceClassification(config)



IGNORE = -100  # the label Hugging Face's losses skip


def lm_batches(vocab: int, masked: bool, count: int = 4, seed: int = 3
               ) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches (B = 3, T = 12), tokens from a small Zipf-like alphabet so that
    classes repeat; some labels -100; a masked LM's labels on a random 40% of positions."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab, dtype=torch.float64)  # not 0: BERT's zero pad row
    out = []
    for _ in range(count):
        ids = 1 + torch.multinomial(weights, 36, replacement=True, generator=gen).view(3, 12)
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, 9:] = 0
        mask[2, 5:] = 0
        labels = ids.masked_fill(mask == 0, IGNORE)
        labels[0, 3] = IGNORE
        if masked:
            chosen = torch.rand(3, 12, generator=gen) < 0.4
            labels = labels.masked_fill(~chosen, IGNORE)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def hand_token_samples(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                       causal: bool, state: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (features, labels) pairs of a GPT-2 or BERT model's loss, by hand from its LM
    head's input (or, given ``state``, from ``hidden_states[state]``), position by
    position: a causal LM's position t labelled with the token at t + 1, a masked LM's
    labelled positions; padding and -100 labels left out."""
    feats, labs = [], []
    for batch in batches:
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states[
                               -1 if state is None else state]
            if state is None and not causal:  # BERT's head transforms before its decoder
                hidden = model.cls.predictions.transform(hidden)
        mask, labels = batch["attention_mask"], batch["labels"]
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - 1 if causal else labels.shape[1]):
                label = labels[b, t + 1] if causal else labels[b, t]
                real = mask[b, t] and (mask[b, t + 1] if causal else True)
                if real and label != IGNORE:
                    feats.append(hidden[b, t])
                    labs.append(int(label))
    return torch.stack(feats), torch.tensor(labs)
