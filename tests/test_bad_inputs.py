"""A catalogue of bad inputs: config files, command lines, damaged run files, the API.

Every command-line case runs ``nctools.cli.main(argv)`` in this process and checks the
contract of errors.py: exit status 2, exactly one stderr line ``nctools: error: ...``
naming the culprit (file, key or argument), no traceback, and nothing on disk changed
(the sha256 of every file of the scratch folder, before and after). Two cases also run
as real ``python -m nctools`` processes. Every ValueError of ``nctools.metrics.measure`` is
checked for its class and for the argument it names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from nctools.cli import main
from nctools.config.schema import ModelConfig, load_config
from nctools.metrics.measure import measure
from nctools.models.networks import build_model
from nctools.runs import store
from nctools.training.loop import train
from tests.helpers import tree_hashes

REPO = Path(__file__).resolve().parents[1]
TINY = """\
name: tiny
seed: 0
data: {dataset: synthetic, num_classes: 3, train_per_class: 8, test_per_class: 4, image_size: 8}
model: {arch: convnet, width: 4}
train: {epochs: 3, batch_size: 16, lr: 0.05, device: cpu}
snapshot: {epochs: all}
"""


class Payload:
    """Unpickling this runs code: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed 3-epoch run with a snapshot at every epoch (no metrics.csv)."""
    config = tmp_path_factory.mktemp("config") / "tiny.yaml"
    config.write_text(TINY)
    return train(load_config(config), tmp_path_factory.mktemp("finished") / "run")


@pytest.fixture
def scratch(finished, tmp_path) -> Path:
    """A folder with ``run`` (a copy of the finished run) and ``tiny.yaml`` (its config)."""
    shutil.copytree(finished, tmp_path / "run")
    (tmp_path / "tiny.yaml").write_text(TINY)
    return tmp_path


# ----------------------------------------------------------------------------- preparations
# Each takes the scratch folder and damages or adds something before the command runs.


def bad_config(old: str, new: str) -> Callable[[Path], None]:
    """``bad.yaml``: the tiny config with ``old`` replaced by ``new``."""
    def write(tmp: Path) -> None:
        assert old in TINY
        (tmp / "bad.yaml").write_text(TINY.replace(old, new))
    return write


def snapshot_file(epoch: int, name: str) -> Path:
    return Path("run") / "snapshots" / f"epoch-{epoch:04d}" / name


def truncate(relative: Path, keep: int = -7) -> Callable[[Path], None]:
    def cut(tmp: Path) -> None:
        path = tmp / relative
        path.write_bytes(path.read_bytes()[:keep])
    return cut


def flip_bit(relative: Path) -> Callable[[Path], None]:
    def flip(tmp: Path) -> None:
        data = bytearray((tmp / relative).read_bytes())
        data[-3] ^= 0x01  # same size: only the sha256 can tell
        (tmp / relative).write_bytes(bytes(data))
    return flip


def delete(*relatives: Path) -> Callable[[Path], None]:
    def remove(tmp: Path) -> None:
        for relative in relatives:
            (tmp / relative).unlink()
    return remove


def overwrite(relative: Path | str, content: bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / relative).write_bytes(content)
    return write


def edit_meta(epoch: int, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(tmp: Path) -> None:
        path = tmp / snapshot_file(epoch, "meta.json")
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
    return edit


def interrupted(then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """Mark the run as stopped by Ctrl-C, so that `nctools train` resumes it; then ``then``."""
    def mark(tmp: Path) -> None:
        manifest = store.read_manifest(tmp / "run")
        store.write_manifest(tmp / "run", {**manifest, "status": "interrupted"})
        if then is not None:
            then(tmp)
    return mark


def other_network_checkpoint(tmp: Path) -> None:
    """The run's checkpoint with the weights of a wider convnet (width 8, not 4)."""
    state = store.load_checkpoint(tmp / "run" / "checkpoint.pt")
    state["model"] = build_model(ModelConfig(arch="convnet", width=8), 3, 1, 8).state_dict()
    store.save_checkpoint(tmp / "run" / "checkpoint.pt", state)


def pickle_payload(relative: str) -> Callable[[Path], None]:
    """A checkpoint whose unpickling would create ``marker`` (torch.save of a payload)."""
    def write(tmp: Path) -> None:
        state = {"epoch": 1, "model": {"w": torch.ones(2)}, "extra": Payload(tmp / "marker")}
        torch.save(state, tmp / relative)
    return write


