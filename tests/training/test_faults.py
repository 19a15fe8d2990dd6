"""Faults: SIGKILL and resume, Ctrl-C, a diverging loss, readers of a run being written,
damaged snapshots, a full or unwritable disk.

The kill test runs ``nctools train CONFIG --out RUN`` as a separate process and kills it
with SIGKILL at seeded moments: one at random, one during an epoch's steps, one inside a
snapshot write and one inside a checkpoint write (``NCTOOLS_FAULT_DELAY`` makes every
atomic write pause between its temp file and the rename, and the test kills while the
temp file exists); then Ctrl-C. After every kill nothing under a final name may be
partial, and the resumed run must end bit-identical to an uninterrupted one (history,
snapshots, checkpoint, metrics). The processes are forked from a server that imported
nctools once (imports cost more CPU than this training), then run ``nctools/__main__.py``
exactly as ``python -m nctools`` does.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import nctools.analysis.plots  # noqa: F401  (imported ahead: plot is timed against training)
from nctools.analysis import tables as analysis
from nctools.analysis.tables import analyze, read_table
from nctools.cli import main
from nctools.config.schema import load_config
from nctools.errors import RunError, SnapshotError
from nctools.metrics.measure import METRIC_KEYS
from nctools.runs import files, snapshots, store
from tests.helpers import tree_hashes

T = importlib.import_module("nctools.training.loop")

REPO = Path(__file__).resolve().parents[2]
SEED = 20260517  # the kill moments
EPOCHS = 6
STEPS_PER_EPOCH = 3  # 48 training images, batches of 16
CONFIG_YAML = f"""\
name: faults
seed: 1
data: {{dataset: synthetic, num_classes: 3, train_per_class: 16, test_per_class: 8,
       channels: 1, image_size: 8}}
