"""Gather a sweep: every run's metrics table joined with its config, and the paper's pick.

Usage::

    table = collect(["sweeps/mnist-resnet18"])   # nctools collect SWEEP --out t.parquet
    best(table, "test_acc")                             # the best train.lr per cell

(:mod:`nctools.training.launch` plans and submits sweeps.) :func:`collect` brings every
run's ``metrics.csv`` up to date (:func:`nctools.analysis.tables.analyze` is incremental)
and adds the run's config as columns named ``config.`` + its dotted key
(``config.train.lr``, ``config.seed``, ``config.data.dataset``, ...: never confused with
the history's ``lr`` or ``train_loss``), plus ``sweep`` (the sweep folder), ``run_dir`` and
``status`` (the run's, from ``run.json``: ``completed``, ``interrupted``, ...). Papyan, Han &
Donoho (PNAS 2020) kept, per data set and network, the learning rate with the best final
test error: :func:`best` with ``metric="test_acc"``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from nctools.analysis.tables import analyze, table_options
from nctools.config.schema import config_to_dict, load_config
from nctools.config.typed_yaml import flatten, format_value
from nctools.errors import NctoolsError, RunError
from nctools.runs import snapshots, store
from nctools.runs.layout import CONFIG_FILE
from nctools.runs.sweeps import is_sweep, sweep_points

CONFIG_PREFIX = "config."  # the columns of config keys: config.train.lr, config.seed
IDENTITY = ("config.name", "sweep", "run_dir", "status")  # name a run, never a setting


def config_column(key: str) -> str:
    """The column of the config key ``key`` (``train.lr`` or ``config.train.lr``)."""
    return key if key.startswith(CONFIG_PREFIX) else CONFIG_PREFIX + key


def config_columns(run_dir: str | Path) -> dict[str, object]:
    """The run's config as ``{config.KEY: value}``; lists become their YAML text, so that
    every column holds scalars (and a parquet file can store it)."""
    flat = flatten(config_to_dict(load_config(Path(run_dir) / CONFIG_FILE)))
    return {config_column(k): format_value(v) if isinstance(v, list) else v
            for k, v in flat.items()}


def _runs_of(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(run directory, sweep name) for every run in ``paths``, each run once: a folder
    given twice is collected once, with a warning; recorded points without a run folder
    are named in a warning."""
    found: list[tuple[Path, str]] = []
    given: set[Path] = set()
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.resolve() in given:
            warnings.warn(f"{path}: given twice (collected once)", stacklevel=3)
            continue
        given.add(path.resolve())
        if is_sweep(path):
            points, sweep = sweep_points(path), path.resolve().name
            missing = [r.name for r in points if not (r / CONFIG_FILE).is_file()]
            if missing:
                warnings.warn(f"{path}: {len(missing)} of {len(points)} runs have no run "
                              f"folder (not started, or removed): {', '.join(missing)}; "
                              "left out", stacklevel=3)
            runs = [(r, sweep) for r in points if r.name not in missing]
        elif (path / CONFIG_FILE).is_file():
            runs = [(path, "")]
        else:
            raise RunError(f"{path}: neither a sweep (sweep.json) nor a run directory "
                           f"({CONFIG_FILE})")
        twice = [run.name for run, _ in runs if run.resolve() in seen]
        if twice:  # a run given alone and in its sweep
            warnings.warn(f"{path}: runs given twice (collected once): {', '.join(twice)}",
                          stacklevel=3)
        for run, sweep in runs:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append((run, sweep))
    return found


def collect(paths: Sequence[str | Path]) -> pd.DataFrame:
    """The metrics of every run in ``paths`` (sweep folders or run directories), one
    long table: the columns of ``metrics.csv`` plus ``sweep``, ``run_dir`` and one column
    per config key. ``run`` is ``SWEEP/RUN`` so that runs of two sweeps stay apart.

    Each run is collected once (a folder given twice: a warning). A run without
    snapshots yet (still queued), and a recorded point without a run folder, are left out
    with a warning. Raises RunError for a path that is neither a sweep nor a run directory.
    """
    frames = []
    for run, sweep in _runs_of(paths):
        if not snapshots.list_snapshots(run):
            warnings.warn(f"{run}: no snapshots yet; left out", stacklevel=2)
            continue
        table = analyze(run, **table_options(run))  # the choices its table records
        columns = config_columns(run)
        table = table.assign(
            run=f"{sweep}/{run.name}" if sweep else run.name, sweep=sweep,
            run_dir=str(run), status=store.read_manifest(run).get("status", "?"), **columns)
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
    minimised; runs not completed (``status``) are compared as they stand, with a warning
    naming them. ``over``: a config key (``train.lr`` or ``config.train.lr``). Returns one
    row per cell: the cell's keys, ``over``'s column, ``metric`` (the seed mean), ``seeds``
    (runs averaged) and ``candidates`` (values of ``over`` compared).
    """
    if metric not in table.columns:
        raise NctoolsError(f"--best {metric}: no such column; e.g. test_acc, test_loss, "
                           "train_acc")
    over = config_column(over)
    if over not in table.columns:
        raise NctoolsError(f"--over {over.removeprefix(CONFIG_PREFIX)}: no such config key "
                           "in the table")
    final = final_rows(table)
    _warn_unfinished(final)
    seed = config_column("seed")
    settings = [c for c in final.columns if c.startswith(CONFIG_PREFIX)]
    cells = [c for c in settings
             if c not in (over, seed, *IDENTITY) and final[c].astype(str).nunique() > 1]
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


def _warn_unfinished(final: pd.DataFrame) -> None:
    """A warning naming the runs (one row each in ``final``) that did not complete."""
    if "status" not in final.columns:
        return
    unfinished = final[final["status"] != "completed"]
    if len(unfinished):
        names = ", ".join(f"{row.run} ({row.status}, epoch {row.epoch})"
                          for row in unfinished.itertuples())
        warnings.warn(f"{len(unfinished)} runs did not complete and are compared at their "
                      f"last analysed epoch: {names}", stacklevel=3)
