"""train.drop_last: an epoch without its last, incomplete batch (the authors' notebook)."""

from __future__ import annotations

import importlib

import pytest
import torch

from nctools.data.splits import Split
from nctools.errors import ConfigError
from nctools.runs import store
from nctools.training.distributed import DistInfo
from nctools.training.steps import rank_batches, trained_rows
from tests import helpers

T = importlib.import_module("nctools.training.loop")
ONE = DistInfo()  # one process


def test_trained_rows():
    assert trained_rows(100, 32, False) == 100
    assert trained_rows(100, 32, True) == 96
    assert trained_rows(96, 32, True) == 96
    with pytest.raises(ConfigError) as info:
        trained_rows(20, 32, True)
    assert str(info.value) == ("train.drop_last: the 20 training samples make no whole batch "
                               "of train.batch_size=32")


@pytest.mark.parametrize(("drop_last", "sizes"), [(False, [32, 32, 32, 4]), (True, [32, 32, 32])])
def test_rank_batches_drop_the_last_incomplete_batch(drop_last, sizes):
    split = Split(torch.arange(100.0).reshape(100, 1, 1, 1), torch.arange(100) % 3)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    batches = list(rank_batches(split, order, 32, False, torch.Generator(), ONE, drop_last))
    assert [len(y) for _, y, _ in batches] == sizes
    seen = torch.cat([x.flatten() for x, _, _ in batches]).long()
    assert torch.equal(seen, order[: sum(sizes)])  # the order's first rows, in order


@pytest.mark.parametrize(("drop_last", "steps"), [(False, 3), (True, 2)])
def test_drop_last_changes_the_steps_per_epoch(tmp_path, monkeypatch, drop_last, steps):
    """48 training rows in batches of 20: 20, 20, 8, or with drop_last 20, 20; the history's
    running loss and accuracy are means over the rows trained on."""
    calls: list[tuple[int, float, int]] = []

    def counting_step(model, x, y, *args, **kwargs):
        loss, hits = helpers_step(model, x, y, *args, **kwargs)
        calls.append((len(y), float(loss), int(hits)))
        return loss, hits

    helpers_step = T.train_step
    monkeypatch.setattr(T, "train_step", counting_step)
    cfg = helpers.tiny_config(epochs=2, batch_size=20, drop_last=drop_last, snapshots=[2])
    run = T.train(cfg, tmp_path / "run")
    assert [rows for rows, _, _ in calls] == ([20, 20, 8] if not drop_last else [20, 20]) * 2
    assert len(calls) == 2 * steps
    history = store.read_history(run)
    first = calls[:steps]
    rows = sum(r for r, _, _ in first)
    assert history["train_loss"][0] == pytest.approx(sum(loss for _, loss, _ in first) / rows,
                                                     rel=1e-6)
    assert history["train_acc_running"][0] == pytest.approx(sum(h for _, _, h in first) / rows)
