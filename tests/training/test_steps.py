"""The pieces of a training step (nctools/training/steps.py): the losses against their
formulas, the learning-rate schedules, the device names, the epoch order."""

from __future__ import annotations

import math

import pytest
import torch

from nctools.config.schema import TrainConfig
from nctools.errors import ConfigError
from nctools.training.steps import (
    batch_loss,
    build_optimizer,
    build_scheduler,
    epoch_generator,
    resolve_device,
)


def test_multistep_milestones_never_fall_before_the_first_epoch():
    tc = TrainConfig(epochs=1, lr=0.1)  # round(1/3) = 0 would start at lr * gamma
    opt = build_optimizer(torch.nn.Linear(2, 2), tc)
    build_scheduler(opt, tc)
    assert opt.param_groups[0]["lr"] == 0.1


def test_cosine_and_constant_schedules():
    model = torch.nn.Linear(2, 2)
    for schedule, expect in [
        ("cosine", [0.1 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]),
        ("constant", [0.1] * 5),
    ]:
        tc = TrainConfig(epochs=5, lr=0.1, schedule=schedule)
        opt = build_optimizer(model, tc)
        sched = build_scheduler(opt, tc)
        seen = []
        for _ in range(5):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert seen == pytest.approx(expect, rel=1e-12, abs=1e-15), schedule


def test_losses_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 4, generator=gen), torch.tensor([0, 3, 1, 1, 2])
    mse = sum(sum((logits[i, c] - float(c == labels[i])) ** 2 for c in range(4)) for i in range(5))
    assert batch_loss(logits, labels, "mse").item() == pytest.approx(mse.item() / 5, rel=1e-6)
    ce = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in range(5)) / 5
    assert batch_loss(logits, labels, "ce").item() == pytest.approx(ce.item(), rel=1e-6)


def test_unknown_device_names_train_device():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.device"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = torch.randperm(50, generator=epoch_generator(3, 7))
    b = torch.randperm(50, generator=epoch_generator(3, 7))
    c = torch.randperm(50, generator=epoch_generator(3, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
