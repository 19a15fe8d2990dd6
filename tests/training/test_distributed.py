"""Distributed training and measurement on the CPU: 2 gloo processes against one.

One real ``torchrun`` launch of ``nctools train`` (the path users take) is shared by the
tests that read its run; the other multi-process checks fork 2 ranks that set the
torchrun environment themselves and call the same entry points (no second launch, no
re-import of torch). Every comparison is numeric: histories to 1e-5 (the same global
batches, summed in another order), metrics to 1e-9, features bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from nctools import cli
from nctools.analysis.tables import analyze
from nctools.config.schema import (
    Config,
    ModelConfig,
)
from nctools.data.sets import load_dataset
from nctools.errors import ConfigError, RunError
from nctools.metrics.measure import measure
from nctools.models.features import extract_features
from nctools.models.networks import build_model
from nctools.runs import snapshots, store
from nctools.runs.store import save_config
from nctools.training.distributed import (
    DistInfo,
    GlobalBatchNorm,
    dist_from_env,
    global_batch_norm,
    rank_device,
    shard_rows,
)
from tests import helpers
from tests.helpers import as_rank, free_port, run_ranks

T = importlib.import_module("nctools.training.loop")  # the module, not the function `train`

EPOCHS, SNAPSHOTS = 4, [2, 4]
HISTORY = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"]
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_config():
    """51 training images (batches of 8: the last has 3 rows, split 2 + 1), 24 test."""
    return helpers.tiny_config(train_per_class=17, epochs=EPOCHS, batch_size=8,
                               snapshots=list(SNAPSHOTS))


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    return T.train(tiny_config(), tmp_path_factory.mktemp("one") / "run")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """``torchrun --nproc_per_node=2 -m nctools train`` in a subprocess."""
    root = tmp_path_factory.mktemp("ddp")
    config = root / "tiny.yaml"
    save_config(tiny_config(), config)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "nctools", "train", str(config), "--out", str(root / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run saved in") == 1  # rank 0 alone speaks
    return root / "run"


# ------------------------------------------------------------------ training


def test_ddp_history_equals_one_process(ddp_run, one_run):
    ddp, one = (store.read_history(r)[HISTORY] for r in (ddp_run, one_run))
    assert ddp["epoch"].tolist() == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(ddp, one, rtol=1e-5, atol=0)
    manifest = store.read_manifest(ddp_run)
    assert (manifest["status"], manifest["world_size"]) == ("completed", 2)


def test_snapshots_are_sharded_in_whole_eval_batches(ddp_run):
    eval_batch = T.EVAL_BATCH_FACTOR * tiny_config().train.batch_size  # 32
    assert snapshots.list_snapshots(ddp_run) == SNAPSHOTS
    meta = snapshots.read_meta(ddp_run, 4)
    assert meta["world"] == 2
    for split, n in (("train", 51), ("test", 24)):
        expected = [len(shard_rows(n, eval_batch, DistInfo(r, 2))) for r in range(2)]
        assert meta["splits"][split]["rows"] == expected
        assert meta["splits"][split]["files"] == [f"{split}-0000{r}-of-00002.safetensors"
                                                  for r in range(2)]
    assert meta["splits"]["train"]["rows"] == [32, 19]
    assert meta["splits"]["test"]["rows"] == [24, 0]  # one batch: rank 1 has no rows
    folder = snapshots.snapshot_dir(ddp_run, 4)
    assert not list(folder.glob("meta-*"))  # the parts were merged into meta.json


def test_snapshot_metrics_equal_one_process_on_the_same_weights(ddp_run):
    """analyze(2-rank run) == one process extracting and measuring with its checkpoint."""
    table = analyze(ddp_run)
    cfg = tiny_config()
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    state = store.load_checkpoint(ddp_run / "checkpoint.pt")
    assert state["epoch"] == EPOCHS
    model.load_state_dict(state["model"])
    batch = T.EVAL_BATCH_FACTOR * cfg.train.batch_size
    feats = {s: extract_features(model, getattr(data, s), batch, "cpu") for s in ("train", "test")}
    for split in ("train", "test"):  # the shards hold exactly what one process extracts
        saved, labels = snapshots.load_split(ddp_run, EPOCHS, split)
        assert torch.equal(labels, feats[split][1])
        assert torch.equal(saved, feats[split][0]), split
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    train_means = feats["train"][0].double().new_zeros(3, weight.shape[1])
    for c in range(3):
        train_means[c] = feats["train"][0][feats["train"][1] == c].double().mean(0)
    expected = {"train": measure(*feats["train"], weight, bias),
                "test": measure(*feats["test"], weight, bias, class_means=train_means)}
    last = table[table["epoch"] == EPOCHS]
    assert len(last) == 2 * len(expected["train"])
    for row in last.itertuples():
        want = expected[row.split][row.metric]
        assert row.value == pytest.approx(want, rel=1e-9, abs=1e-12), (row.split, row.metric)


def test_sharded_and_unsharded_snapshots_analyze_alike(tmp_path):
    """The same features written whole and as 3 uneven shards give the same table."""
    gen = torch.Generator().manual_seed(5)
    means = torch.randn(4, 6, generator=gen) * 3
    splits = {}
    for split, n in (("train", 230), ("test", 61)):
        labels = torch.arange(n) % 4
        splits[split] = (means[labels] + torch.randn(n, 6, generator=gen), labels)
    weight, bias = means + 0.1 * torch.randn(4, 6, generator=gen), torch.zeros(4)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for run in (whole, sharded):
        save_config(tiny_config(), run / "config.yaml")
    snapshots.write_snapshot(whole, 2, splits, weight, bias)
    cuts = {"train": [0, 100, 101, 230], "test": [0, 0, 40, 61]}  # rank 0 holds no test rows
    for rank in range(3):
        part = {s: (f[cuts[s][rank]:cuts[s][rank + 1]], y[cuts[s][rank]:cuts[s][rank + 1]])
                for s, (f, y) in splits.items()}
        snapshots.write_snapshot(sharded, 2, part, weight, bias, shard=(rank, 3))
    snapshots.finalize_sharded_snapshot(sharded, 2, 3)
    for split in splits:
        assert torch.equal(snapshots.load_split(sharded, 2, split)[0], splits[split][0])
    a, b = analyze(whole), analyze(sharded)
    assert a.drop(columns=["run", "value"]).equals(b.drop(columns=["run", "value"]))
    for x, y in zip(a["value"], b["value"], strict=True):
        assert x == pytest.approx(y, rel=1e-12, abs=1e-15)


def _resume(rank: int, run: str) -> None:
    T.train(tiny_config(), run)


def test_a_one_process_run_resumes_on_two_ranks(one_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = T.train_step, [0]

    def stop_in_epoch_3(*args, **kwargs):  # 7 steps per epoch: step 17 is in epoch 3
        calls[0] += 1
        if calls[0] == 17:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", stop_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(tiny_config(), out)
    monkeypatch.undo()
    assert store.read_manifest(out)["epochs_done"] == 2
    run_ranks(_resume, str(out))  # every rank loads the epoch-2 checkpoint
    resumed, one = (store.read_history(r)[HISTORY] for r in (out, one_run))
    pd.testing.assert_frame_equal(resumed, one, rtol=1e-5, atol=0)
    assert snapshots.read_meta(out, 2).get("world") is None  # written before the resume
    assert snapshots.read_meta(out, 4)["world"] == 2
    a, b = (store.load_checkpoint(r / "checkpoint.pt")["model"] for r in (out, one_run))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def _signalled_on_one_rank(rank: int, run: str, out: str) -> None:
    """Rank 1 alone gets SIGINT during its step 17 (epoch 3 of 7 steps per epoch)."""
    real, calls = T.train_step, [0]

    def step(*args, **kwargs):
        calls[0] += 1
        result = real(*args, **kwargs)
        if rank == 1 and calls[0] == 17:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    T.train_step = step
    try:
        T.train(tiny_config(), run)
    except KeyboardInterrupt:
        Path(out, f"rank{rank}.txt").write_text(f"interrupted after step {calls[0]}")


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_epoch(one_run, tmp_path):
    """Under torchrun the ranks agree to stop in the epoch's all_reduce: none is left
    waiting in a collective, and the run resumes to the uninterrupted result."""
    run = tmp_path / "run"
    context = mp.start_processes(
        as_rank, args=(2, free_port(), _signalled_on_one_rank, (str(run), str(tmp_path))),
        nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not stop together (a rank hangs in a collective)")
    for rank in range(2):  # both finished epoch 3 (steps 15-21) and stopped there
        assert (tmp_path / f"rank{rank}.txt").read_text() == "interrupted after step 21"
    manifest = store.read_manifest(run)
    assert (manifest["status"], manifest["epochs_done"]) == ("interrupted", 3)
    run_ranks(_resume, str(run))
    resumed, one = (store.read_history(r)[HISTORY] for r in (run, one_run))
    pd.testing.assert_frame_equal(resumed, one, rtol=1e-5, atol=0)


def _train_expecting(rank: int, cfg: Config, run: str, out: str) -> None:
    try:
        T.train(cfg, run)
    except (ConfigError, RunError) as exc:
        Path(out, f"rank{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")


def test_batch_size_must_divide_among_ranks(tmp_path):
    cfg = tiny_config()
    cfg.train.batch_size = 15
    run_ranks(_train_expecting, cfg, str(tmp_path / "run"), str(tmp_path))
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("ConfigError: train.batch_size: 15 is not divisible by "
                                  "WORLD_SIZE=2"), message


# ------------------------------------------------------------------ batch norm


def _batch_norm_rank(rank: int, x: torch.Tensor, grad: torch.Tensor, out: str) -> None:
    torch.distributed.init_process_group("gloo")
    try:
        bn = global_batch_norm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
        assert isinstance(bn[0], GlobalBatchNorm)
        rows = slice(0, 3) if rank == 0 else slice(3, 5)  # uneven: 3 + 2 rows
        xr = x[rows].clone().requires_grad_()
        y = bn(xr)
        y.backward(grad[rows])
        torch.save({"y": y.detach(), "dx": xr.grad, "dw": bn[0].weight.grad,
                    "state": bn.state_dict()}, Path(out, f"bn{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_global_batch_norm_equals_batch_norm_on_the_whole_batch(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, 4, generator=gen) * 3 + 1
    grad = torch.randn(5, 3, 4, 4, generator=gen)
    run_ranks(_batch_norm_rank, x, grad, str(tmp_path))
    ref = nn.BatchNorm2d(3)
    xr = x.clone().requires_grad_()
    y = ref(xr)
    y.backward(grad)
    parts = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach())
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), xr.grad)
    # DDP averages parameter gradients; summed over ranks they are the whole batch's
    torch.testing.assert_close(parts[0]["dw"] + parts[1]["dw"], ref.weight.grad)
    for key, value in ref.state_dict().items():
        for part in parts:
            torch.testing.assert_close(part["state"][f"0.{key}"], value)


# ------------------------------------------------------------------ measure


def _measure_rank(rank: int, argv: list[str], out: str) -> None:
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert cli.main(argv) == 0
    Path(out, f"stdout{rank}.txt").write_text(text.getvalue())


@pytest.mark.parametrize("split, ood", [("train", []), ("test", ["--ood-dataset", "synthetic"])])
def test_measure_under_torchrun_equals_one_process(tmp_path, split, ood):
    torch.manual_seed(0)  # untrained weights measure as well as trained ones
    model = build_model(ModelConfig(arch="convnet"), 10, 1, 16)  # what --arch convnet builds
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # 640 train / 160 test rows in batches of 96: 7 + 2 batches, split 4 + 3 and 1 + 1
    argv = ["measure", "--arch", "convnet", "--checkpoint", str(tmp_path / "model.pt"),
            "--dataset", "synthetic", "--split", split, "--batch-size", "96", "--json", *ood]
    run_ranks(_measure_rank, argv, str(tmp_path))
    assert (tmp_path / "stdout1.txt").read_text() == ""  # rank 0 alone prints
    got = json.loads((tmp_path / "stdout0.txt").read_text())
    one = io.StringIO()  # the same command in one process
    with contextlib.redirect_stdout(one):
        assert cli.main([*argv, "--device", "cpu"]) == 0
    expected = json.loads(one.getvalue())
    assert got.keys() == expected.keys() and ("nc5" in got) == bool(ood)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# ------------------------------------------------------------------ plumbing


@pytest.mark.parametrize("n, batch, world", [(51, 32, 2), (24, 32, 2), (1000, 64, 3),
                                             (7, 2, 8), (0, 4, 2)])
def test_shards_are_contiguous_whole_batches_in_rank_order(n, batch, world):
    shards = [shard_rows(n, batch, DistInfo(r, world)) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    for s in shards:  # whole batches of one process's pass; only the split's end is short
        assert len(s) == 0 or (s.start % batch == 0 and (s.stop % batch == 0 or s.stop == n))
    sizes = [-(-len(s) // batch) for s in shards]
    assert max(sizes) - min(sizes) <= 1


def test_environment_errors_name_the_variable(monkeypatch):
    for key in DIST_ENV:
        monkeypatch.delenv(key, raising=False)
    assert dist_from_env() == DistInfo(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RunError, match="WORLD_SIZE='two' is not an integer"):
        dist_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(RunError, match="need 0 <= RANK < WORLD_SIZE"):
        dist_from_env()
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RunError, match=r"MASTER_ADDR and MASTER_PORT not set.*torchrun"):
        dist_from_env()
    info = DistInfo(1, 2, 1)
    with pytest.raises(ConfigError, match=r"--device: 'cuda:1' pins one GPU"):
        rank_device(torch.device("cuda", 1), info, key="--device")
    assert rank_device(torch.device("cpu"), info) == torch.device("cpu")
