"""Collapse curves: metrics tables -> one figure of panels (Papyan, Han & Donoho, PNAS 2020).

Usage::

    plot_runs([analyze("runs/a"), "runs/b/metrics.csv"], Path("collapse.png"))

Plots read only the long-format tables that :func:`nctools.analysis.analyze` writes
(columns ``run, dataset, arch, epoch, split, metric, value, tpt_onset_epoch``), never
tensors. One panel per quantity of the paper's Figs. 1-7 plus the ETF distance of
Zhu et al. (NeurIPS 2021); train solid, test dashed, one colour per run, a dotted
vertical line at each run's onset of the terminal phase of training (TPT). Epochs on a
log axis as in the paper for runs longer than :data:`LOG_EPOCHS` epochs, else linear
(``epoch_axis=``).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from nctools.errors import NctoolsError

FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
# matplotlib line styles; val is the held-out split of a Lightning run (drawn as test)
SPLIT_STYLES: dict[str, Any] = {"train": "-", "test": "--", "val": "--"}
# A panel switches to a log y-axis when its positive data span at least this ratio.
LOG_SPAN = 10.0
# epoch_axis="auto": a log epoch axis (the paper's: the terminal phase is long) for runs
# longer than this many epochs; shorter runs read better on a linear one.
LOG_EPOCHS = 20
EPOCH_AXES = ("auto", "log", "linear")


@dataclass(frozen=True)
class Panel:
    """One subplot: a metric of the table, how to show it and which splits to draw."""

    title: str
    ylabel: str
    metric: str
    splits: tuple[str, ...] = ("train", "test", "val")
    transform: Callable[[np.ndarray], np.ndarray] | None = None


# Classifier-only quantities are the same on both splits, so they are drawn once.
_W = ("train",)
PANELS: tuple[Panel, ...] = (
    Panel("Training and test error", "error (1 − accuracy)", "accuracy",
          transform=lambda v: 1.0 - v),
    Panel("NC1: within-class variability Tr(Σ_W Σ_B⁺)/C", "Tr(Σ_W Σ_B⁺)/C", "nc1"),
    Panel("NC2: equinorm of class means", "std‖μ_c − μ_G‖ / mean", "equinorm_means"),
    Panel("NC2: equinorm of classifiers", "std‖w_c‖ / mean", "equinorm_weights", _W),
    Panel("NC2: equiangularity of class means", "std cos(μ_c, μ_c′)", "equiangular_means"),
    Panel("NC2: equiangularity of classifiers", "std cos(w_c, w_c′)", "equiangular_weights", _W),
    Panel("NC2: max-angle of class means", "mean |cos(μ_c, μ_c′) + 1/(C−1)|",
          "maxangle_means"),
    Panel("NC2: max-angle of classifiers", "mean |cos(w_c, w_c′) + 1/(C−1)|",
          "maxangle_weights", _W),
    Panel("NC3: self-duality", "‖W/‖W‖ − M̃/‖M̃‖‖²", "self_duality"),
    Panel("NC4: NCC mismatch", "fraction of samples", "ncc_mismatch"),
    Panel("NC2: distance to simplex ETF, class means", "‖G/‖G‖ − ETF‖", "etf_means"),
    Panel("NC2: distance to simplex ETF, classifiers", "‖G/‖G‖ − ETF‖", "etf_weights", _W),
)
# docs/metrics.md "Beyond the paper": many classes and imbalance (`--panels generalised`).
GENERALISED_PANELS: tuple[Panel, ...] = (
    Panel("GNC2: variance of log inverse distances, class means", "var log 1/‖u_c − u_c′‖",
          "gnc2_means"),
    Panel("GNC2: variance of log inverse distances, classifiers", "var log 1/‖u_c − u_c′‖",
          "gnc2_weights", _W),
    Panel("GNC2: logarithmic energy, class means", "mean log 1/‖u_c − u_c′‖",
          "gnc2_energy_means"),
    Panel("UNC3: uniform duality", "std_c s_c / mean_c s_c", "unc3"),
    Panel("Duality: mean cos(w_c, μ_c − μ_G)", "mean_c s_c", "duality_cos"),
    Panel("Separation fuzziness (He & Su 2023)", "Tr(SS_W SS_B⁺)", "separation_fuzziness"),
)
PANEL_PRESETS = ("paper", "generalised")
NCOLS = 4


def select_panels(
    metrics: Sequence[str] | None = None, preset: str = "paper"
) -> tuple[Panel, ...]:
    """The panels of ``preset`` (``paper`` or ``generalised``), or one per key of
    ``metrics`` (a known panel when there is one, else a plain one titled by the key)."""
    if preset not in PANEL_PRESETS:
        raise NctoolsError(f"--panels {preset!r}: unknown; valid: {', '.join(PANEL_PRESETS)}")
    if not metrics:
        return PANELS if preset == "paper" else GENERALISED_PANELS
    known = {p.metric: p for p in (*GENERALISED_PANELS, *PANELS)}
    return tuple(known.get(key, Panel(key, key, key)) for key in metrics)


def _read(table: pd.DataFrame | str | Path) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    path = Path(table)
    if not path.is_file():
        raise NctoolsError(f"no metrics table at {path} (write one with `nctools analyze RUN`)")
    return pd.read_csv(path)


def _runs(tables: Sequence[pd.DataFrame | str | Path] | pd.DataFrame | str | Path,
          hue: str | None = None):
    """Split the input into one (label, frame) per run; labels say dataset / arch. With
    ``hue`` (a column, e.g. a config key of :func:`nctools.analysis.collect.collect`), one
    (``hue=value``, frame) per value instead, holding all its runs (seeds)."""
    if isinstance(tables, (pd.DataFrame, str, Path)):
        tables = [tables]
    groups: list[tuple[str, str, pd.DataFrame]] = []  # (dataset / arch, run, rows)
    frames = []
    for i, table in enumerate(tables):
        df = _read(table)
        missing = {"epoch", "split", "metric", "value"} - set(df.columns)
        if missing:
            raise NctoolsError(f"metrics table {i} lacks the columns {sorted(missing)}")
        runs = df["run"] if "run" in df.columns else pd.Series(f"run{i}", index=df.index)
        frames.append(df.assign(run=runs.astype(str) + ("" if hue is None else f"#{i}")))
        for run, rows in df.groupby(runs.astype(str), sort=False):
            first = rows.iloc[0]
            label = f"{first.get('dataset', '?')} / {first.get('arch', '?')}"
            groups.append((label, run, rows))
    if hue is not None:
        return _hue_groups(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
                           hue)
    labels = [g[0] for g in groups]
    # Two runs of the same dataset and network (seeds, settings) need their names too.
    named = [f"{label} ({run})" if labels.count(label) > 1 else label
             for label, run, _ in groups]
    # and two of the same name (from different tables) a number: no two legend entries alike
    distinct = [f"{label} [{named[:i].count(label) + 1}]" if named.count(label) > 1 else label
                for i, label in enumerate(named)]
    return [(label, rows) for label, (_, _, rows) in zip(distinct, groups, strict=True)]


def _hue_groups(whole: pd.DataFrame, hue: str) -> list[tuple[str, pd.DataFrame]]:
    """One (label, rows) per value of ``hue`` and of every other config key that varies
    across the runs (``seed`` aside): runs are averaged over seeds only, never over a
    setting the user did not name (``train.lr=0.1 · train.loss=ce``)."""
    from nctools.analysis.collect import CONFIG_PREFIX, IDENTITY, config_column

    column = hue if hue in whole.columns else config_column(hue)
    if column not in whole.columns:
        raise NctoolsError(f"--hue {hue}: no such column in the metrics tables (config "
                           "keys are columns of a collected sweep, e.g. train.lr)")
    per_run = whole.drop_duplicates("run")
    others = [c for c in per_run.columns
              if c.startswith(CONFIG_PREFIX) and c not in (column, config_column("seed"),
                                                           *IDENTITY)
              and per_run[c].astype(str).nunique() > 1]
    keys = [column, *others]
    return [(" · ".join(f"{k.removeprefix(CONFIG_PREFIX)}={_show(v)}"
                        for k, v in zip(keys, values, strict=True)), rows)
            for values, rows in whole.groupby(keys, sort=True, dropna=False)]


def epoch_scale(runs: Sequence[tuple[str, pd.DataFrame]], epoch_axis: str = "auto") -> str:
    """``log`` or ``linear``: ``auto`` is log when a run goes past :data:`LOG_EPOCHS`
    epochs, linear otherwise."""
    if epoch_axis not in EPOCH_AXES:
        raise NctoolsError(f"--epoch-axis {epoch_axis!r}: use one of {', '.join(EPOCH_AXES)}")
    if epoch_axis != "auto":
        return epoch_axis
    last = max((float(rows["epoch"].max()) for _, rows in runs if len(rows)), default=0.0)
    return "log" if last > LOG_EPOCHS else "linear"


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def seed_band(rows: pd.DataFrame, metric: str, split: str) -> pd.DataFrame:
    """Mean and band of ``metric`` on ``split`` over the runs in ``rows`` (seeds), per epoch:
    columns ``epoch, mean, low, high, runs``; the band is the mean +- one standard deviation
    over the runs (ddof 1; no band for one run)."""
    sel = rows[(rows["metric"] == metric) & (rows["split"] == split)]
    wide = sel.pivot_table(index="epoch", columns="run", values="value", aggfunc="first")
    mean = wide.mean(axis=1)
    std = wide.std(axis=1, ddof=1).fillna(0.0)
    return pd.DataFrame({"epoch": wide.index.to_numpy(), "mean": mean.to_numpy(),
                         "low": (mean - std).to_numpy(), "high": (mean + std).to_numpy(),
                         "runs": wide.count(axis=1).to_numpy()})


def _onset(rows: pd.DataFrame) -> float | None:
    """The run's onset; for several runs (seeds) the median of their onsets."""
    if "tpt_onset_epoch" not in rows.columns:
        return None
    per_run = rows.groupby("run")["tpt_onset_epoch"].first() if "run" in rows.columns \
        else rows["tpt_onset_epoch"]
    onset = pd.to_numeric(per_run, errors="coerce").dropna()
    return float(onset.median()) if len(onset) else None


