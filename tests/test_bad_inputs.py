"""A catalogue of bad inputs: config files, command lines, damaged run files, the API.

Every command-line case runs ``nctools.cli.main(argv)`` in this process and checks the
contract of errors.py: exit status 2, exactly one stderr line ``nctools: error: ...``
naming the culprit (file, key or argument), no traceback, and nothing on disk changed
(the sha256 of every file of the scratch folder, before and after). Two cases also run
as real ``python -m nctools`` processes. Every ValueError of ``nctools.metrics.measure`` is
checked for its class and for the argument it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

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
    "unknown network": Case(TRAIN_BAD, "model.arch: 'alexnet': unknown network; choose one of",
                            bad_config("arch: convnet", "arch: alexnet")),
    "bad snapshot schedule": Case(TRAIN_BAD, "{tmp}/bad.yaml: snapshot.epochs: expected 'all', "
                                  "'log:K', 'papyan' or a list of ints, got 'weekly'",
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
                                  "the following arguments are required: --dataset"),
    "measure --arch without --checkpoint": Case(
        ("measure", "--arch", "convnet", "--dataset", "mnist5k"), "--arch needs --checkpoint FILE"
    ),
    "measure without a network": Case(("measure", "--dataset", "mnist5k"),
                                      "one of the arguments --arch --model is required"),
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
        (*MEASURE, "{tmp}/run/checkpoint.pt", "--num-classes", "2"),
        "{tmp}/run/checkpoint.pt does not fit convnet with 2 classes and 1 input channels"),
    "measure a pickle payload": Case((*MEASURE, "{tmp}/evil.pt"),
                                     "{tmp}/evil.pt: checkpoint cannot be loaded safely",
                                     pickle_payload("evil.pt")),
}


def a_fifo(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        os.mkfifo(tmp / name)
    return make


def a_dangling_link(tmp: Path) -> None:
    (tmp / "dangling").symlink_to(tmp / "nowhere")


def a_folder(name: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).mkdir()
    return make


def rename_folder(epoch: int, name: str, copy: bool = False) -> Callable[[Path], None]:
    """Move (or copy) the snapshot folder of ``epoch`` to ``snapshots/name``."""
    def move(tmp: Path) -> None:
        source = tmp / snapshot_file(epoch, "")
        (shutil.copytree if copy else shutil.move)(source, source.parent / name)
    return move


def link_folder(epoch: int, to_epoch: int) -> Callable[[Path], None]:
    """Replace the snapshot folder of ``epoch`` by a link to that of ``to_epoch``."""
    def link(tmp: Path) -> None:
        shutil.rmtree(tmp / snapshot_file(epoch, ""))
        (tmp / snapshot_file(epoch, "")).symlink_to(f"epoch-{to_epoch:04d}")
    return link


def link_file(relative: Path, target: str) -> Callable[[Path], None]:
    def link(tmp: Path) -> None:
        (tmp / relative).unlink()
        (tmp / relative).symlink_to(target)
    return link


def rename_in_meta(epoch: int, old: str, new: str, split: str = "train"):
    def change(meta: dict) -> None:
        meta["files"][new] = meta["files"].pop(old)
        meta["splits"][split]["files"] = [new]
    return edit_meta(epoch, change)


def rewrite_split(epoch: int, split: str, change: Callable[[dict], None]):
    """Change a split's tensors and give meta.json the new checksum: damage that only the
    values can tell (what a faulty network or a buggy writer would leave)."""
    def write(tmp: Path) -> None:
        path = tmp / snapshot_file(epoch, f"{split}.safetensors")
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path)
        entry = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                 "bytes": path.stat().st_size}
        edit_meta(epoch, lambda meta: meta["files"].update({path.name: entry}))(tmp)
    return write


def nan_feature(tensors: dict) -> None:
    tensors["features"][2, 1] = float("nan")


def label_out_of_range(tensors: dict) -> None:
    tensors["labels"][0] = 7


# Damaged snapshots: a one-line error with --strict; skipped with one warning line without.
SNAPSHOT_DAMAGE: dict[str, tuple[Callable[[Path], None], str, set[int]]] = {
    # name: (damage, culprit, the epochs analysed without --strict)
    "renamed epoch folder": (rename_folder(1, "epoch-0007"), "{tmp}/run/snapshots/epoch-0007/"
                             "meta.json: snapshot meta is corrupt (it was written at epoch 1, "
                             "but its folder is epoch-0007", {2, 3}),
    "duplicate epoch folder": (rename_folder(1, "epoch-00001", copy=True),
                               "{tmp}/run/snapshots/epoch-00001: not the name of a snapshot "
                               "folder", {1, 2, 3}),
    "epoch folder a link": (link_folder(2, 1), "{tmp}/run/snapshots/epoch-0002: is a symbolic "
                            "link to epoch-0001", {1, 3}),
    "split read from another file": (rename_in_meta(2, "train.safetensors", "test.safetensors"),
                                     "the 'train' split names the file 'test.safetensors', not "
                                     "its own", {1, 3}),
    "file name leaving the folder": (rename_in_meta(3, "train.safetensors", "../../x"),
                                     "file name '../../x' is not a plain name inside the "
                                     "snapshot folder", {1, 2}),
    "snapshot file linked to /dev/zero": (link_file(snapshot_file(2, "train.safetensors"),
                                                    "/dev/zero"),
                                          "{tmp}/run/snapshots/epoch-0002/train.safetensors: "
                                          "snapshot file is not a regular file", {1, 3}),
    "NaN features, valid checksums": (rewrite_split(2, "test", nan_feature),
                                      "{tmp}/run/snapshots/epoch-0002: the test split cannot be "
                                      "measured (features contain NaN or Inf", {1, 3}),
    "labels out of range, valid checksums": (rewrite_split(1, "train", label_out_of_range),
                                             "{tmp}/run/snapshots/epoch-0001: the train split "
                                             "cannot be measured (labels must lie in [0, 3)",
                                             {2, 3}),
}
CASES.update({f"--strict: {name}": Case(STRICT, culprit, damage)
              for name, (damage, culprit, _) in SNAPSHOT_DAMAGE.items()})


# The second catalogue: inputs that gave a traceback, a hang or a silent default.
CASES.update({
    "config not UTF-8": Case(TRAIN_BAD, "{tmp}/bad.yaml: config file is not UTF-8 text",
                             overwrite("bad.yaml", b"name: caf\xe9\n")),
    "config a FIFO": Case(("train", "{tmp}/pipe.yaml"), "{tmp}/pipe.yaml: cannot read config "
                          "file (not a regular file)", a_fifo("pipe.yaml")),
    "config a folder": Case(("train", "{tmp}/conf.yaml"), "{tmp}/conf.yaml: cannot read config "
                            "file (a directory)", a_folder("conf.yaml")),
    "seed too large": Case((*TRAIN_RUN, "--set", "seed=99999999999999999999999"),
                           "seed: must be in [0, 4294967295], got 99999999999999999999999"),
    "epochs too many": Case((*TRAIN_RUN, "--set", "train.epochs=1000000000000"),
                            "train.epochs: must be <= 1000000, got 1000000000000"),
    "image size beyond memory": Case(
        (*TRAIN_BAD[:2], "--out", "{tmp}/new", "--set", "data.image_size=100000"),
        "data: 39 synthetic images of 1x100000x100000 float32 would need",
        bad_config("name: tiny", "name: tiny")),
    "name with a path": Case(("train", "{tmp}/bad.yaml"), "{tmp}/bad.yaml: name: must be a "
                             "plain folder name", bad_config("name: tiny", "name: ../../x")),
    "--out empty": Case(("train", "{tmp}/tiny.yaml", "--out", ""), "--out: empty path"),
    "plot --out empty": Case(("plot", "{tmp}/run", "--out", ""), "--out: empty path"),
    "--out a file": Case(("train", "{tmp}/tiny.yaml", "--out", "{tmp}/afile"),
                         "{tmp}/afile: is a file, not a run folder", a_file),
    "--out a dangling link": Case(("train", "{tmp}/tiny.yaml", "--out", "{tmp}/dangling"),
                                  "{tmp}/dangling: is a symbolic link to {tmp}/nowhere, which "
                                  "does not exist", a_dangling_link),
    "measure --batch-size 0": Case((*MEASURE, "{tmp}/run/checkpoint.pt", "--batch-size", "0"),
                                   "--batch-size: must be an int >= 1, got 0"),
    "measure --batch-size -5": Case((*MEASURE, "{tmp}/run/checkpoint.pt", "--batch-size",
                                     "-5"), "--batch-size: must be an int >= 1, got -5"),
    "measure --num-classes 0": Case((*MEASURE, "{tmp}/run/checkpoint.pt", "--num-classes",
                                     "0"), "--num-classes: must be an int >= 2, got 0"),
    "measure --num-classes huge": Case(
        (*MEASURE, "{tmp}/run/checkpoint.pt", "--num-classes", "100000000000"),
        "--num-classes 100000000000: more than the 3 classes of --dataset synthetic"),
    "measure a checkpoint folder": Case((*MEASURE, "{tmp}/ckpt"),
                                        "{tmp}/ckpt: is a directory, not a checkpoint file",
                                        a_folder("ckpt")),
    "more epochs without --resume": Case(
        (*TRAIN_RUN, "--set", "train.epochs=5"), "{tmp}/run holds a run of another config "
        "(train.epochs: 3 -> 5); use another --out, or continue it with its saved config: "
        "`nctools train --resume --out {tmp}/run` (add --set train.epochs=N to extend it)"),
    "fewer epochs with --resume": Case(
        ("train", "--resume", "--out", "{tmp}/run", "--set", "train.epochs=2"),
        "(train.epochs: 3 -> 2 (a run can be extended, not shortened))"),
    "measure a checkpoint FIFO": Case((*MEASURE, "{tmp}/ckpt"),
                                      "{tmp}/ckpt: not a regular file, not a checkpoint",
                                      a_fifo("ckpt")),
})


def logged_run(logs: Callable[[Path], None]) -> Callable[[Path], None]:
    """The run logs to TensorBoard (``train.loggers`` in its config.yaml), and ``logs(RUN/logs)``
    puts something there that cannot take the logger's files."""
    def prepare(tmp: Path) -> None:
        run = tmp / "run"
        config = load_config(run / "config.yaml")
        store.save_config(replace(config, train=replace(config.train, loggers=["tensorboard"])),
                          run / "config.yaml")
        logs(run / "logs")
    return prepare


