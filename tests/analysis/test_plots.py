"""Collapse-curve figures: panels, scales, line styles, legend, formats (from tables only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from nctools.analysis import plots
from nctools.analysis.plots import PANELS, collapse_figure, plot_runs
from nctools.errors import NctoolsError

NC_METRICS = [p.metric for p in PANELS]


def fake_table(run: str, dataset: str, arch: str, onset: float | None = 4.0,
               epochs: int = 10) -> pd.DataFrame:
    """Metrics that decay over decades (log panels) except NCC mismatch (a narrow band)."""
    rows = []
    for epoch in range(1, epochs + 1):
        for split, scale in (("train", 1.0), ("test", 2.0)):
            for metric in NC_METRICS:
                if metric == "accuracy":  # train error reaches exactly 0 -> linear axis
                    value = 1.0 if split == "train" and epoch >= 4 else 1.0 - 0.1 * scale / epoch
                elif metric == "ncc_mismatch":
                    value = 0.2 - 0.01 * epoch * scale / 2
                else:
                    value = scale * 0.5**epoch
                rows.append({"run": run, "dataset": dataset, "arch": arch, "epoch": epoch,
                             "split": split, "metric": metric, "value": value,
                             "tpt_onset_epoch": np.nan if onset is None else onset})
    return pd.DataFrame(rows)


@pytest.fixture
def two_runs() -> list[pd.DataFrame]:
    return [fake_table("a", "mnist5k", "convnet", onset=4.0),
            fake_table("b", "cifar10", "resnet18", onset=6.0)]


def test_panels_titles_and_labels(two_runs):
    fig = collapse_figure(two_runs)
    assert len(fig.axes) == len(PANELS) == 12
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [p.title for p in PANELS]
    assert "NC1: within-class variability Tr(Σ_W Σ_B⁺)/C" in titles
    for prefix in ("NC2: equinorm", "NC2: equiangularity", "NC2: max-angle", "NC3: self-duality",
                   "NC4: NCC mismatch", "NC2: distance to simplex ETF"):
        assert any(t.startswith(prefix) for t in titles), prefix
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    assert all(ax.get_ylabel() for ax in fig.axes)


def test_log_scale_only_where_positive_data_span_decades(two_runs):
    fig = collapse_figure(two_runs)
    scales = {p.metric: ax.get_yscale() for p, ax in zip(PANELS, fig.axes, strict=True)}
    assert scales.pop("accuracy") == "linear"  # the training error is exactly 0 in TPT
    assert scales.pop("ncc_mismatch") == "linear"  # 0.1 .. 0.2: no decade spanned
    assert set(scales.values()) == {"log"}


def test_error_curves_and_line_styles(two_runs):
    fig = collapse_figure(two_runs)
    error_ax, nc1_ax = fig.axes[0], fig.axes[1]
    lines = error_ax.get_lines()
    solid = [ln for ln in lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in lines if ln.get_linestyle() == "--"]
    assert len(solid) == len(dashed) == 2  # train and test of 2 runs
    # The error is 1 - accuracy of the measured `accuracy` metric.
    train_a = two_runs[0].query("metric == 'accuracy' and split == 'train'")
    np.testing.assert_allclose(solid[0].get_ydata(), 1.0 - train_a["value"].to_numpy())
    np.testing.assert_array_equal(solid[0].get_xdata(), np.arange(1, 11))
    nc1_test = two_runs[1].query("metric == 'nc1' and split == 'test'")["value"].to_numpy()
    nc1_dashed = [ln for ln in nc1_ax.get_lines() if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(nc1_dashed[1].get_ydata(), nc1_test)
    # Classifier-only panels draw one (train) curve per run: the test rows are the same W.
    weights_ax = fig.axes[[p.metric for p in PANELS].index("equinorm_weights")]
    assert [ln.get_linestyle() for ln in weights_ax.get_lines()].count("--") == 0


def test_tpt_onset_marker_per_run(two_runs):
    fig = collapse_figure(two_runs)
    for ax in fig.axes:
        markers = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert sorted(ln.get_xdata()[0] for ln in markers) == [4.0, 6.0]
    no_onset = collapse_figure(fake_table("c", "mnist5k", "convnet", onset=None))
    assert not [ln for ln in no_onset.axes[1].get_lines() if ln.get_linestyle() == ":"]


def test_legend_names_runs(two_runs):
    fig = collapse_figure(two_runs)
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:2] == ["mnist5k / convnet", "cifar10 / resnet18"]
    assert {"train", "test", "TPT onset"} <= set(texts)
    # One table holding two runs of the same data set and network: the run names separate them.
    same = pd.concat([fake_table("seed0", "mnist5k", "convnet"),
                      fake_table("seed1", "mnist5k", "convnet")])
    texts = [t.get_text() for t in collapse_figure(same).legends[0].get_texts()]
    assert texts[:2] == ["mnist5k / convnet (seed0)", "mnist5k / convnet (seed1)"]


@pytest.mark.parametrize(("name", "magic"), [("fig.png", b"\x89PNG"), ("fig.pdf", b"%PDF"),
                                             ("sub/fig.svg", b"<?xml")])
def test_format_from_extension(two_runs, tmp_path, monkeypatch, name, magic):
    monkeypatch.setattr(plots, "PANELS", PANELS[:2])  # drawing all 12 adds nothing here
    out = plot_runs(two_runs, tmp_path / name)
    assert out == tmp_path / name
    assert out.read_bytes().startswith(magic)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left
    if name.endswith(".svg"):
        assert b"<svg" in out.read_bytes()[:2000]


def test_unknown_extension_is_a_clear_error(two_runs, tmp_path):
    with pytest.raises(NctoolsError, match=r"fig\.jpg: unknown extension '\.jpg'; use one of "
                                           r"\.png, \.pdf, \.svg"):
        plot_runs(two_runs, tmp_path / "fig.jpg")
    assert not (tmp_path / "fig.jpg").exists()


def test_reads_metrics_csv_files(two_runs, tmp_path):
    paths = []
    for table in two_runs:
        path = tmp_path / f"{table['run'][0]}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    from_files = collapse_figure(paths)
    from_frames = collapse_figure(two_runs)
    for a, b in zip(from_files.axes, from_frames.axes, strict=True):
        for la, lb in zip(a.get_lines(), b.get_lines(), strict=True):
            np.testing.assert_array_equal(la.get_ydata(), lb.get_ydata())
    with pytest.raises(NctoolsError, match=r"no metrics table at .*missing\.csv"):
        collapse_figure(tmp_path / "missing.csv")


def test_missing_metric_leaves_a_labelled_empty_panel():
    table = fake_table("a", "mnist5k", "convnet")
    fig = collapse_figure(table[table["metric"] != "etf_weights"])
    etf_ax = fig.axes[-1]
    assert etf_ax.get_lines() == [] or all(ln.get_linestyle() == ":" for ln in etf_ax.get_lines())
    assert "no `etf_weights` in the table" in [t.get_text() for t in etf_ax.texts]


def test_chosen_panels_leave_out_keys_the_table_lacks():
    table = fake_table("a", "mnist5k", "convnet")
    with pytest.warns(UserWarning, match="left out the panels of gnc2_means"):
        fig = collapse_figure(table, plots.select_panels(["nc1", "gnc2_means", "accuracy"]))
    titles = {p.metric: p.title for p in PANELS}
    assert [ax.get_title() for ax in fig.axes] == [titles["nc1"], titles["accuracy"]]
    generalised = plots.select_panels(preset="generalised")
    assert {"gnc2_means", "unc3", "separation_fuzziness"} <= {p.metric for p in generalised}
    extra = table[table["metric"] == "nc1"].assign(metric="unc3", value=0.5)
    with pytest.warns(UserWarning, match="left out"):
        fig = collapse_figure(pd.concat([table, extra]), generalised)
    assert [ax.get_title() for ax in fig.axes] == ["UNC3: uniform duality"]
    with pytest.raises(NctoolsError, match="none of the chosen metrics"):
        collapse_figure(table, generalised)


# ------------------------------------------------------------------ nctools.plot (a notebook)
def drawn(fig, title):
    """[(linestyle, y values)] of the curves of the panel titled ``title``."""
    ax = next(a for a in fig.axes if a.get_title() == title)
    return [(line.get_linestyle(), list(line.get_ydata())) for line in ax.lines
            if len(line.get_xdata()) > 2]  # not the onset line


def test_nctools_plot_takes_a_table_a_run_folder_or_a_list(tmp_path):
    import subprocess
    import sys

    from matplotlib.figure import Figure

    import nctools

    table = fake_table("a", "mnist5k", "convnet")
    fig = nctools.plot(table, metrics=["nc1"])
    assert isinstance(fig, Figure)
    title = fig.axes[0].get_title()
    lines = drawn(fig, title)
    rows = table[table["metric"] == "nc1"]
    assert sorted(v for _, v in lines) == sorted(
        list(rows[rows["split"] == s]["value"]) for s in ("train", "test"))
    run = tmp_path / "run"
    run.mkdir()
    table.to_csv(run / "metrics.csv", index=False)
    assert drawn(nctools.plot(run, metrics=["nc1"]), title) == lines
    assert drawn(nctools.plot(str(run / "metrics.csv"), metrics=["nc1"]), title) == lines
    both = nctools.plot([run, fake_table("b", "cifar10", "resnet18")], metrics=["nc1"])
    assert len(drawn(both, title)) == 2 * len(lines)
    with pytest.raises(NctoolsError, match=r"^plot: .*nowhere: no such run folder or metrics"):
        nctools.plot(tmp_path / "nowhere")
    # `import nctools` stays light: nctools.plot is loaded on first use
    code = "import sys, nctools; print('pandas' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"] and "plot" in nctools.__all__
