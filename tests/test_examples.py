"""The scripts of examples/ run in their tiny mode (NCTOOLS_EXAMPLES_TINY=1) and print what
their docs page says they print; each test checks the numbers the example exists to show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.docs_blocks import REPO


def run_example(name: str, folder: Path) -> str:
    command = ["bash"] if name.endswith(".sh") else [sys.executable]
    env = dict(os.environ, NCTOOLS_EXAMPLES_TINY="1", MPLBACKEND="Agg", PYTHONPATH=str(REPO))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run([*command, str(REPO / "examples" / name)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"examples/{name} exited {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


def test_lightning_callback_logs_what_analyze_measures(tmp_path: Path) -> None:
    out = run_example("lightning_callback.py", tmp_path)
    logged = float(re.search(r"logged nc/train/nc1 (\S+)", out)[1])
    analyzed = float(re.search(r"analyze  train nc1 (\S+)", out)[1])
    assert logged > 0 and abs(logged - analyzed) <= 1e-6 * logged
    assert (tmp_path / "runs/lightning-example/metrics.csv").is_file()


def test_hf_trainer_logs_every_epoch(tmp_path: Path) -> None:
    out = run_example("hf_trainer.py", tmp_path)
    rows = re.findall(r"epoch (\d+) train nc1 (\S+) eval ncc_accuracy (\S+)", out)
    assert [int(e) for e, _, _ in rows] == [1, 2]
    assert all(float(nc1) >= 0 and 0 <= float(acc) <= 1 for _, nc1, acc in rows)


def test_plain_loop_nc1_falls_while_training(tmp_path: Path) -> None:
    out = run_example("plain_loop_ncmetric.py", tmp_path)
    nc1 = [float(v) for v in re.findall(r" nc1 (\S+) ncc_mismatch", out)]
    assert len(nc1) == 3 and nc1[0] > nc1[1] > nc1[2] > 0


def test_timm_layers_one_row_per_layer(tmp_path: Path) -> None:
    out = run_example("timm_layers.py", tmp_path)
    rows = re.findall(r"^(\w+) +nc1 +(\S+) +ncc_accuracy (\S+)$", out, re.MULTILINE)
    assert [layer for layer, _, _ in rows] == ["layer1", "layer2", "layer3", "fc"]
    assert all(float(nc1) > 0 and 0 <= float(acc) <= 1 for _, nc1, acc in rows)
    assert "fc keys include ncc_mismatch: True" in out


def test_sweep_collects_one_run_per_learning_rate(tmp_path: Path) -> None:
    run_example("sweep_demo.sh", tmp_path)
    table = pd.read_csv(tmp_path / "sweeps/demo-example.csv")
    assert sorted(table["config.train.lr"].unique()) == [0.01, 0.02]
    assert table.groupby("config.train.lr")["run_dir"].nunique().tolist() == [1, 1]
    assert (tmp_path / "sweeps/demo-example.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
