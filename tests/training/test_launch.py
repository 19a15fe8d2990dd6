"""Sweeps through submitit's local executor: a grid of tiny synthetic runs, each an
ordinary resumable run directory, collected into one table and plotted; a job killed
mid-run (the signal Slurm sends before a time limit) is requeued and resumes bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nctools.analysis.collect import best, collect, write_table
from nctools.analysis.plots import collapse_figure
from nctools.config.schema import load_config
from nctools.errors import ConfigError, RunError
from nctools.runs import store
from nctools.runs.layout import SUBMITIT_DIR, SWEEP_FILE, SWEEP_RUNS_DIR
from nctools.runs.store import save_config
from nctools.runs.sweeps import record_sweep
from nctools.training import launch as S
from nctools.training.loop import train
from tests import helpers

ROOT = Path(__file__).resolve().parents[2]
LRS = [0.01, 0.02, 0.05]


@pytest.fixture(autouse=True)
def worktree_on_path(monkeypatch):
    """The job processes import this nctools, whatever folder they start in."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _config_file(tmp_path: Path, **train) -> Path:
    path = tmp_path / "tiny.yaml"
    save_config(helpers.tiny_config(snapshots=[1, 2], **{"epochs": 2, **train}), path)
    return path


def _history(run: Path) -> pd.DataFrame:
    return store.read_history(run).drop(columns="seconds")


def test_parse_grid_spaces_and_lists():
    grid = S.parse_grid(["train.lr=logspace:1e-4:0.25:25", "train.loss=ce,mse",
                         "train.momentum=linspace:0:0.9:4"])
    assert list(grid) == ["train.lr", "train.loss", "train.momentum"]
    np.testing.assert_allclose(grid["train.lr"], np.geomspace(1e-4, 0.25, 25), rtol=1e-12)
    assert grid["train.lr"][0] == 1e-4 and grid["train.lr"][-1] == 0.25
    assert grid["train.loss"] == ["ce", "mse"]
    np.testing.assert_allclose(grid["train.momentum"], [0, 0.3, 0.6, 0.9], atol=1e-15)
    for bad, why in [("train.lr", "expected KEY=SPEC"), ("train.lr=logspace:0:1:3", r"A > 0"),
                     ("train.lr=logspace:a:1:3", "needs numbers"), ("seed=1,1", "twice")]:
        with pytest.raises(ConfigError, match=why):
            S.parse_grid([bad])


def test_plan_names_points_and_refuses_another_sweep(tmp_path):
    config = _config_file(tmp_path)
    sweep = S.plan_sweep(config, {"train.lr": LRS}, tmp_path / "sw", seeds=2)
    assert [p.name for p in sweep.points] == [
        "000-lr=0.01-seed=3", "001-lr=0.01-seed=4", "002-lr=0.02-seed=3",
        "003-lr=0.02-seed=4", "004-lr=0.05-seed=3", "005-lr=0.05-seed=4"]
    assert [(p.config.train.lr, p.config.seed) for p in sweep.points] == [
        (lr, seed) for lr in LRS for seed in (3, 4)]
    assert not (tmp_path / "sw" / SWEEP_FILE).exists()  # recorded once submitted
    record_sweep(sweep.root, sweep.record)
    again = S.plan_sweep(config, {"train.lr": LRS}, tmp_path / "sw", seeds=2)  # continued
    assert [p.config for p in again.points] == [p.config for p in sweep.points]
    with pytest.raises(RunError, match="holds another sweep"):
        S.plan_sweep(config, {"train.lr": LRS[:2]}, tmp_path / "sw", seeds=2)
    with pytest.raises(ConfigError, match=r"train\.lr"):
        S.plan_sweep(config, {"train.lr": [-1.0]}, tmp_path / "bad")