def link_to_nowhere(path: Path) -> None:
    path.symlink_to(path.parent.parent / "nowhere")


def a_file_at(path: Path) -> None:
    path.write_text("a file where the loggers' folder should be")


# The third catalogue: a logs folder that cannot take the loggers' files is refused before
# the run folder changes (once: config.yaml rewritten, run.json left saying "running").
EXTEND = ("train", "--resume", "--out", "{tmp}/run", "--set", "train.epochs=5")
DANGLING_LOGS = "{tmp}/run/logs: is a symbolic link to {tmp}/nowhere, which does not exist"
CASES.update({
    "logs a dangling link, extending a run": Case(EXTEND, DANGLING_LOGS,
                                                  logged_run(link_to_nowhere)),
    "logs a dangling link, resuming a run": Case(
        ("train", "--resume", "--out", "{tmp}/run"), DANGLING_LOGS,
        interrupted(logged_run(link_to_nowhere))),
    "logs a file": Case(EXTEND, "{tmp}/run/logs: is a file, not a folder",
                        logged_run(a_file_at)),
})


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
    assert "resume=True" not in err  # the Python argument, not the command line's
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
    # the second catalogue (regressions: each once a TypeError, a torch name, or silence)
    "labels numpy float": ({"labels": Y.numpy().astype(np.float64)},
                           r"^labels must be integers, got dtype float64$"),
    "labels numpy float32 big-endian": ({"labels": Y.numpy().astype(">f4")},
                                        r"^labels must be integers, got dtype float32$"),
    "features complex big-endian": ({"features": F.numpy().astype(">c8")},
                                    r"^features must be floating point, got dtype complex64"),
    "num_classes a float": ({"num_classes": 3.0}, r"^num_classes must be an int, got 3\.0"),
    "num_classes a string": ({"num_classes": "3"}, r"^num_classes must be an int, got '3'"),
    "num_classes True": ({"num_classes": True}, r"^num_classes must be an int, got True"),
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