model: {{arch: convnet, width: 4}}
train: {{epochs: {EPOCHS}, batch_size: 16, lr: 0.05, device: cpu}}
snapshot: {{epochs: all}}
"""
FAULT_DELAY = "0.1"  # seconds each atomic write pauses before its rename (kill window)
POLL = 0.005  # seconds between looks at the run directory: 20 looks per kill window
TEMP = ".*.tmp-*"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "faults.yaml"
    path.write_text(CONFIG_YAML)
    return path


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """An uninterrupted run (in this process) and its metrics table."""
    run = T.train(load_config(config_file), tmp_path_factory.mktemp("reference") / "run")
    return run, analyze(run)


# The training processes are forked from one server process that has imported nctools
# once (torch, torchvision and pandas take seconds of CPU per process); each child then
# runs nctools/__main__.py exactly as `python -m nctools train CONFIG --out RUN` does.
FORK_SERVER = """\
import json, os, runpy, sys, traceback
import nctools.cli  # the slow imports, once
for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        pid, status = os.waitpid(request["wait"], 0 if request["block"] else os.WNOHANG)
        print(os.waitstatus_to_exitcode(status) if pid else "", flush=True)
        continue
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.argv = ["nctools", *request["argv"]]
        runpy.run_module("nctools", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
"""


class Trainer:
    """One ``nctools train CONFIG --out RUN`` process (a child of :class:`ForkServer`)."""

    def __init__(self, server: ForkServer, pid: int, out: Path) -> None:
        self.server, self.pid, self.out = server, pid, out
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.wait(self.pid, block=False)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def communicate(self) -> tuple[str, str]:
        if self.returncode is None:
            self.returncode = self.server.wait(self.pid, block=True)
        return (self.out / "stdout").read_text(), (self.out / "stderr").read_text()

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        env = {**os.environ, "NCTOOLS_FAULT_DELAY": FAULT_DELAY, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.started = 0

    def _ask(self, request: dict) -> str:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def train(self, config: Path, run: Path) -> Trainer:
        self.started += 1
        out = self.folder / f"trainer-{self.started}"
        out.mkdir()
        pid = self._ask({"argv": ["train", str(config), "--out", str(run), "--quiet"],
                         "stdout": str(out / "stdout"), "stderr": str(out / "stderr")})
        return Trainer(self, int(pid), out)

    def wait(self, pid: int, block: bool) -> int | None:
        answer = self._ask({"wait": pid, "block": block})
        return int(answer) if answer else None

    def close(self) -> None:
        self.proc.communicate(input="")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not hasattr(os, "fork"):
        pytest.skip("the training processes are forked (POSIX)")
    server = ForkServer(tmp_path_factory.mktemp("trainers"))
    yield server
    server.close()


def wait_for(proc: Trainer, ready: Callable[[], bool], what: str,
             timeout: float = 120.0) -> None:
    """Poll until ``ready()``; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"training ended (status {proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(POLL)


def kill(proc: Trainer) -> None:
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def history_epochs(run: Path) -> list[int]:
    try:
        return store.read_history(run)["epoch"].tolist()
    except RunError:  # not yet written
        return []


def checkpoint_epoch(run: Path) -> int:
    return int(store.load_checkpoint(run / "checkpoint.pt")["epoch"])


def temps(run: Path) -> list[Path]:
    return sorted(run.rglob(TEMP))


def assert_nothing_partial(run: Path) -> None:
    """Every file under a final name is whole, and the run is consistent up to its
    checkpoint: each snapshot up to the checkpoint epoch is complete and verifies."""
    for path in sorted(run.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue  # temp files are not final names
        name = path.name
        if name.endswith(".safetensors"):
            load_file(path)  # a partial file does not parse
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name == "history.csv":
            store.read_history(run)
        elif name == "config.yaml":
            load_config(path)
        elif name == "checkpoint.pt":
            store.load_checkpoint(path)
        elif name == "metrics.csv":
            read_table(path)
        else:
            pytest.fail(f"unexpected file {path}")
    for epoch in snapshots.list_snapshots(run):
        snapshots.verify_snapshot(run, epoch)  # sha256 of every file against meta.json
    assert len(temps(run)) <= 1  # one write in flight at a time
    if (run / "checkpoint.pt").is_file():
        done = checkpoint_epoch(run)
        assert set(range(1, done + 1)) <= set(snapshots.list_snapshots(run))
        assert set(range(1, done + 1)) <= set(history_epochs(run))


def assert_same_run(run: Path, reference: Path) -> None:
    """History (but its seconds), snapshots and model bit for bit."""
    pd.testing.assert_frame_equal(store.read_history(run).drop(columns="seconds"),
                                  store.read_history(reference).drop(columns="seconds"))
    assert snapshots.list_snapshots(run) == snapshots.list_snapshots(reference) == list(
        range(1, EPOCHS + 1))
    for epoch in snapshots.list_snapshots(reference):
        for split in ("train", "test"):
            for a, b in zip(snapshots.load_split(run, epoch, split),
                            snapshots.load_split(reference, epoch, split), strict=True):
                assert torch.equal(a, b), (epoch, split)
        for a, b in zip(snapshots.load_classifier(run, epoch),
                        snapshots.load_classifier(reference, epoch), strict=True):
            assert torch.equal(a, b), epoch
    mine, theirs = (store.load_checkpoint(r / "checkpoint.pt")["model"] for r in (run, reference))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert store.read_manifest(run)["status"] == "completed"
    assert temps(run) == []  # the resumed runs deleted what the killed ones were writing


def same_metrics(table: pd.DataFrame, reference: pd.DataFrame, onset: bool = True) -> None:
    """The rows of ``table`` equal the reference's of the same epochs (the TPT onset
    column only when ``onset``: a run still training may not know it yet)."""
    keys = ["epoch", "split", "metric"]
    drop = ["run"] if onset else ["run", "tpt_onset_epoch"]
    got = table.drop(columns=drop).sort_values(keys).reset_index(drop=True)
    want = reference.drop(columns=drop).sort_values(keys).reset_index(drop=True)
    want = want[want["epoch"].isin(got["epoch"].unique())].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)


def stop_at_step(monkeypatch, step: int, action: Callable[[], None]) -> None:
    """Call ``action()`` when train_step is called for the ``step``-th time (1-based)."""
    real, calls = T.train_step, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", counted)


def interrupt() -> None:
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- kill and resume


def inode(path: Path) -> int | None:
    """Which file is under ``path`` now: atomic writes replace it with a new inode."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def test_sigkill_at_random_moments_then_resume_is_bit_identical(server, config_file, reference,
                                                                tmp_path, capsys):
    """SIGKILL at a random moment, between the writes of an epoch (during its steps), inside
    a snapshot write, inside a checkpoint write; then Ctrl-C, which must leave a resumable
    state and print the command that resumes it. Each process resumes the previous one."""
    ref_run, ref_table = reference
    rng = random.Random(SEED)
    run = tmp_path / "run"
    kills = []

    def killed(what: str) -> list[str]:
        kills.append((what, [p.name for p in temps(run)]))  # what was being written
        assert_nothing_partial(run)
        return kills[-1][1]

    # 1. a random moment of the first seconds of training
    proc = server.train(config_file, run)
    wait_for(proc, (run / "config.yaml").is_file, "the run directory")
    time.sleep(rng.uniform(0.2, 1.5))  # within epochs 0-2 (writes pause FAULT_DELAY each)
    kill(proc)
    killed("at random")

    # 2. during the steps of an epoch: just after this process wrote run.json (the last
    # write before the loop, and of every epoch) with the previous epoch done
    done = checkpoint_epoch(run)
    old_manifest = inode(run / "run.json")
    proc = server.train(config_file, run)
    wait_for(proc, lambda: inode(run / "run.json") != old_manifest
             and store.read_manifest(run)["epochs_done"] == done, "the start of the loop")
    kill(proc)
    killed(f"during epoch {done + 1}")

    # 3. inside the write of one file of a snapshot, 4. inside a checkpoint write
    for target in ("snapshot", "checkpoint"):
        done = checkpoint_epoch(run)
        epoch = rng.randint(done + 1, min(done + 2, EPOCHS - 1))
        folder = snapshots.snapshot_dir(run, epoch)
        if target == "snapshot":
            file = rng.choice(["train.safetensors", "test.safetensors",
                               "classifier.safetensors", "meta.json"])

            def ready(folder=folder, file=file) -> bool:
                return any(folder.glob(f".{file}.tmp-*"))
        else:  # after that epoch's history row and complete snapshot

            def ready(folder=folder, epoch=epoch) -> bool:
                return ((folder / "meta.json").is_file() and epoch in history_epochs(run)
                        and any(run.glob(".checkpoint.pt.tmp-*")))
            file = "checkpoint.pt"
        proc = server.train(config_file, run)
        wait_for(proc, ready, f"the {file} write of epoch {epoch}")
        kill(proc)
        assert any(name.startswith(f".{file}.tmp-") for name in killed(f"{file}, {epoch}"))
        if target == "checkpoint":
            assert checkpoint_epoch(run) == epoch - 1
        else:
            assert epoch not in snapshots.list_snapshots(run)  # meta.json comes last

    # 5. Ctrl-C during training: stops after the step, saves, says how to resume
    done = checkpoint_epoch(run)
    assert done <= EPOCHS - 2  # so that the Ctrl-C lands before the last epoch
    old_history = inode(run / "history.csv")  # may hold epoch done + 1 already
    proc = server.train(config_file, run)
    wait_for(proc, lambda: inode(run / "history.csv") != old_history
             and done + 1 in history_epochs(run), "a new epoch")  # the handler is on
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and out == ""
    stopped = store.read_manifest(run)
    assert stopped["status"] == "interrupted"
    assert stopped["epochs_done"] == checkpoint_epoch(run) == history_epochs(run)[-1] > done
    found = re.search(r"interrupted after epoch (\d+) of 6; resume with: (.+)$", err, re.M)
    assert found and int(found.group(1)) == stopped["epochs_done"], err
    command = shlex.split(found.group(2))
    assert command == ["nctools", "train", str(run / "config.yaml"), "--out", str(run)]
    assert err.rstrip().endswith("nctools: interrupted")
    assert_nothing_partial(run)

    assert main(command[1:]) == 0  # the printed command, in this process
    assert capsys.readouterr().out.splitlines()[-1] == f"run saved in {run}"
    assert_same_run(run, ref_run)
    same_metrics(analyze(run), ref_table)
    assert len(kills) == 4, kills


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_divergence_stops_naming_the_epoch_and_keeps_good_files(config_file, tmp_path,
                                                                monkeypatch, capsys, bad):
    run = tmp_path / "run"
    before: dict[str, str] = {}
    real = T.train_step
    calls = [0]

    def diverge(model, *args, **kwargs):
        calls[0] += 1
        loss, hits = real(model, *args, **kwargs)
        if calls[0] > 2 * STEPS_PER_EPOCH:
            with torch.no_grad():  # as a real blow-up: the weights go too
                for p in model.parameters():
                    p.fill_(bad)
            loss = torch.tensor(bad)
        return loss, hits

    real_diverged = T._diverged

    def files_then_diverged(state, epoch, row):
        state.writer.wait()  # epochs 1-2 are on disk (their writes overlap epoch 3)
        before.update(tree_hashes(run))
        real_diverged(state, epoch, row)

    monkeypatch.setattr(T, "train_step", diverge)
    monkeypatch.setattr(T, "_diverged", files_then_diverged)
    assert main(["train", str(config_file), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"nctools: error: training diverged at epoch 3 (train loss {bad}")
    assert f"the last good checkpoint is {run / 'checkpoint.pt'} (epoch 2)" in err
    after = tree_hashes(run)
    assert after.pop("run.json") != before.pop("run.json")  # status: diverged
    assert after == before  # checkpoint, snapshots, history, config: untouched
    assert store.read_manifest(run)["status"] == "diverged"
    assert checkpoint_epoch(run) == 2 and snapshots.list_snapshots(run) == [1, 2]


# ----------------------------------------------------------------------------- readers


def test_analyze_and_plot_while_training_see_complete_epochs_only(server, config_file,
                                                                  reference, tmp_path, capsys):
    _, ref_table = reference
    run = tmp_path / "run"
    proc = server.train(config_file, run)
    outcomes = {"table": 0, "none": 0, "plot": 0}
    seen: list[int] = []  # epochs in each table read while training
    try:
        while proc.poll() is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    table = analyze(run)
                except RunError as exc:
                    assert "has no snapshots" in str(exc) or "no run directory" in str(exc)
                    outcomes["none"] += 1
                    time.sleep(0.1)
                    continue
            assert not [w for w in caught if "skipping" in str(w.message)]
            complete = set(snapshots.list_snapshots(run))
            assert set(table["epoch"]) <= complete
            rows = table.groupby("epoch").size()
            keys = table["metric"].nunique()
            assert keys >= len(METRIC_KEYS)
            assert (rows == 2 * keys).all()  # both splits, every metric
            same_metrics(table, ref_table, onset=False)  # complete files only
            outcomes["table"] += 1
            seen.append(table["epoch"].nunique())
            if outcomes["table"] == 2:  # a figure too, once (matplotlib is slow)
                status = main(["plot", str(run), "--out", str(tmp_path / "collapse.png")])
                assert status == 0, capsys.readouterr().err
                outcomes["plot"] += 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0
    assert outcomes["table"] >= 2 and outcomes["plot"] == 1, outcomes
    assert min(seen) < EPOCHS  # some analyses really ran mid-run
    final = analyze(run)
    assert sorted(final["epoch"].unique()) == list(range(1, EPOCHS + 1))
    same_metrics(final, ref_table)


def test_a_snapshot_rewritten_while_measured_is_skipped_then_measured_again(
        reference, tmp_path, monkeypatch):
    """A resumed run rewrites the snapshots past its checkpoint (on a GPU not bit for
    bit): analyze must neither mix two versions nor keep the numbers of the old one."""
    run = Path(shutil.copytree(reference[0], tmp_path / "run"))
    (run / "metrics.csv").unlink()
    g = torch.Generator().manual_seed(0)
    features, labels = snapshots.load_split(run, 3, "train")
    test = snapshots.load_split(run, 3, "test")
    weight, bias = snapshots.load_classifier(run, 3)

    def rewrite_epoch_3(scale: float) -> None:
        noisy = scale * (features + 0.01 * torch.randn(features.shape, generator=g))
        snapshots.write_snapshot(run, 3, {"train": (noisy, labels), "test": test}, weight, bias)

    real = snapshots.load_classifier

    def rewrite_first(run_dir, epoch, verify=True):
        if epoch == 3 and not rewritten:  # epoch 3 was verified; now it is replaced
            rewritten.append(True)
            rewrite_epoch_3(1.0)
        return real(run_dir, epoch, verify)

    rewritten: list[bool] = []
    monkeypatch.setattr(snapshots, "load_classifier", rewrite_first)
    with pytest.warns(UserWarning, match=r"epoch 3: .*epoch-0003: rewritten while it was "
                                         r"measured"):
        table = analyze(run)
    assert sorted(table["epoch"].unique()) == [1, 2, 4, 5, 6]
    monkeypatch.undo()
    table = analyze(run)
    assert sorted(table["epoch"].unique()) == list(range(1, EPOCHS + 1))

    # a rewrite after the table was made: that epoch is measured again, the others kept
    time.sleep(0.01)
    rewrite_epoch_3(1.5)
    again = analyze(run)
    fresh = pd.DataFrame(analysis.measure_snapshot(run, 3))
    pd.testing.assert_series_equal(again.loc[again["epoch"] == 3, "value"].reset_index(drop=True),
                                   fresh["value"], check_names=False)
    assert not again.loc[again["epoch"] == 3, "value"].equals(
        table.loc[table["epoch"] == 3, "value"])
    pd.testing.assert_frame_equal(again[again["epoch"] != 3], table[table["epoch"] != 3])


def test_a_damaged_snapshot_is_named_and_the_other_epochs_analyzed(reference, tmp_path,
                                                                  capsys):
    ref_run, ref_table = reference
    run = Path(shutil.copytree(ref_run, tmp_path / "run"))
    (run / "metrics.csv").unlink()
    truncated = snapshots.snapshot_dir(run, 2) / "train.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    altered = snapshots.snapshot_dir(run, 4) / "classifier.safetensors"
    data = bytearray(altered.read_bytes())
    data[-3] ^= 0x01  # same size, one bit of a weight
    altered.write_bytes(bytes(data))

    assert main(["analyze", str(run), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"nctools: error: {truncated}: snapshot file is corrupt (truncated")
    assert not (run / "metrics.csv").exists()

    assert main(["analyze", str(run)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"nctools: warning: skipping the snapshot of epoch 2: {truncated}: snapshot file is "
        f"corrupt (truncated or overwritten: {truncated.stat().st_size} bytes, meta.json "
        f"says {truncated.stat().st_size + 7})",
        *[line for line in err[1:] if line.startswith(
            f"nctools: warning: skipping the snapshot of epoch 4: {altered}: snapshot file "
            "is corrupt (sha256 ")],
    ]
    assert len(err) == 2
    table = read_table(run / "metrics.csv")
    assert sorted(table["epoch"].unique()) == [1, 3, 5, 6]
    same_metrics(table, ref_table)
    for reader in (lambda: snapshots.load_split(run, 2, "train"),
                   lambda: list(snapshots.iter_split(run, 2, "train")),
                   lambda: snapshots.load_classifier(run, 4)):
        with pytest.raises(SnapshotError, match=re.escape(f"{run}/snapshots/epoch-000")):
            reader()


# ----------------------------------------------------------------------------- disk problems


def settle_writes() -> None:
    """Let the files of the epochs trained so far reach the disk: nctools.training.loop writes
    each epoch's history, checkpoint and manifest while the next epoch trains."""
    for thread in threading.enumerate():
        if thread.name == "nctools-writer":
            thread.join()


def full_disk_at(monkeypatch, name: str, epoch: int | None = None) -> list[Path]:
    """From now on, the write of ``name`` (at ``epoch``'s snapshot, if given) fills the
    disk: some bytes reach the temp file, then ENOSPC. Returns the paths that failed."""
    real, failed = files.atomic_write, []

    def write(path, writer, sync_dir=True):
        path = Path(path)
        hit = path.name == name and (epoch is None or path.parent.name == f"epoch-{epoch:04d}")

        def filling(tmp: Path) -> None:
            writer(tmp)
            if hit:
                failed.append(path)
                with open(tmp, "r+b") as f:
                    f.truncate(max(1, tmp.stat().st_size // 2))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        real(path, filling, sync_dir)

    monkeypatch.setattr(files, "atomic_write", write)
    return failed


@pytest.mark.parametrize(("name", "epoch"), [
    ("history.csv", None), ("test.safetensors", 3), ("meta.json", 3), ("checkpoint.pt", None),
])
def test_a_full_disk_stops_training_naming_the_file_and_resume_recovers(
        config_file, reference, tmp_path, monkeypatch, capsys, name, epoch):
    run = tmp_path / "run"
    before: dict[str, str] = {}
    failed: list[list[Path]] = []

    def fill_disk() -> None:  # epochs 1-2 are on disk; the disk fills during epoch 3
        settle_writes()
        before.update(tree_hashes(run))
        failed.append(full_disk_at(monkeypatch, name, epoch))

    stop_at_step(monkeypatch, 2 * STEPS_PER_EPOCH + 1, fill_disk)
    assert main(["train", str(config_file), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    path = run / name if epoch is None else snapshots.snapshot_dir(run, epoch) / name
    assert err == f"nctools: error: cannot write {path}: No space left on device\n"
    assert failed[0] == [path]  # the first write of that file after the disk filled
    manifest = store.read_manifest(run)  # not "running": the run stopped, and says why
    assert manifest["status"] == "failed" and manifest["error"] == err[16:-1]
    assert temps(run) == []  # the half-written temp file is gone
    assert_nothing_partial(run)
    after = tree_hashes(run)
    assert after["checkpoint.pt"] == before["checkpoint.pt"]  # epoch 2's, whole
    for key in before:
        if key.startswith(("snapshots/epoch-0001", "snapshots/epoch-0002", "config.yaml")):
            assert after[key] == before[key], key
    monkeypatch.undo()  # space freed: the same command resumes
    assert main(["train", str(config_file), "--out", str(run)]) == 0
    assert_same_run(run, reference[0])


def interrupted_in_epoch_3(config_file, run, monkeypatch, capsys) -> dict[str, str]:
    """Train ``run`` until Ctrl-C in epoch 3 (two epochs saved), then undo the stop and
    clear the output; the run's file hashes."""
    stop_at_step(monkeypatch, 2 * STEPS_PER_EPOCH + 1, interrupt)
    assert main(["train", str(config_file), "--out", str(run)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    return tree_hashes(run)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_real_write_failure_in_torch_save_is_one_line(config_file, reference, tmp_path,
                                                       monkeypatch, capsys):
    """The kernel refuses the checkpoint's bytes (file size limit, as a full disk would):
    the failed write (of the bytes torch.save serialised at the epoch end) must become one
    line naming the checkpoint, and the previous checkpoint stays whole."""
    import resource
    run = tmp_path / "run"
    before = interrupted_in_epoch_3(config_file, run, monkeypatch, capsys)
    size = (run / "checkpoint.pt").stat().st_size
    assert all(p.stat().st_size < size // 2 for p in run.rglob("*.safetensors"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        status = main(["train", str(config_file), "--out", str(run)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"nctools: error: cannot write {run / 'checkpoint.pt'}: "), err
    assert temps(run) == []
    assert tree_hashes(run)["checkpoint.pt"] == before["checkpoint.pt"]
    assert_nothing_partial(run)
    assert main(["train", str(config_file), "--out", str(run)]) == 0
    assert_same_run(run, reference[0])


def test_an_unwritable_run_directory_fails_before_touching_the_run(config_file, tmp_path,
                                                                  monkeypatch, capsys):
    """A read-only folder, simulated (chmod does not stop root): every write is refused."""
    run = tmp_path / "run"
    before = interrupted_in_epoch_3(config_file, run, monkeypatch, capsys)
    real = files.atomic_write

    def read_only(path, writer, *rest):
        def denied(tmp: Path) -> None:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp))
        real(path, denied, *rest)

    monkeypatch.setattr(files, "atomic_write", read_only)
    assert main(["train", str(config_file), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == f"nctools: error: cannot write {run / 'history.csv'}: Permission denied\n"
    assert tree_hashes(run) == before

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.undo()
    assert main(["train", str(config_file), "--out", str(blocked / "run")]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: cannot write {blocked / 'run' / 'config.yaml'}: Not a directory\n")
    assert blocked.read_text() == "not a folder"