@pytest.mark.parametrize("executor", [
    "debug",  # in this process: the same jobs, no process start-up (seconds)
    pytest.param("local", marks=pytest.mark.slow),  # one process per job, as on a cluster
])
def test_three_point_sweep_collected_best_and_plotted(tmp_path, executor):
    config = _config_file(tmp_path)
    sweep = S.plan_sweep(config, {"train.lr": LRS}, tmp_path / "sw")
    jobs = S.submit(sweep, executor, parallel=3)
    assert len(jobs) == 3
    runs = [sweep.run_dir(p) for p in sweep.points]
    for point, run in zip(sweep.points, runs, strict=True):
        assert store.read_manifest(run)["status"] == "completed"
        assert load_config(run / "config.yaml") == point.config
    # an ordinary run: the same as training its config here
    direct = train(sweep.points[1].config, tmp_path / "direct")
    assert _history(runs[1]).equals(_history(direct))
    assert S.submit(sweep, executor) == []  # nothing left to do

    table = collect([sweep.root])
    assert sorted(table["config.train.lr"].unique()) == LRS
    # config keys as config.KEY: never beside a history column of a like name (lr, train_loss)
    assert [c for c in table.columns if "." in c and not c.startswith("config.")] == []
    assert {"lr", "train_loss", "config.seed", "config.train.loss"} <= set(table.columns)
    assert table.groupby("run")["epoch"].max().tolist() == [2, 2, 2]
    for run in runs:
        own = pd.read_csv(run / "metrics.csv")
        mine = table[table["run_dir"] == str(run)]
        assert mine["value"].tolist() == own["value"].tolist()
        assert set(mine["config.train.lr"]) == {load_config(run / "config.yaml").train.lr}
    # the paper's choice: the lr whose run ends with the best test accuracy
    final = {load_config(r / "config.yaml").train.lr: _history(r)["test_acc"].iloc[-1]
             for r in runs}
    picked = best(table, "test_acc")
    assert len(picked) == 1
    assert picked["test_acc"].iloc[0] == max(final.values())
    assert final[picked["config.train.lr"].iloc[0]] == max(final.values())
    assert picked["candidates"].iloc[0] == 3
    # parquet round trip
    out = write_table(table, tmp_path / "table.parquet")
    back = pd.read_parquet(out, engine="pyarrow")
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    # one colour per lr
    fig = collapse_figure(table, hue="train.lr")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == [f"train.lr={lr:.4g}" for lr in LRS]
    assert fig.axes[1].get_xscale() == "linear"  # 2 epochs: a linear axis


def test_the_requeued_call_resumes_an_interrupted_point(tmp_path, monkeypatch):
    """What submitit does on USR2, in this process: the job dies mid-epoch (SystemExit),
    checkpoint() gives the call to requeue, and that call finishes the run bit for bit."""
    import nctools.training.loop as loop

    config = _config_file(tmp_path, epochs=4)
    point = S.plan_sweep(config, {"train.lr": [0.02]}, tmp_path / "sw").points[0]
    run = tmp_path / "sw" / SWEEP_RUNS_DIR / point.name
    real, calls = loop.train_step, [0]

    def dies_at_step_8(*args, **kwargs):  # 3 steps an epoch: inside epoch 3
        calls[0] += 1
        if calls[0] == 8:
            raise SystemExit(-1)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dies_at_step_8)
    with pytest.raises(SystemExit):
        S.SweepJob()(point.config, str(run))
    monkeypatch.undo()
    assert store.read_manifest(run)["epochs_done"] == 2
    requeued = S.SweepJob().checkpoint(point.config, str(run))
    assert (requeued.args, requeued.kwargs) == ((point.config, str(run)), {})
    assert requeued.result() == str(run)
    direct = train(point.config, tmp_path / "direct")
    assert _history(run).equals(_history(direct))
    assert store.read_manifest(run)["status"] == "completed"


@pytest.mark.slow
def test_a_killed_job_is_requeued_and_resumes(tmp_path):
    """submitit's USR2 (Slurm's warning before a time limit or preemption) mid-run:
    the job requeues itself and finishes from its checkpoint, as if never stopped."""
    config = _config_file(tmp_path, epochs=12, batch_size=8)
    sweep = S.plan_sweep(config, {"train.lr": [0.02]}, tmp_path / "sw")
    ex = S.make_executor(sweep.root / SUBMITIT_DIR, "local")
    point = sweep.points[0]
    run = sweep.run_dir(point)
    job = ex.submit(S.SweepJob(), point.config, str(run))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        manifest = run / "run.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("epochs_done", 0) >= 2:
            break
        time.sleep(0.05)
    # USR2 to the job's process: what Slurm sends before a time limit (submitit asks for it)
    pid = job._process.pid  # the local controller; the job runs in its child
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        os.kill(int(child), signal.SIGUSR2)
    job.result()
    manifest = store.read_manifest(run)
    assert manifest["status"] == "completed" and manifest["epochs_done"] == 12
    folder = sweep.root / SUBMITIT_DIR
    out = "".join(p.read_text() for p in folder.glob("*_log.out"))
    err = "".join(p.read_text() for p in folder.glob("*_log.err"))
    assert "Requeued job" in out and out.count("Starting with JobEnvironment") == 2
    assert "requeued, it resumes from its checkpoint" in err
    assert "resuming" in err
    direct = train(replace(point.config), tmp_path / "direct")
    assert _history(run).equals(_history(direct))  # bit for bit, as if never stopped
    assert _history(run)["epoch"].tolist() == list(range(1, 13))


