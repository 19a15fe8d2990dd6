"""Sweep tables without training: the paper's choice per cell over seeds, and seeds drawn
as a mean with a band, on crafted tables checked against NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection

from nctools.analysis.collect import best
from nctools.analysis.plots import collapse_figure, seed_band
from nctools.errors import NctoolsError

RNG = np.random.default_rng(0)
EPOCHS = [1, 2, 5]


def crafted() -> pd.DataFrame:
    """2 data sets x 3 lrs x 2 seeds; every run 3 epochs of nc1 and accuracy rows."""
    rows = []
    for dataset, lr, seed in itertools.product(["mnist", "cifar10"], [0.01, 0.1, 0.2], [0, 1]):
        run = f"{dataset}-{lr}-{seed}"
        test_acc = RNG.uniform(0.5, 1.0, len(EPOCHS))
        for (i, epoch), split, metric in itertools.product(
                enumerate(EPOCHS), ["train", "test"], ["nc1", "accuracy"]):
            rows.append({"run": run, "dataset": dataset, "arch": "convnet", "epoch": epoch,
                         "split": split, "metric": metric, "value": RNG.uniform(0.1, 1.0),
                         "test_acc": test_acc[i], "tpt_onset_epoch": 2.0 + seed,
                         "config.data.dataset": dataset, "config.train.lr": lr, "config.seed": seed,
                         "sweep": "s", "run_dir": f"/s/{run}"})
    return pd.DataFrame(rows)


def test_best_is_the_lr_with_the_best_final_seed_mean_per_cell():
    table = crafted()
    picked = best(table, "test_acc").set_index("config.data.dataset")
    final = table[table["epoch"] == EPOCHS[-1]].drop_duplicates("run")
    for dataset in ("mnist", "cifar10"):
        mine = final[final["config.data.dataset"] == dataset]
        means = mine.groupby("config.train.lr")["test_acc"].mean()
        assert picked.loc[dataset, "config.train.lr"] == means.idxmax()
        assert picked.loc[dataset, "test_acc"] == pytest.approx(means.max(), abs=1e-15)
        assert picked.loc[dataset, "seeds"] == 2 and picked.loc[dataset, "candidates"] == 3
    # a loss is minimised
    table["test_loss"] = 1 - table["test_acc"]
    assert best(table, "test_loss")["config.train.lr"].tolist() == best(table, "test_acc")[
        "config.train.lr"].tolist()
    with pytest.raises(NctoolsError, match="--best nope: no such column"):
        best(table, "nope")


def test_seed_band_is_the_mean_and_one_standard_deviation():
    table = crafted()
    rows = table[(table["config.data.dataset"] == "mnist") & (table["config.train.lr"] == 0.1)]
    band = seed_band(rows, "nc1", "train")
    values = np.array([[rows[(rows["run"] == r) & (rows["epoch"] == e) & (rows["split"] == "train")
                             & (rows["metric"] == "nc1")]["value"].iloc[0]
                        for r in ("mnist-0.1-0", "mnist-0.1-1")] for e in EPOCHS])
    np.testing.assert_allclose(band["mean"], values.mean(axis=1), rtol=1e-14)
    std = values.std(axis=1, ddof=1)
    np.testing.assert_allclose(band["high"] - band["mean"], std, rtol=1e-12)
    np.testing.assert_allclose(band["mean"] - band["low"], std, rtol=1e-12)
    assert band["epoch"].tolist() == EPOCHS and band["runs"].tolist() == [2, 2, 2]


def test_hue_draws_one_colour_per_value_with_bands():
    table = crafted()
    table = table[table["config.data.dataset"] == "mnist"]
    fig = collapse_figure(table, hue="train.lr")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:3] == ["train.lr=0.01", "train.lr=0.1", "train.lr=0.2"]
    nc1_ax = fig.axes[1]
    bands = [c for c in nc1_ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3 * 2  # a band per lr and split
    means = [ln for ln in nc1_ax.get_lines() if ln.get_linestyle() == "-"]
    want = seed_band(table[table["config.train.lr"] == 0.01], "nc1", "train")["mean"]
    np.testing.assert_allclose(means[0].get_ydata(), want, rtol=1e-14)
    onsets = [ln for ln in nc1_ax.get_lines() if ln.get_linestyle() == ":"]
    assert [ln.get_xdata()[0] for ln in onsets] == [2.5, 2.5, 2.5]  # median of 2 and 3
    assert nc1_ax.get_xscale() == "linear"  # 5 epochs
    with pytest.raises(NctoolsError, match=r"--hue model\.width: no such column"):
        collapse_figure(table, hue="model.width")


def test_hue_never_averages_over_another_swept_key():
    """train.loss also swept: one curve per (lr, loss), each the mean of its seeds only."""
    table = crafted()
    table = table[table["config.data.dataset"] == "mnist"].copy()
    table["config.train.loss"] = np.where(table["run"].str.endswith("-0"), "ce", "mse")
    table["run"] = table["run"] + "-" + table["config.train.loss"]
    twin = table.assign(run=table["run"] + "b",
                        value=table["value"] * 2.0)  # a second seed of each (lr, loss)
    table = pd.concat([table, twin], ignore_index=True)
    fig = collapse_figure(table, hue="train.lr")
    labels = [t.get_text() for t in fig.legends[0].get_texts()][:6]
    assert labels == [f"train.lr={lr} · train.loss={loss}"
                      for lr in ("0.01", "0.1", "0.2") for loss in ("ce", "mse")]
    means = [ln for ln in fig.axes[1].get_lines() if ln.get_linestyle() == "-"]
    cell = table[(table["config.train.lr"] == 0.01) & (table["config.train.loss"] == "mse")]
    want = seed_band(cell, "nc1", "train")["mean"]
    np.testing.assert_allclose(means[1].get_ydata(), want, rtol=1e-14)
    assert seed_band(cell, "nc1", "train")["runs"].tolist() == [2, 2, 2]


@pytest.mark.parametrize(("last", "axis", "scale"), [
    (5, "auto", "linear"), (20, "auto", "linear"), (21, "auto", "log"), (5, "log", "log"),
    (300, "linear", "linear")])
def test_the_epoch_axis_is_log_only_for_long_runs_unless_chosen(last, axis, scale):
    table = crafted()
    table.loc[table["epoch"] == EPOCHS[-1], "epoch"] = last
    fig = collapse_figure(table, epoch_axis=axis)
    assert {ax.get_xscale() for ax in fig.axes} == {scale}
    with pytest.raises(NctoolsError, match="--epoch-axis 'ln': use one of auto, log, linear"):
        collapse_figure(table, epoch_axis="ln")