# ----------------------------------------------------------------------------- second catalogue
# Outcomes other than an error: a quiet exit, strict JSON, a warning beside a correct table.


class _ClosedPipe:
    """stdout whose reader has gone (`nctools analyze RUN | head -1`)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise OSError("no descriptor")


def test_a_closed_pipe_ends_quietly(scratch, capsys, monkeypatch):
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    status = main(["analyze", str(scratch / "run")])
    monkeypatch.undo()
    assert status == 141  # 128 + SIGPIPE, as a Unix tool the pipe ended
    assert capsys.readouterr().err == ""  # no "nctools: error: [Errno 32] Broken pipe"


def test_measure_json_writes_null_for_nan(capsys, monkeypatch):
    values = {"accuracy": 0.75, "nc1": float("nan"), "self_duality": float("inf")}
    monkeypatch.setattr("nctools.cli.measure_arch.measure", lambda args: values)
    assert main([*MEASURE, "model.pt", "--json"]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    parsed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert parsed == {"accuracy": 0.75, "nc1": None, "self_duality": None}


@pytest.mark.parametrize("garbage", [b"3,a,b,c,d,e,f\n", b"garbage,x,y\n"])
def test_a_garbage_history_row_warns_and_keeps_the_metrics(scratch, capsys, garbage):
    """analyze measures the snapshots (they do not depend on history.csv) and says, in one
    warning line, why the history columns are empty."""
    assert main(["analyze", str(scratch / "run")]) == 0
    good = pd.read_csv(scratch / "run" / "metrics.csv")
    (scratch / "run" / "metrics.csv").unlink()
    with open(scratch / "run" / "history.csv", "ab") as f:
        f.write(garbage)
    capsys.readouterr()
    assert main(["analyze", str(scratch / "run")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("nctools: warning: ") and err.count("\n") == 1, err
    assert f"{scratch / 'run' / 'history.csv'}: history is corrupt" in err
    table = pd.read_csv(scratch / "run" / "metrics.csv")
    assert table["value"].tolist() == good["value"].tolist()
    assert table["train_loss"].isna().all()


@pytest.fixture(scope="module")
def full_table(finished, tmp_path_factory) -> pd.DataFrame:
    """The metrics table of the undamaged finished run."""
    run = tmp_path_factory.mktemp("full") / "run"
    shutil.copytree(finished, run)
    assert main(["analyze", str(run)]) == 0
    return pd.read_csv(run / "metrics.csv")


@pytest.mark.parametrize("name", list(SNAPSHOT_DAMAGE))
def test_a_bad_snapshot_is_skipped_with_one_warning(name, scratch, full_table, capsys):
    damage, culprit, kept = SNAPSHOT_DAMAGE[name]
    damage(scratch)
    capsys.readouterr()
    assert main(["analyze", str(scratch / "run")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("nctools: warning: ") and err.count("\n") == 1, err
    assert expand(culprit, scratch) in err
    table = pd.read_csv(scratch / "run" / "metrics.csv")
    assert set(table["epoch"]) == kept  # every other epoch measured, none twice
    assert len(table) == len(full_table[full_table["epoch"].isin(kept)])
    expected = full_table[full_table["epoch"].isin(kept)].reset_index(drop=True)
    assert table["value"].equals(expected["value"])


def test_a_renamed_run_stays_one_run(scratch, full_table, capsys):
    """Analysed under one name (epochs 1-2), renamed, analysed again: one run, every row
    under its current name, the numbers those of one analysis."""
    run = scratch / "run"
    assert main(["analyze", str(run)]) == 0
    table = pd.read_csv(run / "metrics.csv")
    (run / "metrics.csv").write_text(table[table["epoch"] < 3].to_csv(index=False))
    run.rename(scratch / "run-renamed")
    assert main(["analyze", str(scratch / "run-renamed")]) == 0
    table = pd.read_csv(scratch / "run-renamed" / "metrics.csv")
    assert set(table["run"]) == {"run-renamed"}
    assert table.drop(columns="run").equals(full_table.drop(columns="run"))


def test_the_run_id_survives_a_resume(scratch, capsys):
    run = scratch / "run"
    first = store.read_manifest(run)["run_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    interrupted()(scratch)
    shutil.move(run, scratch / "moved")
    assert main(["train", "--resume", "--out", str(scratch / "moved")]) == 0
    assert store.read_manifest(scratch / "moved")["run_id"] == first


def test_ctrl_c_in_analyze_keeps_the_finished_snapshots(scratch, full_table, capsys,
                                                        monkeypatch):
    from nctools.analysis import tables

    real = tables.measure_snapshot

    def measure_until_3(run_dir, epoch, *args, **kwargs):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(run_dir, epoch, *args, **kwargs)

    monkeypatch.setattr(tables, "measure_snapshot", measure_until_3)
    assert main(["analyze", str(scratch / "run")]) == 130
    kept = pd.read_csv(scratch / "run" / "metrics.csv")
    assert set(kept["epoch"]) == {1, 2}
    assert kept.equals(full_table[full_table["epoch"] < 3].reset_index(drop=True))
    monkeypatch.undo()
    assert main(["analyze", str(scratch / "run")]) == 0  # goes on from there
    assert pd.read_csv(scratch / "run" / "metrics.csv").equals(full_table)


def capture_plots(monkeypatch) -> list:
    """Stand-in for plot_runs: records the tables `nctools plot` would draw."""
    drawn: list = []

    def plot_runs(tables, out, panels=None, *, hue=None, epoch_axis="auto"):
        drawn.append((tables, out))
        return out

    monkeypatch.setattr("nctools.analysis.plots.plot_runs", plot_runs)
    return drawn


def test_plot_brings_a_stale_table_up_to_date(scratch, full_table, capsys, monkeypatch):
    run = scratch / "run"
    stale = full_table[full_table["epoch"] < 3]  # analysed while the run was at epoch 2
    (run / "metrics.csv").write_text(stale.to_csv(index=False))
    drawn = capture_plots(monkeypatch)
    assert main(["plot", str(run)]) == 0
    [(tables, out)] = drawn
    assert out == run / "figures" / "collapse.png"
    assert tables[0].equals(full_table)  # all three epochs, not the stale two
    assert pd.read_csv(run / "metrics.csv").equals(full_table)


def read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` look read-only to nctools (root may write anywhere, so chmod cannot)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == folder.resolve():
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_run_is_analysed_in_memory(scratch, full_table, capsys, monkeypatch):
    run = scratch / "run"
    read_only(monkeypatch, run)
    before = tree_hashes(scratch)
    assert main(["analyze", str(run)]) == 0
    out, err = capsys.readouterr()
    rows = len(full_table)  # every metric of every snapshot, measured again in memory
    assert out.startswith(f"{run} is read-only: {rows} rows measured in memory, not saved\n")
    assert err == f"nctools: warning: {run} is read-only: metrics.csv was not updated (the " \
                  "table was computed in memory)\n"
    assert tree_hashes(scratch) == before


def test_a_read_only_run_is_plotted_elsewhere(scratch, full_table, capsys, monkeypatch):
    run = scratch / "run"
    read_only(monkeypatch, run)
    before = tree_hashes(scratch)
    assert main(["plot", str(run)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{run} is read-only: give the figure a "
                          "place elsewhere with --out FILE")
    drawn = capture_plots(monkeypatch)
    assert main(["plot", str(run), "--out", str(scratch / "fig.png")]) == 0
    [(tables, out)] = drawn
    assert out == scratch / "fig.png" and tables[0].equals(full_table)
    assert tree_hashes(scratch) == before


def test_runs_of_one_name_get_distinct_legend_labels(scratch, full_table, capsys,
                                                      monkeypatch):
    from nctools.analysis.plots import collapse_figure

    for folder in ("a", "b"):
        (scratch / folder).mkdir()
        shutil.copytree(scratch / "run", scratch / folder / "run")
        (scratch / folder / "run" / "metrics.csv").write_text(full_table.to_csv(index=False))
    drawn = capture_plots(monkeypatch)
    assert main(["plot", str(scratch / "a" / "run"), str(scratch / "b" / "run"),
                 "--out", str(scratch / "fig.png")]) == 0
    [(tables, _)] = drawn
    figure = collapse_figure(tables)
    labels = [t.get_text() for t in figure.legends[0].get_texts()][:2]
    assert labels == [f"synthetic / convnet ({scratch / 'a' / 'run'})",
                      f"synthetic / convnet ({scratch / 'b' / 'run'})"]
    # the same table twice (no paths to tell them apart): numbered
    figure = collapse_figure([full_table, full_table])
    labels = [t.get_text() for t in figure.legends[0].get_texts()][:2]
    assert labels == ["synthetic / convnet (run) [1]", "synthetic / convnet (run) [2]"]


# ClassStats.update refuses what measure refuses, and adds nothing then.
STATS_CASES: dict[str, tuple[object, object, str]] = {
    "float labels": (F, torch.tensor([0.0, 0.9999, 1, 1, 2, 2]),
                     r"^labels must be integers, got dtype float32$"),
    "numpy float labels": (F, np.array([0.0, 0.9999, 1, 1, 2, 2]),
                           r"^labels must be integers, got dtype float64$"),
    "NaN features": (with_nan(F), Y, r"^features contain NaN or Inf"),
    "Inf features": (with_nan(F, float("inf")), Y, r"^features contain NaN or Inf"),
    "labels out of range": (F, Y + 1, r"^labels must lie in \[0, 3\)"),
    "integer features": (F.long(), Y, r"^features must be floating point, got dtype int64"),
}


@pytest.mark.parametrize("name", list(STATS_CASES))
def test_class_stats_refuses_what_measure_refuses(name):
    from nctools.metrics.stats import ClassStats

    features, labels, message = STATS_CASES[name]
    stats = ClassStats(3, 4)
    with pytest.raises(ValueError) as info:
        stats.update(features, labels)
    assert type(info.value) is ValueError
    assert re.search(message, str(info.value)), str(info.value)
    assert stats.num_samples == 0 and not stats.sums.any()  # nothing was added


def test_big_endian_arrays_measure_as_native_ones():
    native = measure(F, Y, W, B, num_classes=3)
    swapped = measure(F.numpy().astype(">f4"), Y.numpy().astype(">i8"), W.numpy().astype(">f4"),
                      B.numpy().astype(">f4"), num_classes=3)
    assert swapped == native


@pytest.mark.parametrize(("first", "again", "message"), [
    (0, 0, r"^chunks yielded no rows: .*an exhausted iterator"),
    (6, 0, r"^chunks yielded 6 rows on the first pass and 0 on the second"),
])
def test_an_exhausted_chunk_iterator_is_named(first, again, message):
    from nctools.metrics.inputs import check_pass_rows

    check_pass_rows(6, 6)
    with pytest.raises(ValueError, match=message):
        check_pass_rows(first, again)


# ------------------------------------------------------------- folder:PATH image folders


def _image_classes(folder: Path, names: str) -> None:
    from PIL import Image

    for name in names:
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(folder / name / f"{i}.png")


FOLDER_MEASURE = ("measure", "--model", "tests.helpers:make_net", "--num-classes", "3")


def test_measure_a_flat_folder_test_split_is_refused(tmp_path, capsys):
    """A folder without train/ and val/ holds training images only: --split test would
    measure them as test images."""
    _image_classes(tmp_path / "flat", "abc")
    assert main([*FOLDER_MEASURE, "--dataset", f"folder:{tmp_path / 'flat'}", "--split",
                 "test"]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: --split test: folder:{tmp_path / 'flat'} has no train/ and val/ "
        "folders, so no test images (its images are the training split); measure --split "
        "train, or give it train/ and val/ class folders\n")


def test_measure_folder_errors_are_one_line_naming_the_culprit(tmp_path, capsys):
    """A val/ lacking a class names it and the folder; an unreadable image names the file
    (not a DataLoader worker's traceback); an empty folder: path is not the current folder."""
    _image_classes(tmp_path / "split" / "train", "abc")
    _image_classes(tmp_path / "split" / "val", "ac")
    _image_classes(tmp_path / "bad" / "train", "abc")
    bad = tmp_path / "bad" / "train" / "c" / "1.png"
    bad.write_bytes(b"GIF89a but not really")
    cases = [
        (("--dataset", f"folder:{tmp_path / 'split'}", "--split", "test"),
         f"--dataset folder:{tmp_path / 'split'}: class 'b' (class 1) has no samples in "
         f"{tmp_path / 'split' / 'val'} (1 of 3 classes missing there: b)"),
        (("--dataset", f"folder:{tmp_path / 'bad'}"),
         f"{bad}: cannot read image (not an image format PIL knows)"),
        (("--dataset", "folder:"),
         "--dataset folder:: empty path; give folder:PATH, a folder of class folders (or of "
         "train/ and val/)"),
    ]
    for argv, message in cases:
        assert main([*FOLDER_MEASURE, *argv]) == 2, argv
        assert capsys.readouterr().err == f"nctools: error: {message}\n"


def test_measure_a_folder_counts_its_classes(tmp_path, capsys):
    """--num-classes is the number of class folders unless given; a different one is refused."""
    _image_classes(tmp_path / "imgs", "abc")
    base = ("measure", "--model", "tests.helpers:make_net", "--dataset",
            f"folder:{tmp_path / 'imgs'}", "--json")
    assert main(list(base)) == 0
    inferred = json.loads(capsys.readouterr().out)
    assert main([*base, "--num-classes", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == inferred
    assert main([*base, "--num-classes", "4"]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: --num-classes 4: --dataset folder:{tmp_path / 'imgs'} has 3 class "
        "folders\n")