def test_the_commands_sweep_collect_and_plot(tmp_path, capsys):
    from nctools.cli import main

    config = _config_file(tmp_path)
    sweep = tmp_path / "sw"
    assert main(["sweep", str(config), "--grid", "train.lr=0.01,0.05", "--out", str(sweep),
                 "--executor", "debug"]) == 0
    assert "2 runs complete" in capsys.readouterr().out
    table = tmp_path / "t.parquet"
    assert main(["collect", str(sweep), "--out", str(table), "--best", "test_acc"]) == 0
    shown = capsys.readouterr().out
    back = pd.read_parquet(table)
    assert back["run"].nunique() == 2 and set(back["config.train.lr"]) == {0.01, 0.05}
    final = back[back["epoch"] == 2].drop_duplicates("run").set_index("config.train.lr")["test_acc"]
    assert f"{final.idxmax()}" in shown.splitlines()[-1]
    assert main(["plot", str(sweep), "--hue", "train.lr", "--out", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["sweep", str(config), "--grid", "train.lr", "--out", str(sweep)]) == 2
    assert capsys.readouterr().err.startswith("nctools: error: --grid 'train.lr': expected")


def _sweep_error(capsys, config, *argv: str) -> str:
    """`nctools sweep` refused: exit 2 and the one line it printed."""
    from nctools.cli import main

    assert main(["sweep", str(config), "--grid", "train.lr=0.01,0.05", "--executor", "debug",
                 *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_too_many_seeds_are_refused_at_once_naming_the_limit(tmp_path, capsys):
    config = _config_file(tmp_path)
    t0 = time.perf_counter()
    err = _sweep_error(capsys, config, "--seeds", "1000000", "--out", str(tmp_path / "sw"))
    assert time.perf_counter() - t0 < 2  # not 40 s of planning first
    assert err == (f"nctools: error: --seeds: 1000000 seeds make 2000000 runs, more than the "
                   f"{S.MAX_RUNS} one sweep may hold\n")
    err = _sweep_error(capsys, config, "--grid", f"seed=linspace:0:1:{S.MAX_RUNS}",
                       "--out", str(tmp_path / "sw"))
    assert err.startswith("nctools: error: --grid: 2 x 10000 points make 20000 runs")
    assert not (tmp_path / "sw").exists()


def test_bad_parallel_or_out_leave_no_sweep_behind(tmp_path, capsys, monkeypatch):
    config = _config_file(tmp_path)
    err = _sweep_error(capsys, config, "--parallel", "0", "--out", str(tmp_path / "sw"))
    assert err == "nctools: error: --parallel: must be >= 1, got 0\n"
    assert not (tmp_path / "sw" / SWEEP_FILE).exists()
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    err = _sweep_error(capsys, config, "--out", str(a_file))
    assert err == f"nctools: error: --out {a_file}: is a file, not a sweep folder\n"
    assert a_file.read_text() == "mine"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    err = _sweep_error(capsys, config, "--out", "")
    assert err == "nctools: error: --out: empty; give the sweep folder\n"
    assert list(here.iterdir()) == []


def test_slurm_without_slurm_is_one_line_and_records_no_sweep(tmp_path, capsys, monkeypatch):
    config = _config_file(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    err = _sweep_error(capsys, config, "--executor", "slurm", "--out", str(tmp_path / "sw"))
    assert err == ("nctools: error: --executor slurm: no Slurm on this machine (sbatch and "
                   "srun not found); run the sweep here with --executor local\n")
    assert not (tmp_path / "sw").exists()


def test_grid_values_go_through_the_alias_budget(tmp_path):
    from nctools.config.typed_yaml import MAX_ALIASES

    laughs = "- &a 1\n" + "- *a\n" * (MAX_ALIASES + 1)
    with pytest.raises(ConfigError, match=rf"^--grid 'train.lr=- &a 1.*: more than "
                                          rf"{MAX_ALIASES} YAML aliases"):
        S.parse_grid([f"train.lr={laughs}"])
    with pytest.raises(ConfigError, match="duplicate key"):
        S.parse_grid(["train.milestones=a: 1\na: 2"])


def _diverging_sweep(tmp_path, capsys, executor: str) -> None:
    """A grid with one diverging cell: exit 1, one line naming the run and its cause, the
    other run complete."""
    from nctools.cli import main

    config = _config_file(tmp_path, momentum=0.0)
    sweep = tmp_path / "sw"
    assert main(["sweep", str(config), "--grid", "train.lr=0.05,1e12", "--out", str(sweep),
                 "--executor", executor]) == 1
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("nctools: sweep: ")]
    bad = sweep / SWEEP_RUNS_DIR / "001-lr=1e12-seed=3"
    assert err == [
        "nctools: error: run 001-lr=1e12-seed=3 failed: training diverged at epoch 1 (train "
        f"loss nan, test loss nan); the last good checkpoint is {bad}/checkpoint.pt (epoch 0);"
        " lower train.lr or change the config, and use another --out",
        f"nctools: 1 of 2 runs complete in {sweep / SWEEP_RUNS_DIR}; logs in "
        f"{sweep / SUBMITIT_DIR}"]
    good = sweep / SWEEP_RUNS_DIR / "000-lr=0.05-seed=3"
    assert store.read_manifest(good)["status"] == "completed"
    assert store.read_manifest(bad)["status"] == "diverged"


def test_a_diverging_cell_is_one_line_in_process(tmp_path, capsys):
    _diverging_sweep(tmp_path, capsys, "debug")  # no debugger opened on the failure


@pytest.mark.slow
def test_a_diverging_cell_is_one_line_from_its_job(tmp_path, capsys):
    _diverging_sweep(tmp_path, capsys, "local")  # not submitit's nested trace


def test_ctrl_c_during_a_local_sweep_is_one_line_and_resumes(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: one line, not a traceback
    from each job controller, and submitting the sweep again finishes it bit for bit."""
    import subprocess
    import sys

    config = _config_file(tmp_path, epochs=30)
    argv = [sys.executable, "-m", "nctools", "sweep", str(config), "--grid",
            "train.lr=0.02,0.05", "--out", str(tmp_path / "sw"), "--parallel", "2"]
    job = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True,
                           cwd=tmp_path)
    deadline = time.monotonic() + 120
    manifests = [tmp_path / "sw" / SWEEP_RUNS_DIR / f"00{i}-lr={lr}-seed=3" / "run.json"
                 for i, lr in enumerate(("0.02", "0.05"))]
    while time.monotonic() < deadline and not all(
            m.is_file() and json.loads(m.read_text()).get("epochs_done", 0) >= 2
            for m in manifests):
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C sends: every process of the group
    err = job.communicate(timeout=120)[1]
    assert job.returncode == 130
    assert [line for line in err.splitlines() if not line.startswith("nctools: sweep: ")] \
        == ["nctools: interrupted"], err
    assert {json.loads(m.read_text())["status"] for m in manifests} == {"interrupted"}
    again = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for manifest in manifests:
        run = manifest.parent
        direct = train(load_config(run / "config.yaml"), tmp_path / f"direct-{run.name}")
        assert _history(run).equals(_history(direct))


def test_collect_names_missing_and_unfinished_runs_and_each_run_once(tmp_path, capsys):
    from nctools.cli import main

    config = _config_file(tmp_path)
    sweep = S.plan_sweep(config, {"train.lr": LRS}, tmp_path / "sw")
    S.submit(sweep, "debug")
    runs = [sweep.run_dir(p) for p in sweep.points]
    shutil.rmtree(runs[2])
    manifest = store.read_manifest(runs[1])
    store.write_manifest(runs[1], {**manifest, "status": "interrupted", "epochs_done": 1})
    capsys.readouterr()
    table = tmp_path / "t.csv"
    assert main(["collect", str(sweep.root), str(sweep.root), "--best", "test_acc",
                 "--out", str(table)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"nctools: warning: {sweep.root}: 1 of 3 runs have no run folder (not started, or "
        f"removed): {runs[2].name}; left out",
        f"nctools: warning: {sweep.root}: given twice (collected once)",
        f"nctools: warning: 1 runs did not complete and are compared at their last analysed "
        f"epoch: sw/{runs[1].name} (interrupted, epoch 2)"]
    back = pd.read_csv(table)
    assert back["run"].nunique() == 2
    assert len(back) == sum(len(pd.read_csv(r / "metrics.csv")) for r in runs[:2])
