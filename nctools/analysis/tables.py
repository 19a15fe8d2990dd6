"""A run directory -> its neural-collapse metrics table (``RUN/metrics.csv``).

Usage::

    table = analyze("runs/demo")        # also: nctools analyze runs/demo

Every complete snapshot is measured on each saved split, streamed from disk in chunks
(:func:`nctools.measure.measure_chunks`, the engine of :func:`nctools.measure.measure`);
on the test split NC4 and ``ncc_accuracy`` use the training class means
(METRICS.md, "On other data"), as Papyan, Han & Donoho (PNAS 2020) report test-set
collapse. The table is long ("tidy"): one row per run, epoch, split and metric, with the
training history of that epoch joined as columns. Analysis is incremental: epochs
already in ``metrics.csv`` are not measured again, so a run still training can be
followed by calling :func:`analyze` again.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from nctools.config.schema import load_config
from nctools.errors import RunError, SnapshotError
from nctools.metrics.measure import CHUNK_ELEMENTS, METRIC_KEYS, measure_chunks
from nctools.runs import files, snapshots, store
from nctools.runs.layout import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE

IN_MEMORY_BYTES = 128 * 2**20  # a split up to this size is read once and measured in memory

KEY_COLUMNS = ["run", "dataset", "arch", "epoch", "split", "metric", "value"]
# the history columns each metrics row carries (the epoch is a key column already)
HISTORY_COLUMNS = [c for c in store.HISTORY_COLUMNS if c not in ("epoch", "seconds")]
COLUMNS = [*KEY_COLUMNS, *HISTORY_COLUMNS, "tpt_onset_epoch"]
SPLIT_ORDER = ("train", "test")  # train first: the test split needs the train class means
# Values read back must be the very floats written: pandas 3 parses floats exactly by
# default (and deprecates the option); pandas 2 needs float_precision="round_trip".
_EXACT_FLOATS = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def analyze(run_dir: str | Path, strict: bool = False, quiet: bool = True) -> pd.DataFrame:
    """Measure every snapshot of ``run_dir`` not yet in ``RUN/metrics.csv`` and rewrite it.

    Returns the whole table (old and new rows), columns :data:`COLUMNS`, sorted by epoch,
    split and metric order. A snapshot whose files fail their sha256 is skipped with a
    warning naming the file, or raises :class:`SnapshotError` when ``strict``. Unless
    ``quiet`` a progress bar over the snapshots goes to stderr when it is a terminal.

    Raises:
        RunError: no run directory at ``run_dir``, or a run without snapshots.
        SnapshotError: with ``strict``, a snapshot that fails verification.
    """
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise RunError(
            f"no run directory at {run_dir} (make one with `nctools train CONFIG --out {run_dir}`)"
        )
    epochs = snapshots.list_snapshots(run_dir)
    if not epochs:
        raise RunError(
            f"{run_dir} has no snapshots to analyze; make some with "
            f"`nctools train CONFIG --out {run_dir} --set snapshot.epochs=all`"
        )
    config = load_config(run_dir / CONFIG_FILE)
    ident = {"run": run_dir.resolve().name, "dataset": config.data.dataset,
             "arch": config.model.arch}

    started = time.time_ns()
    old = _read_table(run_dir / METRICS_FILE)
    if old is not None:  # a resumed run rewrites the snapshots past its checkpoint
        stale = _rewritten_since(run_dir, epochs, (run_dir / METRICS_FILE).stat().st_mtime_ns)
        old = old[~old["epoch"].astype(int).isin(stale)]
    done = set(old["epoch"].astype(int)) if old is not None else set()
    frames = [] if old is None else [old[KEY_COLUMNS]]
    todo = [epoch for epoch in epochs if epoch not in done]
    for epoch in tqdm(todo, desc=f"analyze {run_dir.name}", unit="snapshot",
                      disable=True if quiet else None):  # None: on a terminal only
        try:
            rows = measure_snapshot(run_dir, epoch)
        except SnapshotError as exc:
            if strict:
                raise
            warnings.warn(f"skipping the snapshot of epoch {epoch}: {exc}", stacklevel=2)
            continue
        frames.append(pd.DataFrame([{**ident, "epoch": epoch, **row} for row in rows]))
    if not frames:  # every snapshot failed verification
        table = pd.DataFrame(columns=KEY_COLUMNS)
    else:
        table = pd.concat(frames, ignore_index=True)
    table = _join_history(run_dir, table)
    files.atomic_write_text(run_dir / METRICS_FILE, table.to_csv(index=False))
    # The table is as old as the snapshots it read: one rewritten since then is stale.
    os.utime(run_dir / METRICS_FILE, ns=(started, started))
    return table


def _rewritten_since(run_dir: Path, epochs: list[int], since_ns: int) -> set[int]:
    """Epochs whose meta.json is newer than ``since_ns`` (or is being rewritten now)."""
    stale = set()
    for epoch in epochs:
        try:
            meta = snapshots.snapshot_dir(run_dir, epoch) / snapshots.META_FILE
            if meta.stat().st_mtime_ns > since_ns:
                stale.add(epoch)
        except FileNotFoundError:
            stale.add(epoch)
    return stale


def measure_snapshot(run_dir: Path, epoch: int, chunk_rows: int | None = None) -> list[dict]:
    """Rows ``{"split", "metric", "value"}`` of one snapshot, every METRICS.md key per split.

    A split whose files total at most :data:`IN_MEMORY_BYTES` is read once, its sha256
    checked on the bytes read, and measured in memory. A larger one (or any, when
    ``chunk_rows`` is given) streams from disk in chunks of ``chunk_rows`` rows (default:
    about 4M values, e.g. 8192 rows at D = 512), twice
    (:func:`nctools.measure.measure_chunks`), so memory does not grow with N; the first
    pass checks each file's sha256 before yielding its rows. The train split's class means
    come back from its own measurement and serve the test split's NC4 (no extra pass).
    Sharded snapshots read as one split.
    """
    meta = snapshots.read_meta(run_dir, epoch)
    weight, bias = snapshots.load_classifier(run_dir, epoch)
    num_classes, dim = weight.shape
    stream_rows = chunk_rows or max(1, CHUNK_ELEMENTS // dim)
    train_means = None
    rows = []
    for split in snapshot_splits(run_dir, epoch):
        names = meta["splits"][split]["files"]
        size = sum(meta["files"][name]["bytes"] for name in names)
        if chunk_rows is None and size <= IN_MEMORY_BYTES:
            held = [snapshots.load_split(run_dir, epoch, split)]  # features: (N, D), labels: (N,)

            def chunks(held: list = held) -> list:
                return held
        else:
            passes = iter([True, False])  # hash the files on the first pass only

            def chunks(split: str = split, passes=passes):  # (n, D), (n,) per chunk
                return snapshots.iter_split(run_dir, epoch, split, stream_rows, verify=next(passes))

        means = train_means if split != "train" else None
        values, split_means = measure_chunks(chunks, weight, bias, num_classes,
                                             class_means=means)
        if split == "train":
            train_means = split_means
        rows += [{"split": split, "metric": key, "value": values[key]} for key in METRIC_KEYS]
    # A resumed run rewrites the snapshots past its checkpoint; if that happened while the
    # files streamed unhashed, the numbers could mix two versions of the snapshot.
    if snapshots.read_meta(run_dir, epoch)["files"] != meta["files"]:
        raise SnapshotError(f"{snapshots.snapshot_dir(run_dir, epoch)}: rewritten while it was "
                            "measured (a resumed run?); analyze again")
    return rows


def snapshot_splits(run_dir: Path, epoch: int) -> list[str]:
    """The feature splits a snapshot holds, train first."""
    names = snapshots.read_meta(run_dir, epoch)["splits"]
    return sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s))


def read_table(path: str | Path) -> pd.DataFrame:
    """A ``metrics.csv`` as written, every float exactly.

    Raises RunError naming the file when it does not parse or lacks :data:`KEY_COLUMNS`.
    """
    try:
        table = pd.read_csv(path, **_EXACT_FLOATS)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RunError(f"{path}: not a metrics table ({type(exc).__name__}: {exc}); "
                       "delete it and run `nctools analyze` again") from None
    missing = set(KEY_COLUMNS) - set(table.columns)
    if missing:
        raise RunError(f"{path}: not a metrics table (lacks {sorted(missing)}); delete it")
    return table


def _read_table(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.is_file() else None


def _join_history(run_dir: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Add the epoch's history row and the run's TPT onset; recomputed on every call, so
    a table made while the run was training gets the onset once it is known."""
    try:
        history = store.read_history(run_dir)
    except (FileNotFoundError, SnapshotError, RunError):
        history = pd.DataFrame(columns=["epoch"])
    history = history.reindex(columns=["epoch", *HISTORY_COLUMNS])
    history = history.drop_duplicates("epoch", keep="last")
    table = table[KEY_COLUMNS].astype({"epoch": int})
    table = table.merge(history.astype({"epoch": int}), on="epoch", how="left")
    table["tpt_onset_epoch"] = _tpt_onset(run_dir, history)
    rank = {"split": {s: i for i, s in enumerate(SPLIT_ORDER)},
            "metric": {m: i for i, m in enumerate(METRIC_KEYS)}}
    table = table.sort_values(
        ["epoch", "split", "metric"],
        key=lambda col: col.map(rank[col.name]).fillna(len(rank[col.name]))
        if col.name in rank else col,
        kind="stable",
    )
    return table.reset_index(drop=True)[COLUMNS]


def _tpt_onset(run_dir: Path, history: pd.DataFrame) -> float:
    """First epoch with zero training error: run.json's ``tpt_onset_epoch``, else the
    history's first ``train_acc == 1`` (runs without a manifest); NaN before the onset."""
    manifest = store.read_manifest(run_dir) if (run_dir / MANIFEST_FILE).is_file() else {}
    onset = manifest.get("tpt_onset_epoch")
    if onset is None:
        reached = history.loc[history["train_acc"] >= 1.0, "epoch"]
        onset = reached.min() if len(reached) else None
    return float("nan") if onset is None else float(onset)
