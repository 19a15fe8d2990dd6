"""analyze(): a run directory -> metrics table, checked against measure() by hand."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from nctools.analysis import tables as analysis
from nctools.analysis.tables import COLUMNS, analyze
from nctools.errors import RunError, SnapshotError
from nctools.metrics.measure import METRIC_KEYS, class_means, measure, measure_chunks
from nctools.runs import files, snapshots, store
from nctools.training.loop import train
from tests import helpers


def tiny_config():
    return helpers.tiny_config(num_classes=4, image_size=8, batch_size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train(tiny_config(), tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the trained run, free to be analysed, corrupted or edited."""
    return Path(shutil.copytree(trained, tmp_path / "tiny"))


def by_hand(run: Path, epoch: int) -> dict[str, dict[str, float]]:
    weight, bias = snapshots.load_classifier(run, epoch)
    train_h, train_y = snapshots.load_split(run, epoch, "train")
    test_h, test_y = snapshots.load_split(run, epoch, "test")
    means = class_means(train_h, train_y, 4)
    return {
        "train": measure(train_h, train_y, weight, bias),
        "test": measure(test_h, test_y, weight, bias, class_means=means),
    }


def test_table_equals_measure_on_each_snapshot(run):
    table = analyze(run)
    assert list(table.columns) == COLUMNS
    assert sorted(table["epoch"].unique()) == [1, 2, 3]
    keys = list(by_hand(run, 1)["train"])  # METRIC_KEYS, then the newer keys measure gives
    assert keys[: len(METRIC_KEYS)] == list(METRIC_KEYS)
    assert len(table) == 3 * 2 * len(keys)
    assert set(table["global_mean"]) == {"samples"} and set(table["classes"]) == {"all"}
    assert set(table["run"]) == {"tiny"}
    assert set(table["dataset"]) == {"synthetic"} and set(table["arch"]) == {"convnet"}
    for epoch in (1, 2, 3):
        expected = by_hand(run, epoch)
        for split in ("train", "test"):
            rows = table[(table["epoch"] == epoch) & (table["split"] == split)]
            got = dict(zip(rows["metric"], rows["value"], strict=True))
            assert set(got) == set(expected[split])
            for key in expected[split]:
                assert got[key] == pytest.approx(expected[split][key], rel=1e-12, abs=1e-12)
    # The test split's NC4 uses the training means: it differs from its own-means value.
    weight, bias = snapshots.load_classifier(run, 3)
    own = measure(*snapshots.load_split(run, 3, "test"), weight, bias)
    test_rows = table[(table["epoch"] == 3) & (table["split"] == "test")].set_index("metric")
    assert test_rows.loc["nc1", "value"] == pytest.approx(own["nc1"], rel=1e-12)


def test_history_and_onset_joined_and_csv_round_trips(run):
    table = analyze(run)
    history = store.read_history(run).set_index("epoch")
    for epoch, rows in table.groupby("epoch"):
        for column in ("lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert set(rows[column]) == {history.loc[epoch, column]}
    onset = store.read_manifest(run)["tpt_onset_epoch"]
    assert table["tpt_onset_epoch"].isna().all() if onset is None else \
        set(table["tpt_onset_epoch"]) == {onset}
    # The onset comes from run.json and is refreshed on every call (a run still training).
    manifest = store.read_manifest(run)
    store.write_manifest(run, {**manifest, "tpt_onset_epoch": 2})
    assert set(analyze(run)["tpt_onset_epoch"]) == {2.0}
    on_disk = analysis.read_table(run / "metrics.csv")
    pd.testing.assert_frame_equal(on_disk, analyze(run), check_dtype=False)


def test_two_runs_concatenate(run, tmp_path):
    other = Path(shutil.copytree(run, tmp_path / "other"))
    both = pd.concat([analyze(run), analyze(other)], ignore_index=True)
    assert list(both.columns) == COLUMNS
    rows = 3 * 2 * len(by_hand(run, 1)["train"])  # epochs x splits x keys
    assert both.groupby("run").size().to_dict() == {"other": rows, "tiny": rows}


def counting(monkeypatch) -> list[int]:
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return measure_chunks(*args, **kwargs)

    monkeypatch.setattr(analysis, "measure_chunks", counted)
    return calls


def test_incremental_measures_only_new_snapshots(run, monkeypatch):
    meta = snapshots.snapshot_dir(run, 3) / "meta.json"
    hidden = meta.with_name("meta.json.later")
    meta.rename(hidden)  # epoch 3 not complete yet: the run is still training
    first = analyze(run)
    assert sorted(first["epoch"].unique()) == [1, 2]

    calls = counting(monkeypatch)
    again = analyze(run)
    assert calls == []  # nothing new: nothing measured
    pd.testing.assert_frame_equal(again, first)

    hidden.rename(meta)  # epoch 3 lands
    later = analyze(run)
    assert len(calls) == 2  # one snapshot, two splits
    assert sorted(later["epoch"].unique()) == [1, 2, 3]
    old_rows = later[later["epoch"] < 3].reset_index(drop=True)
    pd.testing.assert_frame_equal(old_rows, first)


def test_corrupt_snapshot_is_skipped_and_named(run):
    path = snapshots.snapshot_dir(run, 2) / "train.safetensors"
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"epoch-0002.*train\.safetensors"):
        table = analyze(run)
    assert sorted(table["epoch"].unique()) == [1, 3]
    # Epoch 2 is still missing from metrics.csv, so a strict call tries it again.
    with pytest.raises(SnapshotError, match=r"epoch-0002.*train\.safetensors"):
        analyze(run, strict=True)