def _draw_panel(ax, panel: Panel, runs, colors, xscale: str) -> None:
    plotted: list[np.ndarray] = []
    for (_label, rows), color in zip(runs, colors, strict=True):
        several = "run" in rows.columns and rows["run"].nunique() > 1
        for split in panel.splits:
            sel = rows[(rows["metric"] == panel.metric) & (rows["split"] == split)]
            sel = sel.sort_values("epoch")
            if sel.empty:
                continue
            if several:  # seeds: their mean, and a band of +- one standard deviation
                band = seed_band(rows, panel.metric, split)
                x, y = band["epoch"].to_numpy(), band["mean"].to_numpy(dtype=float)
                low, high = band["low"].to_numpy(dtype=float), band["high"].to_numpy(dtype=float)
                if panel.transform is not None:
                    y, low, high = (panel.transform(v) for v in (y, low, high))
                ax.fill_between(x, np.minimum(low, high), np.maximum(low, high), color=color,
                                alpha=0.2, linewidth=0)
            else:
                x, y = sel["epoch"].to_numpy(), sel["value"].to_numpy(dtype=float)
                if panel.transform is not None:
                    y = panel.transform(y)
            ax.plot(x, y, SPLIT_STYLES.get(split, "-."), color=color,
                    marker="o", markersize=2.5, linewidth=1.2)
            plotted.append(y)
        onset = _onset(rows)
        if onset is not None:
            ax.axvline(onset, color=color, linestyle=":", linewidth=1.0)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xscale(xscale)
    ax.set_xlabel("epoch")
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.grid(True, alpha=0.3)
    if not plotted:
        ax.text(0.5, 0.5, f"no `{panel.metric}` in the table", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="gray")
        return
    values = np.concatenate(plotted)
    values = values[np.isfinite(values)]
    if len(values) and values.min() > 0 and values.max() / values.min() >= LOG_SPAN:
        ax.set_yscale("log")


