"""`nctools.plot`: the collapse curves of runs as a matplotlib Figure, for a notebook.

Usage::

    fig = nctools.plot("runs/mnist")                      # a run folder
    fig = nctools.plot(["runs/a", "runs/b"], metrics=["nc1", "etf_means"])
    fig = nctools.plot(nctools.analyze("runs/a"))         # a metrics table

The figure is :func:`nctools.analysis.plots.collapse_figure`'s, the one ``nctools plot``
saves; nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nctools.errors import NctoolsError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

def plot(
    runs: pd.DataFrame | str | Path | Sequence[pd.DataFrame | str | Path],
    metrics: Sequence[str] | None = None,
    *,
    panels: str = "paper",
    hue: str | None = None,
) -> Figure:
    """One Figure of the collapse curves (Papyan, Han & Donoho, PNAS 2020, Figs. 1-7).

    Args:
        runs: a run folder (its ``metrics.csv``, or measured by :func:`nctools.analyze`
            when it has none yet), a ``metrics.csv`` path, a metrics DataFrame in the
            long format of :func:`nctools.analyze` (columns epoch, split, metric, value),
            or a list of them (one colour per run).
        metrics: one panel per key (docs/metrics.md names); default: the ``panels`` preset.
        panels: ``"paper"`` (Figs. 1-7 and the ETF distance) or ``"generalised"``.
        hue: one colour per value of this column (e.g. ``train.lr`` of a collected sweep),
            seeds drawn as a mean with a +- 1 std band.

    Returns:
        a ``matplotlib.figure.Figure`` (not registered with pyplot: display it in a
        notebook, or ``fig.savefig(path)``).

    Raises:
        NctoolsError naming the folder or file that holds no metrics, an unknown preset.
    """
    from nctools.analysis.plots import collapse_figure, select_panels

    items = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    if not items:
        raise NctoolsError("plot: no runs given")
    chosen = select_panels(metrics, panels) if metrics or panels != "paper" else None
    return collapse_figure([_table(item) for item in items], chosen, hue=hue)


def _table(item: pd.DataFrame | str | Path) -> pd.DataFrame:
    """A run folder's metrics table, a ``metrics.csv`` read exactly, a DataFrame as given."""
    from nctools.analysis.tables import analyze, read_table
    from nctools.runs.layout import METRICS_FILE

    if not isinstance(item, (str, Path)):
        return item
    path = Path(item)
    if path.is_dir():
        table = path / METRICS_FILE
        return read_table(table) if table.is_file() else analyze(path)
    if path.is_file():
        return read_table(path)
    raise NctoolsError(f"plot: {path}: no such run folder or metrics table")
