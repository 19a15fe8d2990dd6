"""Layer-wise collapse: metrics against depth for chosen epochs (``nctools plot RUN --by layer``).

Usage::

    plot_layers("runs/demo/metrics.csv", "depth.png", epochs=[1, 30])
    plot_layers(measure_table(by_layer, "test"), "depth.png", title="resnet18 on cifar10")

Reads the long table of :func:`nctools.analysis.analyze` of a run trained with
``snapshot.layers`` (its ``layer`` column, in depth order, the penultimate features
last). One line per epoch (train solid, test dashed); the first panel carries He & Su's
"law of data separation" (2023): log(separation fuzziness) falls about linearly with
depth, and the legend gives the least-squares slope's decay ratio exp(slope) per layer
on the training split. Where the table has no ``separation_fuzziness``, log(``nc1``) is
fitted instead: on balanced data separation fuzziness is C x ``nc1``, so the slope and
the ratio are the same. A panel whose metric no layer defines (the simplex-ETF keys of a
language model, whose vocabulary exceeds its width plus one) gives its place to the next
of ``SPARE_PANELS``. :func:`measure_table` makes the table of one measurement
(``nctools measure --layers ... --plot``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nctools.analysis.plots import SPLIT_STYLES, figure_format
from nctools.errors import NctoolsError

FUZZINESS = ("separation_fuzziness", "nc1")  # the fitted metric: the first the table has
PANELS = (
    ("nc1_ratio", "NC1: Tr(Σ_W) / Tr(Σ_B)"),
    ("cdnv", "NC1: class-distance normalised variance"),
    ("ncc_accuracy", "nearest-class-centre accuracy"),
    ("etf_means", "NC2: distance to simplex ETF, class means"),
    ("equinorm_means", "NC2: equinorm of class means"),
)
# In the place of a panel the table leaves undefined (the simplex-ETF keys of a vocabulary,
# C > D + 1: Wu & Papyan 2024), in this order.
SPARE_PANELS = (
    ("gnc2_means", "GNC2: hyperspherical uniformity, class means"),
    ("unc3", "UNC3: uniformity of duality (LM head)"),
    ("separation_fuzziness", "separation fuzziness"),
    ("nc1", "NC1: Tr(Σ_W Σ_B^+) / C"),
)
MAX_DEFAULT_EPOCHS = 4


def separation_fit(depth: np.ndarray, values: np.ndarray) -> tuple[float, float, float]:
    """He & Su (2023): least squares of log(values) = a + b depth -> (b, a, exp(b)).

    depth: (L,) layer indices; values: (L,) positive separation fuzziness (or nc1).
    exp(b) is the decay ratio: how much each layer divides the fuzziness by.
    """
    keep = np.isfinite(values) & (values > 0)
    if keep.sum() < 2:
        return float("nan"), float("nan"), float("nan")
    slope, intercept = np.polyfit(depth[keep], np.log(values[keep]), 1)
    return float(slope), float(intercept), float(np.exp(slope))


def measure_table(result: Mapping[str, Mapping[str, float]], split: str,
                  run: str = "measured") -> pd.DataFrame:
    """One measurement ``{layer: {metric: value}}`` (layers in depth order, as
    ``measure_model`` and ``measure_language_model`` return them) as the long table
    :func:`layer_figure` reads: columns run, epoch (0), split, layer, metric, value."""
    rows = [(run, 0, split, layer, metric, float(value))
            for layer, values in result.items() for metric, value in values.items()]
    return pd.DataFrame(rows, columns=["run", "epoch", "split", "layer", "metric", "value"])


def layer_figure(table: pd.DataFrame | str | Path, epochs: Sequence[int] | None = None,
                 title: str | None = None) -> Figure:
    """Metrics against depth for ``epochs`` (default: up to four snapshot epochs spread
    over the run) of one run's table with a ``layer`` column; with ``title``, the figure
    of one measurement (:func:`measure_table`): that title, no epochs in the legend."""
    table = table if isinstance(table, pd.DataFrame) else _read(Path(table))
    if "layer" not in table.columns or table["layer"].nunique() < 2:
        raise NctoolsError("plot --by layer: the table has one layer only; train with "
                           "snapshot.layers (e.g. --set snapshot.layers=blocks) and analyze")
    if table["run"].nunique() > 1:
        raise NctoolsError("plot --by layer: give one run")
    layers = list(pd.unique(table["layer"]))  # depth order, as analyze wrote it
    depth = {name: i + 1 for i, name in enumerate(layers)}
    available = sorted(int(e) for e in table["epoch"].unique())
    chosen = _epochs(available, epochs)
    fitted = next((m for m in FUZZINESS if m in set(table["metric"])), None)
    if fitted is None:
        raise NctoolsError("plot --by layer: the table has neither separation_fuzziness nor nc1")
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(chosen)))
    fig = Figure(figsize=(4.4 * 3, 3.4 * 2 + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    panels = ((fitted, f"log {fitted} against depth (He & Su 2023)"),
              *_defined_panels(table[table["epoch"].isin(chosen)], fitted))
    present = set(table["split"])
    splits = [s for s in ("train", "test") if s in present] or sorted(present)
    for ax, (metric, heading) in zip(axes, panels, strict=True):
        for epoch, color in zip(chosen, colors, strict=True):
            for split in splits:
                sel = table[(table["epoch"] == epoch) & (table["split"] == split)
                            & (table["metric"] == metric)]
                if sel.empty:
                    continue
                x = sel["layer"].map(depth).to_numpy(dtype=float)
                y = sel["value"].to_numpy(dtype=float)
                label = None
                if metric == fitted and split == splits[0]:
                    slope, intercept, ratio = separation_fit(x, y)
                    label = f"decay ratio {ratio:.3g} per layer"
                    label = label if title is not None else f"epoch {epoch}: {label}"
                    ax.plot(x, np.exp(intercept + slope * x), ":", color=color, linewidth=1)
                ax.plot(x, y, SPLIT_STYLES.get(split, "-"), color=color, marker="o",
                        markersize=3, linewidth=1.2, label=label)
        if metric == fitted:
            ax.set_yscale("log")
        ax.set_title(heading, fontsize=9)
        ax.set_xticks(range(1, len(layers) + 1), layers, rotation=30, fontsize=7)
        ax.set_xlabel("layer (depth)")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("layer-wise collapse: train solid, test dashed, dotted: log-linear fit"
                 if title is None else f"{title} (dotted: log-linear fit)", fontsize=10)
    return fig


def _defined_panels(table: pd.DataFrame, fitted: str) -> list[tuple[str, str]]:
    """The five panels after the fitted one: ``PANELS``, each whose metric no layer of
    ``table`` defines replaced by the next defined one of ``SPARE_PANELS``."""
    finite = table[np.isfinite(table["value"].to_numpy(dtype=float))]
    defined = set(finite["metric"])
    spares = [p for p in SPARE_PANELS if p[0] in defined and p[0] != fitted]
    panels = []
    for panel in PANELS:
        if panel[0] in defined or not spares:
            panels.append(panel)
        else:
            panels.append(spares.pop(0))
    return panels


def plot_layers(table: pd.DataFrame | str | Path, out: str | Path,
                epochs: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Draw :func:`layer_figure` and save it atomically to ``out`` (.png, .pdf or .svg)."""
    from nctools.runs.files import atomic_write_bytes

    out = Path(out)
    fmt = figure_format(out)
    fig = layer_figure(table, epochs, title)
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=150)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _epochs(available: list[int], epochs: Sequence[int] | None) -> list[int]:
    if epochs:
        missing = [e for e in epochs if e not in available]
        if missing:
            raise NctoolsError(f"--epochs: no snapshot at epoch {missing[0]} "
                               f"(analysed epochs: {available})")
        return list(epochs)
    if len(available) <= MAX_DEFAULT_EPOCHS:
        return available
    picks = np.linspace(0, len(available) - 1, MAX_DEFAULT_EPOCHS).round().astype(int)
    return [available[i] for i in sorted(set(picks))]


def _read(path: Path) -> pd.DataFrame:
    from nctools.analysis.tables import read_table

    if not path.is_file():
        raise NctoolsError(f"no metrics table at {path} (write one with `nctools analyze RUN`)")
    return read_table(path)