def test_missing_run_and_run_without_snapshots(tmp_path):
    with pytest.raises(RunError, match=r"^no run directory at .*nowhere"):
        analyze(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"has no snapshots.*snapshot\.epochs=all"):
        analyze(tmp_path / "empty")


def test_onset_from_history_without_manifest(run):
    (run / "run.json").unlink()
    history = store.read_history(run)
    history.loc[history["epoch"] >= 2, "train_acc"] = 1.0
    files.atomic_write_text(run / "history.csv", history.to_csv(index=False))
    assert set(analyze(run)["tpt_onset_epoch"]) == {2.0}
    history["train_acc"] = 0.5
    files.atomic_write_text(run / "history.csv", history.to_csv(index=False))
    assert analyze(run)["tpt_onset_epoch"].isna().all()  # zero training error not reached
    history.loc[history["epoch"] >= 2, "train_acc_running"] = 1.0  # running: not the onset
    files.atomic_write_text(run / "history.csv", history.to_csv(index=False))
    assert analyze(run)["tpt_onset_epoch"].isna().all()


def test_metrics_carry_the_eval_mode_accuracy_of_the_snapshot(run):
    """metrics.csv's train_acc is the eval-mode one: the snapshot's own ``accuracy``."""
    table = analyze(run)
    rows = table[(table["split"] == "train") & (table["metric"] == "accuracy")]
    assert "train_acc_running" not in table.columns
    assert rows["train_acc"].tolist() == pytest.approx(rows["value"].tolist(), abs=1e-12)


def test_a_history_without_train_acc_running_still_analyses(run):
    """Runs written before train_acc_running: their train_acc was the running accuracy;
    it is not shown as the eval-mode one, and the manifest's onset still applies."""
    history = store.read_history(run).drop(columns="train_acc_running")
    history["train_acc"] = 0.75
    files.atomic_write_text(run / "history.csv", history.to_csv(index=False))
    table = analyze(run)
    assert list(table.columns) == COLUMNS and table["train_acc"].isna().all()
    assert set(table["lr"]) == set(history["lr"])
    legacy = store.legacy_history(store.read_history(run))
    assert legacy["train_acc_running"].tolist() == [0.75] * len(history)


def test_options_are_recorded_and_change_the_numbers(run):
    """--global-mean classes and --classes: the table says so and holds measure's numbers;
    asking for other options measures the epochs again instead of mixing choices."""
    analyze(run)
    table = analyze(run, global_mean="classes", classes=[0, 2, 3])
    assert set(table["global_mean"]) == {"classes"} and set(table["classes"]) == {"0,2,3"}
    assert sorted(table["epoch"].unique()) == [1, 2, 3]
    weight, bias = snapshots.load_classifier(run, 2)
    train_h, train_y = snapshots.load_split(run, 2, "train")
    want = measure(train_h, train_y, weight, bias, global_mean="classes", classes=[0, 2, 3])
    rows = table[(table["epoch"] == 2) & (table["split"] == "train")]
    got = dict(zip(rows["metric"], rows["value"], strict=True))
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize(("classes", "why"), [
    ("7,8", "--classes 7,8: the run has classes 0 to 3; no class 7, 8"),
    ("0,0", "--classes 0,0: a class is named twice"),
    ("0", "--classes 0: name at least 2 classes (collapse compares classes)"),
])
def test_classes_the_run_lacks_are_refused_before_the_table_is_touched(run, capsys, classes,
                                                                        why):
    from nctools.cli import main

    analyze(run)
    before = (run / "metrics.csv").read_bytes()
    assert main(["analyze", str(run), "--classes", classes]) == 2
    assert capsys.readouterr().err == f"nctools: error: analyze {run}: {why}\n"
    assert (run / "metrics.csv").read_bytes() == before


def test_plot_keeps_the_choices_the_table_records(run, capsys):
    """analyze --global-mean classes --classes 0,2,3, then plot: the table keeps them
    (bringing it up to date never re-measures with the defaults)."""
    from nctools.analysis.collect import collect
    from nctools.cli import main

    assert main(["analyze", str(run), "--global-mean", "classes", "--classes", "0,2,3"]) == 0
    before = (run / "metrics.csv").read_bytes()
    assert main(["plot", str(run), "--out", str(run / "f.png")]) == 0
    assert (run / "metrics.csv").read_bytes() == before
    assert analysis.table_options(run) == {"global_mean": "classes", "classes": [0, 2, 3]}
    table = collect([run])
    assert set(table["global_mean"]) == {"classes"} and set(table["classes"]) == {"0,2,3"}
    assert (run / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize("command", ["analyze", "plot"])
def test_a_foreign_metrics_csv_is_one_line_naming_it(run, capsys, command):
    from nctools.cli import main

    (run / "metrics.csv").write_text("a,b\n1,2\n")
    assert main([command, str(run)]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: {run}/metrics.csv: not a metrics table (lacks ['arch', 'dataset', "
        "'epoch', 'metric', 'run', 'split', 'value']); delete it\n")
    assert (run / "metrics.csv").read_text() == "a,b\n1,2\n"