def fitting_checkpoint(tmp: Path) -> None:
    """convnet weights that fit `measure --dataset synthetic` (10 classes, 1 x 16 x 16)."""
    model = build_model(ModelConfig(arch="convnet"), 10, 1, 16)
    torch.save(model.state_dict(), tmp / "convnet.pt")


def a_file(tmp: Path) -> None:
    (tmp / "afile").write_text("a file where a folder should be")


# ----------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # "{tmp}" is the scratch folder
    culprit: str  # must appear in the one error line ("{tmp}" as above)
    prepare: Callable[[Path], None] | None = None


TRAIN_BAD = ("train", "{tmp}/bad.yaml", "--out", "{tmp}/new")
TRAIN_RUN = ("train", "{tmp}/tiny.yaml", "--out", "{tmp}/run")
STRICT = ("analyze", "{tmp}/run", "--strict")
MEASURE = ("measure", "--arch", "convnet", "--dataset", "synthetic", "--checkpoint")

CASES: dict[str, Case] = {
    # the config file
    "unknown key": Case(TRAIN_BAD, "{tmp}/bad.yaml: train.epoch: unknown key (did you mean "
                        "'train.epochs'?)", bad_config("lr: 0.05", "lr: 0.05, epoch: 3")),
    "unknown section": Case(TRAIN_BAD, "{tmp}/bad.yaml: trainer: unknown key",
                            bad_config("snapshot:", "trainer: {lr: 1}\nsnapshot:")),
    "wrong type": Case(TRAIN_BAD, "{tmp}/bad.yaml: train.lr: expected float, got str 'fast'",
                       bad_config("lr: 0.05", "lr: fast")),
    "bool for int": Case(TRAIN_BAD, "{tmp}/bad.yaml: train.epochs: expected int, got bool",
                         bad_config("epochs: 3", "epochs: yes")),
    "negative epochs": Case(TRAIN_BAD, "{tmp}/bad.yaml: train.epochs: must be >= 1, got -3",
                            bad_config("epochs: 3", "epochs: -3")),
    "unknown data set": Case(TRAIN_BAD, "data.dataset: unknown data set 'cifar11'",
                             bad_config("dataset: synthetic", "dataset: cifar11")),
    "unknown network": Case(TRAIN_BAD, "model.arch: unknown architecture 'alexnet'",
                            bad_config("arch: convnet", "arch: alexnet")),
    "bad snapshot schedule": Case(TRAIN_BAD, "{tmp}/bad.yaml: snapshot.epochs: expected 'all', "
                                  "'log:K' or a list of ints, got 'weekly'",
                                  bad_config("epochs: all", "epochs: weekly")),
    "snapshot past the end": Case(TRAIN_BAD, "{tmp}/bad.yaml: snapshot.epochs: epoch 9 is "
                                  "outside [1, 3]", bad_config("epochs: all", "epochs: [1, 9]")),
    "snapshot log:1": Case(TRAIN_BAD, "{tmp}/bad.yaml: snapshot.epochs: log:K needs K >= 2",
                           bad_config("epochs: all", "epochs: 'log:1'")),
    "snapshot dtype": Case(TRAIN_BAD, "{tmp}/bad.yaml: snapshot.dtype: must be one of float32",
                           bad_config("epochs: all", "epochs: all, dtype: float64")),
    "duplicate key": Case(TRAIN_BAD, "{tmp}/bad.yaml: line 5: YAML syntax error: duplicate "
                          "key 'lr'", bad_config("lr: 0.05", "lr: 0.05, lr: 0.1")),
    "yaml syntax": Case(TRAIN_BAD, "{tmp}/bad.yaml: line 5: YAML syntax error",
                        bad_config("width: 4}", "width: 4")),
    "not a mapping": Case(TRAIN_BAD, "{tmp}/bad.yaml: top level must be a mapping",
                          bad_config(TINY, "- 1\n- 2\n")),
    "--set without =": Case((*TRAIN_RUN, "--set", "train.epochs"),
                            "--set 'train.epochs': expected KEY=VALUE"),
    "--set unknown key": Case((*TRAIN_RUN, "--set", "train.lrr=0.1"),
                              "train.lrr: unknown key (did you mean 'train.lr'?)"),
    "--set wrong type": Case((*TRAIN_RUN, "--set", "train.batch_size=big"),
                             "--set train.batch_size=big: train.batch_size: expected int"),
    # the command line
    "no command": Case((), "the following arguments are required: COMMAND"),
    "analyze without RUN": Case(("analyze",), "the following arguments are required: RUN"),
    "measure without files": Case(("measure", "--arch", "convnet"),
                                  "the following arguments are required: --checkpoint, "
                                  "--dataset"),
    "unknown option": Case(("analyze", "{tmp}/run", "--fast"),
                           "unrecognized arguments: --fast"),
    "not an int": Case((*MEASURE, "{tmp}/run/checkpoint.pt", "--batch-size", "abc"),
                       "argument --batch-size: invalid int value: 'abc'"),
    "train without CONFIG": Case(("train",), "train: give a CONFIG file"),
    "missing config": Case(("train", "{tmp}/nope.yaml"), "{tmp}/nope.yaml: config file not found"),
    "analyze missing run": Case(("analyze", "{tmp}/nowhere"), "no run directory at {tmp}/nowhere"),
    "plot missing run": Case(("plot", "{tmp}/nowhere"), "no run directory at {tmp}/nowhere"),
    "resume without --out": Case(("train", "--resume"),
                                 "train --resume: give the run directory with --out RUN"),
    "resume missing run": Case(("train", "--resume", "--out", "{tmp}/nowhere"),
                               "train --resume: no run to resume at {tmp}/nowhere"),
    "--out holds another config": Case(
        ("train", "{tmp}/bad.yaml", "--out", "{tmp}/run"),
        "{tmp}/run holds a run of another config (train.lr: 0.05 -> 0.1)",
        interrupted(bad_config("lr: 0.05", "lr: 0.1"))),
    "--resume with another config": Case(
        ("train", "{tmp}/bad.yaml", "--out", "{tmp}/run", "--resume"),
        "train --resume: the given CONFIG/--set would change the run in {tmp}/run "
        "(train.lr: 0.05 -> 0.1)", interrupted(bad_config("lr: 0.05", "lr: 0.1"))),
    "--out below a file": Case(("train", "{tmp}/tiny.yaml", "--out", "{tmp}/afile/run"),
                               "cannot write {tmp}/afile/run/config.yaml: Not a directory",
                               a_file),
    "figure format": Case(("plot", "{tmp}/run", "--out", "{tmp}/f.gif"),
                          "cannot save a figure as {tmp}/f.gif: unknown extension '.gif'"),
    "unknown --arch": Case(("measure", "--arch", "alexnet", "--dataset", "synthetic",
                            "--checkpoint", "{tmp}/run/checkpoint.pt"),
                           "--arch 'alexnet': unknown architecture"),
    "unknown --dataset": Case(("measure", "--arch", "convnet", "--dataset", "cifar11",
                               "--checkpoint", "{tmp}/run/checkpoint.pt"),
                              "--dataset: unknown data set 'cifar11'"),
    "unknown --device": Case((*MEASURE, "{tmp}/convnet.pt", "--device", "tpu"),
                             "--device: 'tpu' is not auto, cpu, cuda or cuda:N",
                             fitting_checkpoint),
    # files of a run
    "truncated safetensors": Case(STRICT, "{tmp}/run/snapshots/epoch-0002/train.safetensors: "
                                  "snapshot file is corrupt (truncated",
                                  truncate(snapshot_file(2, "train.safetensors"))),
    "wrong checksum": Case(STRICT, "{tmp}/run/snapshots/epoch-0001/test.safetensors: snapshot "
                           "file is corrupt (sha256",
                           flip_bit(snapshot_file(1, "test.safetensors"))),
    "missing snapshot file": Case(STRICT, "{tmp}/run/snapshots/epoch-0003/classifier."
                                  "safetensors: snapshot file is missing",
                                  delete(snapshot_file(3, "classifier.safetensors"))),
    "corrupt meta.json": Case(STRICT, "{tmp}/run/snapshots/epoch-0001/meta.json: snapshot meta "
                              "is corrupt", overwrite(snapshot_file(1, "meta.json"), b"{")),
    "meta.json without checksums": Case(
        STRICT, "{tmp}/run/snapshots/epoch-0002/meta.json: snapshot meta is corrupt (it lacks",
        edit_meta(2, lambda meta: meta.pop("files"))),
    "missing meta.json": Case(("analyze", "{tmp}/run"), "{tmp}/run has no snapshots to analyze",
                              delete(*(snapshot_file(e, "meta.json") for e in (1, 2, 3)))),
    "corrupt metrics.csv": Case(("analyze", "{tmp}/run"), "{tmp}/run/metrics.csv: not a metrics "
                                "table", overwrite("run/metrics.csv", bytes(range(256)))),
    "corrupt config.yaml": Case(("analyze", "{tmp}/run"), "{tmp}/run/config.yaml: line 1: YAML "
                                "syntax error", overwrite("run/config.yaml", b"name: [")),
    "corrupt history.csv": Case(TRAIN_RUN, "{tmp}/run/history.csv: history is corrupt",
                                interrupted(overwrite("run/history.csv", b"epoch\nthree\n"))),
    "corrupt run.json": Case(TRAIN_RUN, "{tmp}/run/run.json: manifest is corrupt",
                             overwrite("run/run.json", b"{'status':")),
    "checkpoint of another network": Case(TRAIN_RUN, "{tmp}/run/checkpoint.pt: cannot resume "
                                          "from this checkpoint (",
                                          interrupted(other_network_checkpoint)),
    "truncated checkpoint": Case(TRAIN_RUN, "{tmp}/run/checkpoint.pt: checkpoint cannot be "
                                 "loaded safely",
                                 interrupted(truncate(Path("run/checkpoint.pt"), 1000))),
    "pickle payload checkpoint": Case(TRAIN_RUN, "{tmp}/run/checkpoint.pt: checkpoint cannot "
                                      "be loaded safely",
                                      interrupted(pickle_payload("run/checkpoint.pt"))),
    "measure a checkpoint of another network": Case(  # the run's net has 3 classes
        (*MEASURE, "{tmp}/run/checkpoint.pt", "--num-classes", "10"),
        "{tmp}/run/checkpoint.pt does not fit convnet with 10 classes and 1 input channels"),
    "measure a pickle payload": Case((*MEASURE, "{tmp}/evil.pt"),
                                     "{tmp}/evil.pt: checkpoint cannot be loaded safely",
                                     pickle_payload("evil.pt")),
}


