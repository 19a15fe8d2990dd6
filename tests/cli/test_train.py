"""`nctools train`, then `analyze` and `plot` on the run it made: the whole workflow."""

from __future__ import annotations

from pathlib import Path

import pytest

import nctools.analysis.tables
from nctools.cli import main

TINY_YAML = """\
name: tiny
data: {dataset: synthetic, num_classes: 4, train_per_class: 16, test_per_class: 8,
       image_size: 8}
model: {arch: convnet, width: 8}
train: {epochs: 3, batch_size: 32, device: cpu}
snapshot: {epochs: all}
"""


def test_train_analyze_plot_workflow(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    assert main(["train", "tiny.yaml"]) == 0  # default --out: runs/<config name>
    run = Path("runs/tiny")
    out = capsys.readouterr().out.splitlines()  # not a terminal: a line per epoch
    assert out[-1] == f"run saved in {run}" and [line.split()[1] for line in out[:-1]] == [
        "1/3", "2/3", "3/3"]
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "epoch-0001", "epoch-0002", "epoch-0003"]

    history = (run / "history.csv").read_text()
    assert main(["train", "--resume", "--out", str(run)]) == 0  # complete: nothing to redo
    assert (run / "history.csv").read_text() == history
    capsys.readouterr()

    # plot without a table analyses first, then draws to RUN/figures/collapse.png
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'figures' / 'collapse.png'}\n"
    assert (run / "figures" / "collapse.png").read_bytes().startswith(b"\x89PNG")
    table = nctools.analysis.tables.read_table(run / "metrics.csv")
    assert sorted(table["epoch"].unique()) == [1, 2, 3]

    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {run / 'metrics.csv'} ({len(table)} rows)"  # 3 epochs x 2 x keys
    assert len(table) == 3 * 2 * table["metric"].nunique()
    assert out[1] == "epoch 3:"
    assert out[2].split() == ["train", "test"]
    last = table[(table["epoch"] == 3) & (table["metric"] == "nc1")].set_index("split")
    nc1_row = next(line.split() for line in out if line.startswith("nc1 "))
    assert float(nc1_row[1]) == pytest.approx(last.loc["train", "value"], rel=1e-3)
    assert float(nc1_row[2]) == pytest.approx(last.loc["test", "value"], rel=1e-3)

    # A snapshot failing its checksum: skipped with a one-line warning, or an error (--strict).
    clf = run / "snapshots" / "epoch-0002" / "classifier.safetensors"
    clf.write_bytes(clf.read_bytes()[:-4] + b"\0\0\0\0")
    (run / "metrics.csv").unlink()
    assert main(["analyze", str(run)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"nctools: warning: skipping the snapshot of epoch 2: {clf}")
    (run / "metrics.csv").unlink()
    assert main(["analyze", "--strict", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"nctools: error: {clf}")
    assert not (run / "metrics.csv").exists()
