"""Without a terminal, `nctools train` prints one plain line per epoch with the history's
numbers; --quiet prints nothing; analyze shows progress over snapshots."""

import re
import sys

import pandas as pd
import pytest

from nctools import train
from nctools.runs.layout import HISTORY_FILE
from tests.helpers import tiny_config

LINE = re.compile(
    r"epoch (\d+)/3 loss (\S+) acc (\S+)(?: train_acc (\S+))?(?: test_loss (\S+) test_acc (\S+))?"
    r" (\S+)s"
)


def test_one_line_per_epoch_when_stdout_is_not_a_terminal(tmp_path, capsys):
    run = train(tiny_config(epochs=3, eval_every=2, snapshots=[3]), tmp_path / "run",
                progress="auto")  # the command line's
    lines = [m for m in map(LINE.fullmatch, capsys.readouterr().out.splitlines()) if m]
    history = pd.read_csv(run / HISTORY_FILE)
    assert [int(m[1]) for m in lines] == [1, 2, 3]
    for match, row in zip(lines, history.itertuples(), strict=True):
        assert float(match[2]) == pytest.approx(row.train_loss, rel=1e-3)
        assert float(match[3]) == pytest.approx(row.train_acc_running, abs=1e-4)
        if pd.isna(row.train_acc):  # the eval-mode accuracy only where it was measured
            assert match[4] is None
        else:
            assert float(match[4]) == pytest.approx(row.train_acc, abs=1e-4)
        if row.epoch == 1:  # eval_every=2: no test pass, no test columns
            assert match[6] is None
        else:
            assert float(match[6]) == pytest.approx(row.test_acc, abs=1e-4)
        assert float(match[7]) == pytest.approx(row.seconds, abs=0.051)


def test_quiet_prints_nothing(tmp_path, capsys):
    train(tiny_config(epochs=2, snapshots=[2]), tmp_path / "run", progress="none")
    captured = capsys.readouterr()
    assert captured.out == "" and "epoch" not in captured.err


def test_analyze_shows_progress_over_snapshots_unless_quiet(tmp_path, capsys, monkeypatch):
    from nctools.cli import main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is for terminals

    run = train(tiny_config(epochs=2, snapshots=[1, 2]), tmp_path / "run")
    assert main(["analyze", str(run), "--quiet"]) == 0
    assert "snapshot" not in capsys.readouterr().err
    (run / "metrics.csv").unlink()
    assert main(["analyze", str(run)]) == 0
    assert "2/2" in capsys.readouterr().err  # tqdm's count of snapshots measured