def expand(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def assert_one_line_error(err: str, culprit: str) -> None:
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("nctools: error: "), err
    assert culprit in err, err


@pytest.mark.parametrize("name", list(CASES))
def test_cli_error(name, scratch, capsys, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(scratch)  # the default --out runs/NAME would land here
    if case.prepare is not None:
        case.prepare(scratch)
    before = tree_hashes(scratch)
    status = main([expand(arg, scratch) for arg in case.argv])
    out, err = capsys.readouterr()
    assert status == 2, err
    assert out == ""
    assert_one_line_error(err, expand(case.culprit, scratch))
    assert tree_hashes(scratch) == before  # nothing lost, nothing half-written, nothing new
    assert not (scratch / "marker").exists()  # no code from a checkpoint ever ran


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The control of the pickle cases: loading the payload unsafely does run its code."""
    pickle_payload("evil.pt")(tmp_path)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").read_text() == "code ran"


def test_another_config_is_refused_unless_resumed(scratch, capsys):
    """`--out` holding another run: refused as above; `--resume` continues it, saved config."""
    interrupted(bad_config("lr: 0.05", "lr: 0.1"))(scratch)
    assert main(["train", str(scratch / "bad.yaml"), "--out", str(scratch / "run")]) == 2
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(scratch / "run")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"run saved in {scratch / 'run'}"
    assert load_config(scratch / "run" / "config.yaml").train.lr == 0.05
    assert store.read_manifest(scratch / "run")["status"] == "completed"


# ----------------------------------------------------------------------------- the API

F = torch.arange(24, dtype=torch.float32).reshape(6, 4).sin()  # (N, D) = (6, 4)
Y = torch.tensor([0, 0, 1, 1, 2, 2])
W = torch.arange(12, dtype=torch.float32).reshape(3, 4).cos()  # (C, D) = (3, 4)
B = torch.zeros(3)
NAN = float("nan")


def with_nan(t: torch.Tensor, value: float = NAN) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t


# name -> (arguments of measure, the message it must match: the argument and the fault)
API_CASES: dict[str, tuple[dict, str]] = {
    "features 1-D": ({"features": F[:, 0]}, r"^features must be 2-D \(N, D\), got shape \(6,\)"),
    "features no rows": ({"features": F[:0], "labels": Y[:0]}, r"^features is empty"),
    "features no columns": ({"features": F[:, :0], "weight": W[:, :0]}, r"^features is empty"),
    "features a list": ({"features": F.tolist()}, r"^features must be a torch\.Tensor or "
                        r"numpy\.ndarray, got list"),
    "features NaN": ({"features": with_nan(F)}, r"^features contain NaN or Inf"),
    "features Inf": ({"features": with_nan(F, float("inf"))}, r"^features contain NaN or Inf"),
    "labels short": ({"labels": Y[:5]}, r"^labels has shape \(5,\) but features has 6 rows"),
    "labels 2-D": ({"labels": Y[:, None]}, r"^labels has shape \(6, 1\) but features has 6"),
    "labels float": ({"labels": Y.float()}, r"^labels must be integers, got dtype float32"),
    "labels too large": ({"labels": Y + 1}, r"^labels must lie in \[0, 3\).*from 1 to 3"),
    "labels negative": ({"labels": Y - 1}, r"^labels must lie in \[0, 3\).*from -1 to 1"),
    "labels a list": ({"labels": Y.tolist()}, r"^labels must be a torch\.Tensor"),
    "class with no samples": ({"labels": torch.tensor([0, 0, 0, 1, 1, 1])},
                              r"^labels: class 2 has no samples"),
    "weight wrong D": ({"weight": W[:, :3]}, r"^weight must have shape \(C, D\) with D = 4"),
    "weight 1-D": ({"weight": W[0]}, r"^weight must have shape \(C, D\)"),
    "weight Inf": ({"weight": with_nan(W, float("inf"))}, r"^weight contains NaN or Inf"),
    "weight numpy NaN": ({"weight": with_nan(W).numpy()}, r"^weight contains NaN or Inf"),
    "weight rows != num_classes": ({"num_classes": 4},
                                   r"^weight must have shape \(C, D\) with C = num_classes = 4"),
    "num_classes 1": ({"labels": torch.zeros(6, dtype=torch.long), "weight": W[:1],
                       "num_classes": 1}, r"^num_classes must be at least 2, got 1"),
    "bias shape": ({"bias": B[:2]}, r"^bias must have shape \(C,\) = \(3,\), got \(2,\)"),
    "bias NaN": ({"bias": with_nan(B)}, r"^bias contains NaN or Inf"),
    "bias a list": ({"bias": [0.0, 0.0, 0.0]}, r"^bias must be a torch\.Tensor"),
    "class_means shape": ({"class_means": W[:2]}, r"^class_means must have shape \(C, D\) = "
                          r"\(3, 4\), got \(2, 4\)"),
    "class_means NaN": ({"class_means": with_nan(W)}, r"^class_means contains NaN or Inf"),
}


def test_the_api_inputs_are_valid_without_their_fault():
    values = measure(F, Y, W, B, num_classes=3, class_means=W)
    assert all(np.isfinite(v) for v in values.values())


@pytest.mark.parametrize("name", list(API_CASES))
def test_measure_value_error(name):
    change, message = API_CASES[name]
    arguments = {"features": F, "labels": Y, "weight": W, "bias": B, **change}
    with pytest.raises(ValueError) as info:
        measure(**arguments)
    assert type(info.value) is ValueError  # not a subclass the caller could not expect
    assert re.search(message, str(info.value)), str(info.value)


# ----------------------------------------------------------------------------- real processes


SUBPROCESS_CASES = ("measure without files", "pickle payload checkpoint")


@pytest.fixture(scope="module", autouse=True)
def processes(finished, tmp_path_factory) -> dict[str, tuple[Path, dict, subprocess.Popen]]:
    """The cases run as `python -m nctools ...`, started before the first test of this file
    (their imports take seconds) and read at its end."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = {}
    for name in SUBPROCESS_CASES:
        tmp = tmp_path_factory.mktemp(re.sub(r"\W", "_", name))
        shutil.copytree(finished, tmp / "run")
        (tmp / "tiny.yaml").write_text(TINY)
        if CASES[name].prepare is not None:
            CASES[name].prepare(tmp)
        argv = [expand(arg, tmp) for arg in CASES[name].argv]
        started[name] = (tmp, tree_hashes(tmp), subprocess.Popen(
            [sys.executable, "-m", "nctools", *argv], cwd=tmp, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    yield started
    for _, _, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_error_in_a_real_process(name, processes):
    tmp, before, proc = processes[name]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert out == ""
    assert_one_line_error(err, expand(CASES[name].culprit, tmp))
    assert tree_hashes(tmp) == before
    assert not (tmp / "marker").exists()