def collapse_figure(
    tables: Sequence[pd.DataFrame | str | Path] | pd.DataFrame | str | Path,
    panels: Sequence[Panel] | None = None,
    *,
    hue: str | None = None,
    epoch_axis: str = "auto",
) -> Figure:
    """The collapse curves of one or several runs as a Figure of ``len(PANELS)`` panels.

    ``tables``: metrics tables (DataFrames or ``metrics.csv`` paths) in the long format of
    :func:`nctools.analysis.analyze`; several runs may share one table (``run`` column).
    ``hue``: one colour per value of this column (e.g. ``train.lr`` of a collected sweep);
    several runs of a value (seeds) are drawn as their mean with a +- 1 std band; every
    other config key that varies gets its own curves (never averaged over).
    ``epoch_axis``: ``log`` (the paper's), ``linear``, or ``auto``: log for runs longer
    than :data:`LOG_EPOCHS` epochs.
    ``panels``: chosen panels (:func:`select_panels`) instead of the paper's; those whose
    metric no table has are left out with a warning saying so.
    """
    from nctools.runs.layout import PENULTIMATE

    # inner layers (snapshot.layers) are drawn against depth (layer_plots), not here
    runs = [(label, rows[rows["layer"] == PENULTIMATE] if "layer" in rows.columns else rows)
            for label, rows in _runs(tables, hue)]
    if not runs:
        raise NctoolsError("nothing to plot: the metrics tables are empty")
    if panels is not None:
        present = set().union(*(set(rows["metric"]) for _, rows in runs))
        missing = [p.metric for p in panels if p.metric not in present]
        if missing:
            warnings.warn(f"left out the panels of {', '.join(missing)}: not in the tables",
                          stacklevel=2)
        panels = [p for p in panels if p.metric in present]
        if not panels:
            raise NctoolsError("nothing to plot: the tables have none of the chosen metrics")
    chosen = tuple(panels) if panels is not None else PANELS
    xscale = epoch_scale(runs, epoch_axis)
    colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(runs))]
    nrows = -(-len(chosen) // NCOLS)
    # A bare Figure on the Agg canvas, not pyplot: no display is needed, no window opens
    # and nothing stays registered with pyplot after the figure is dropped.
    fig = Figure(figsize=(4.2 * NCOLS, 3.3 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, NCOLS, squeeze=False).ravel()
    for ax, panel in zip(axes, chosen, strict=False):
        _draw_panel(ax, panel, runs, colors, xscale)
    for ax in axes[len(chosen):]:
        ax.remove()
    handles = [Line2D([], [], color=c, linewidth=2, label=label)
               for (label, _), c in zip(runs, colors, strict=True)]
    drawn = {split for _, rows in runs for split in rows["split"].unique()}
    handles += [Line2D([], [], color="black", linestyle=style, label=split)
                for split, style in SPLIT_STYLES.items() if split != "val" or split in drawn]
    handles.append(Line2D([], [], color="black", linestyle=":", label="TPT onset"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
               fontsize=9)
    return fig


def figure_format(out: str | Path) -> str:
    """The matplotlib format for ``out`` from its extension; an unknown one is an error."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise NctoolsError(
            f"cannot save a figure as {out}: unknown extension {suffix or '(none)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    return FORMATS[suffix]


def plot_runs(
    tables: Sequence[pd.DataFrame | str | Path] | pd.DataFrame | str | Path,
    out: str | Path,
    panels: Sequence[Panel] | None = None,
    *,
    hue: str | None = None,
    epoch_axis: str = "auto",
) -> Path:
    """Draw :func:`collapse_figure` and save it atomically to ``out`` (.png, .pdf or .svg)."""
    from nctools.runs.files import atomic_write_bytes

    out = Path(out)
    fmt = figure_format(out)  # fail before the (slow) drawing
    fig = collapse_figure(tables, panels, hue=hue, epoch_axis=epoch_axis)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out
