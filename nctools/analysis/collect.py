"""Gather a sweep: every run's metrics table joined with its config, and the paper's pick.

Usage::

    table = collect(["sweeps/mnist-resnet18"])   # nctools collect SWEEP --out t.parquet
    best(table, "test_acc")                             # the best train.lr per cell

(:mod:`nctools.training.launch` plans and submits sweeps.) :func:`collect` brings every
run's ``metrics.csv`` up to date (:func:`nctools.analysis.tables.analyze` is incremental)
and adds the run's config as columns named by dotted key (``train.lr``, ``seed``,
``data.dataset``, ...), plus ``sweep`` (the sweep folder) and ``run_dir``. Papyan, Han &
Donoho (PNAS 2020) kept, per data set and network, the learning rate with the best final
test error: :func:`best` with ``metric="test_acc"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from nctools.analysis.tables import analyze
from nctools.config.schema import config_to_dict, load_config
from nctools.config.typed_yaml import flatten, format_value
from nctools.errors import NctoolsError, RunError
from nctools.runs import snapshots
from nctools.runs.layout import CONFIG_FILE
from nctools.runs.sweeps import is_sweep, sweep_runs

IDENTITY = ("name", "sweep", "run_dir")  # columns that name a run, never a setting


def config_columns(run_dir: str | Path) -> dict[str, object]:
    """The run's config as ``{dotted key: value}``; lists become their YAML text, so that
    every column holds scalars (and a parquet file can store it)."""
    flat = flatten(config_to_dict(load_config(Path(run_dir) / CONFIG_FILE)))
    return {k: format_value(v) if isinstance(v, list) else v for k, v in flat.items()}


def collect(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The metrics of every run in ``paths`` (sweep folders or run directories), one
    long table: the columns of ``metrics.csv`` plus ``sweep``, ``run_dir`` and one column
    per config key. ``run`` is ``SWEEP/RUN`` so that runs of two sweeps stay apart.

    A run without snapshots yet (still queued) is skipped with a warning. Raises
    RunError for a path that is neither a sweep nor a run directory.
    """
    frames = []
    for path in map(Path, paths):
        if is_sweep(path):
            runs, sweep = sweep_runs(path), path.resolve().name
        elif (path / CONFIG_FILE).is_file():
            runs, sweep = [path], ""
        else:
            raise RunError(f"{path}: neither a sweep (sweep.json) nor a run directory "
                           f"({CONFIG_FILE})")
        for run in runs:
            if not snapshots.list_snapshots(run):
                warnings.warn(f"{run}: no snapshots yet; left out", stacklevel=2)
                continue
            table = analyze(run)
            columns = config_columns(run)
            table = table.assign(
                run=f"{sweep}/{run.name}" if sweep else run.name, sweep=sweep,
                run_dir=str(run), **columns)
            frames.append(table)
    if not frames:
        raise RunError(f"nothing to collect in {', '.join(map(str, paths))}: no run has "
                       "snapshots yet")
    return pd.concat(frames, ignore_index=True)


def write_table(table: pd.DataFrame, out: str | Path) -> Path:
    """``table`` as ``.parquet`` (pyarrow) or ``.csv``, by the extension of ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        table.to_parquet(out, engine="pyarrow", index=False)
    elif out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        raise NctoolsError(f"--out {out}: use a .parquet or .csv file name")
    return out


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its last analysed epoch (history columns and config), no metrics."""
    last = table.groupby("run")["epoch"].transform("max")
    rows = table[table["epoch"] == last]
    return rows.drop_duplicates("run").drop(columns=["split", "metric", "value"])


def best(table: pd.DataFrame, metric: str = "test_acc", over: str = "train.lr") -> pd.DataFrame:
    """Per cell, the value of ``over`` whose runs end with the best ``metric``.

    A cell is one combination of the config keys that vary across ``table`` other than
    ``over`` and ``seed`` (e.g. data set, network, loss). ``metric`` is a column of the
    table at each run's last epoch (``test_acc``, ``train_acc``, ``test_loss``, ...),
    averaged over seeds; accuracies are maximised, anything else (losses, errors)
    minimised. Returns one row per cell: the cell's keys, ``over``, ``metric`` (the seed
    mean), ``seeds`` (runs averaged) and ``candidates`` (values of ``over`` compared).
    """
    if metric not in table.columns:
        raise NctoolsError(f"--best {metric}: no such column; e.g. test_acc, test_loss, "
                           "train_acc")
    if over not in table.columns:
        raise NctoolsError(f"--over {over}: no such config key in the table")
    final = final_rows(table)
    settings = [c for c in final.columns if "." in c or c == "seed"]
    cells = [c for c in settings
             if c not in (over, "seed", *IDENTITY) and final[c].astype(str).nunique() > 1]
    means = final.groupby([*cells, over], dropna=False).agg(
        **{metric: (metric, "mean"), "seeds": (metric, "count")}).reset_index()
    maximise = metric.endswith(("acc", "accuracy"))
    rows = []
    for _, group in (means.groupby(cells, dropna=False) if cells else [((), means)]):
        group = group.dropna(subset=[metric])
        if group.empty:
            continue
        pick = group.loc[group[metric].idxmax() if maximise else group[metric].idxmin()]
        rows.append({**{c: pick[c] for c in cells}, over: pick[over], metric: pick[metric],
                     "seeds": int(pick["seeds"]), "candidates": len(group)})
    return pd.DataFrame(rows, columns=[*cells, over, metric, "seeds", "candidates"])
