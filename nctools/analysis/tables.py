"""A run directory -> its neural-collapse metrics table (``RUN/metrics.csv``).

Usage::

    table = analyze("runs/demo")        # also: nctools analyze runs/demo

Every complete snapshot is measured on each saved split, streamed from disk in chunks
(:func:`nctools.measure.measure_chunks`, the engine of :func:`nctools.measure.measure`);
on the test split NC4 and ``ncc_accuracy`` use the training class means
(docs/metrics.md, "On other data"), as Papyan, Han & Donoho (PNAS 2020) report test-set
collapse. The table is long ("tidy"): one row per run, epoch, split and metric, with the
training history of that epoch joined as columns. Analysis is incremental: epochs
already in ``metrics.csv`` are not measured again, so a run still training can be
followed by calling :func:`analyze` again.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from nctools.config.schema import load_config
from nctools.errors import ConfigError, RunError, SnapshotError
from nctools.metrics.engine import CLASSIFIER_FREE_KEYS, Engine, Layer, ReferenceMeans
from nctools.metrics.measure import (
    BEYOND_KEYS,
    CHUNK_ELEMENTS,
    METRIC_KEYS,
    Chunks,
    measure_chunks,
)
from nctools.runs import files, snapshots, store
from nctools.runs.layout import CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, PENULTIMATE

IN_MEMORY_BYTES = 128 * 2**20  # a split up to this size is read once and measured in memory

KEY_COLUMNS = ["run", "dataset", "arch", "epoch", "split", "layer", "metric", "value"]
# how the metrics were measured (docs/metrics.md "Choices that change the statistics"):
# the global mean ("samples" or "classes") and the class subset ("all", or ids "5,6,7")
OPTION_COLUMNS = ["global_mean", "classes"]
TABLE_METRICS = (*METRIC_KEYS, *BEYOND_KEYS, "classes_measured")  # row order of a table
# the history columns each metrics row carries (the epoch is a key column already); the
# accuracy is the eval-mode one, as the snapshot's: the running one stays in history.csv
HISTORY_COLUMNS = [c for c in store.HISTORY_COLUMNS
                   if c not in ("epoch", "seconds", "train_acc_running")]
COLUMNS = [*KEY_COLUMNS, *OPTION_COLUMNS, *HISTORY_COLUMNS, "tpt_onset_epoch"]
SPLIT_ORDER = ("train", "test")  # train first: the test split needs the train class means
# Values read back must be the very floats written: pandas 3 parses floats exactly by
# default (and deprecates the option); pandas 2 needs float_precision="round_trip".
_EXACT_FLOATS = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}


def analyze(
    run_dir: str | Path,
    strict: bool = False,
    *,
    global_mean: str = "samples",
    classes: list[int] | None = None,
    quiet: bool = True,
) -> pd.DataFrame:
    """Measure every snapshot of ``run_dir`` not yet in ``RUN/metrics.csv`` and rewrite it.

    ``global_mean`` and ``classes`` are :func:`nctools.measure`'s; the table records them
    (:data:`OPTION_COLUMNS`), and rows measured with other choices are measured again. A
    run trained with ``train.loss: mse`` also gets the MSE decomposition, with lambda =
    ``train.weight_decay / 2`` (nctools' MSE sums over classes and averages over samples,
    so SGD's weight decay wd is the objective's (wd/2)||theta||^2 at twice the docs/metrics.md
    scaling).

    Returns the whole table (old and new rows), columns :data:`COLUMNS`, sorted by epoch,
    split and metric order. A snapshot that fails its checks (a file failing its sha256, a
    meta.json that disagrees with its folder, NaN/Inf features or labels out of range) is
    skipped with a one-line warning naming it, or raises :class:`SnapshotError` when
    ``strict``. The table is written as it grows (at most every
    :data:`SAVE_EVERY_SECONDS`, and on Ctrl-C), so an interrupted call keeps the snapshots
    it finished. Old rows take the run's current name (a renamed run stays one run). A run
    folder this process cannot write (a colleague's, a read-only mount) is analysed in
    memory, with a warning, and nothing is written.
    Unless ``quiet`` a progress bar over the snapshots goes to stderr when it is a terminal.

    Raises:
        RunError: no run directory at ``run_dir``, or a run without snapshots.
        SnapshotError: with ``strict``, a snapshot that fails verification.
    """
    run_dir = Path(run_dir).expanduser()
    epochs = _snapshot_epochs(run_dir, strict)
    config = load_config(run_dir / CONFIG_FILE)
    ident = {"run": run_dir.resolve().name, "dataset": config.data.dataset,
             "arch": config.model.arch}

    if classes is not None:  # refused before the table is touched
        check_classes(classes, snapshots.read_meta(run_dir, epochs[-1])["num_classes"])
    writable = run_is_writable(run_dir)
    options = {"global_mean": global_mean,
               "classes": ",".join(map(str, classes)) if classes is not None else "all"}
    mse = config.train.weight_decay / 2 if config.train.loss == "mse" else None
    started = time.time_ns()
    old = _reusable_rows(run_dir, epochs, options, ident)
    done = set(old["epoch"].astype(int)) if old is not None else set()
    frames = [] if old is None else [old]
    todo = [epoch for epoch in epochs if epoch not in done]
    saved_at = time.monotonic()
    try:
        for epoch in tqdm(todo, desc=f"analyze {run_dir.name}", unit="snapshot",
                          disable=True if quiet else None):  # None: on a terminal only
            try:
                rows = measure_snapshot(run_dir, epoch, global_mean=global_mean,
                                        classes=classes, mse_weight_decay=mse)
            except SnapshotError as exc:
                _skip(str(exc), strict, f"skipping the snapshot of epoch {epoch}: ")
                continue
            frames.append(pd.DataFrame([{**ident, "epoch": epoch, **row, **options}
                                        for row in rows]))
            if writable and time.monotonic() - saved_at > SAVE_EVERY_SECONDS:
                _save(run_dir, _table(run_dir, frames), started)
                saved_at = time.monotonic()
    except KeyboardInterrupt:
        if writable:  # keep what this call finished
            _save(run_dir, _table(run_dir, frames), started)
        raise
    table = _table(run_dir, frames)
    if writable:
        _save(run_dir, table, started)
    elif todo:
        warnings.warn(f"{run_dir} is read-only: {METRICS_FILE} was not updated (the table "
                      "was computed in memory)", stacklevel=2)
    return table


def _snapshot_epochs(run_dir: Path, strict: bool) -> list[int]:
    """The run's snapshot epochs; RunError when there is no run or no snapshot, a warning
    (an error when ``strict``) for each folder that is not a snapshot's."""
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
    for stray in snapshots.stray_snapshot_folders(run_dir):
        _skip(f"{stray}: not the name of a snapshot folder (epoch-NNNN)", strict, "ignored ")
    return epochs


def _reusable_rows(run_dir: Path, epochs: list[int], options: dict,
                   ident: dict) -> pd.DataFrame | None:
    """The rows of the saved table that still hold: measured with the same ``options``,
    of snapshots not rewritten since (a resumed run rewrites those past its checkpoint),
    under the run's current name."""
    old = _read_table(run_dir / METRICS_FILE)
    if old is None:
        return None
    stale = _rewritten_since(run_dir, epochs, (run_dir / METRICS_FILE).stat().st_mtime_ns)
    old = _with_options(old)
    same = (old["global_mean"] == options["global_mean"]) & (
        old["classes"] == options["classes"])
    old = old[~old["epoch"].astype(int).isin(stale) & same]
    return old[[*KEY_COLUMNS, *OPTION_COLUMNS]].assign(**ident)


SAVE_EVERY_SECONDS = 10.0  # an interrupted or killed analysis loses at most this much work


def run_is_writable(run_dir: Path) -> bool:
    """Whether this process may write the run folder (False on a read-only mount)."""
    return os.access(run_dir, os.W_OK)


def current_table(run_dir: str | Path) -> pd.DataFrame:
    """The run's metrics table brought up to date (:func:`analyze` with the choices the
    table records, :func:`table_options`: only snapshots not yet in it are measured), or
    its ``metrics.csv`` as it is when the run kept no snapshots (a published result
    folder)."""
    run_dir = Path(run_dir).expanduser()
    table_file = run_dir / METRICS_FILE
    if table_file.is_file() and not snapshots.list_snapshots(run_dir):
        return read_table(table_file)
    return analyze(run_dir, **table_options(run_dir))


def table_options(run_dir: str | Path) -> dict:
    """The ``global_mean`` and ``classes`` the run's ``metrics.csv`` was measured with
    (:func:`analyze`'s keywords; its defaults where there is no table yet), so that
    bringing a table up to date never replaces the user's choice."""
    table = _read_table(Path(run_dir).expanduser() / METRICS_FILE)
    if table is None or table.empty:
        return {}
    table = _with_options(table)
    first = table.iloc[0]
    classes = None if first["classes"] == "all" else [int(c) for c in
                                                      str(first["classes"]).split(",")]
    return {"global_mean": str(first["global_mean"]), "classes": classes}


def check_classes(classes: list[int], num_classes: int) -> None:
    """ConfigError unless ``classes`` names at least 2 distinct classes of the run's
    ``num_classes`` (what :func:`nctools.measure` measures)."""
    given = ",".join(map(str, classes))
    if len(set(classes)) != len(classes):
        raise ConfigError(f"--classes {given}: a class is named twice")
    outside = [c for c in classes if not 0 <= c < num_classes]
    if outside:
        raise ConfigError(f"--classes {given}: the run has classes 0 to {num_classes - 1}; "
                          f"no class {', '.join(map(str, outside))}")
    if len(classes) < 2:
        raise ConfigError(f"--classes {given}: name at least 2 classes (collapse compares "
                          "classes)")


def _skip(message: str, strict: bool, skipping: str) -> None:
    """A snapshot that cannot be measured: SnapshotError when ``strict``, else a warning
    (``skipping`` + the message)."""
    if strict:
        raise SnapshotError(message)
    warnings.warn(skipping + message, stacklevel=3)


def _table(run_dir: Path, frames: list[pd.DataFrame]) -> pd.DataFrame:
    empty = pd.DataFrame(columns=[*KEY_COLUMNS, *OPTION_COLUMNS])
    table = pd.concat(frames, ignore_index=True) if frames else empty
    return _join_history(run_dir, table)


def _save(run_dir: Path, table: pd.DataFrame, started: int) -> None:
    """Write the table unless it is there already, as old as the snapshots it read."""
    path = run_dir / METRICS_FILE
    text = table.to_csv(index=False)
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return
    files.atomic_write_text(path, text)
    # The table is as old as the snapshots it read: one rewritten since then is stale.
    os.utime(path, ns=(started, started))


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


def _streamed(run_dir: Path, epoch: int, split: str, rows: int, passes: Iterator[bool]
              ) -> Iterator[tuple[Tensor, Tensor]]:
    """One pass over a split's file in chunks of ``rows``: (n, D), (n,) per chunk."""
    return snapshots.iter_split(run_dir, epoch, split, rows, verify=next(passes))


def measure_snapshot(
    run_dir: Path,
    epoch: int,
    chunk_rows: int | None = None,
    *,
    global_mean: str = "samples",
    classes: list[int] | None = None,
    mse_weight_decay: float | None = None,
) -> list[dict]:
    """Rows ``{"split", "metric", "value"}`` of one snapshot, every docs/metrics.md key per split
    that :func:`nctools.measure` returns with these options.

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
    train_means = ReferenceMeans(num_classes)
    rows = []
    for split in snapshot_splits(run_dir, epoch):
        names = meta["splits"][split]["files"]
        size = sum(meta["files"][name]["bytes"] for name in names)
        if chunk_rows is None and size <= IN_MEMORY_BYTES:
            held = [snapshots.load_split(run_dir, epoch, split)]  # features: (N, D), labels: (N,)
            chunks: Chunks = functools.partial(list, held)
        else:
            passes = iter([True, False])  # hash the files on the first pass only
            chunks = functools.partial(_streamed, run_dir, epoch, split, stream_rows, passes)
        try:
            values, split_means = measure_chunks(
                chunks, weight, bias, num_classes, class_means=train_means.for_split(split),
                global_mean=global_mean, classes=classes, mse_weight_decay=mse_weight_decay)
        except ValueError as exc:  # NaN features, labels out of range: this snapshot only
            raise SnapshotError(f"{snapshots.snapshot_dir(run_dir, epoch)}: the {split} split "
                                f"cannot be measured ({exc})") from None
        train_means.keep(split, split_means, classes)
        rows += [{"split": split, "layer": PENULTIMATE, "metric": key, "value": value}
                 for key, value in values.items()]
    rows = _inner_layer_rows(run_dir, epoch, meta, stream_rows) + rows
    # A resumed run rewrites the snapshots past its checkpoint; if that happened while the
    # files streamed unhashed, the numbers could mix two versions of the snapshot.
    if snapshots.read_meta(run_dir, epoch)["files"] != meta["files"]:
        raise SnapshotError(f"{snapshots.snapshot_dir(run_dir, epoch)}: rewritten while it was "
                            "measured (a resumed run?); analyze again")
    return rows


def _inner_layer_rows(run_dir: Path, epoch: int, meta: dict, chunk_rows: int) -> list[dict]:
    """Classifier-free metrics of each inner layer the snapshot holds (``snapshot.layers``),
    in depth order; on the test split NC4's centres are the train split's class means."""
    num_classes = meta["num_classes"]
    rows = []
    for layer in snapshots.snapshot_layers(meta):
        train_means = ReferenceMeans()
        for split in snapshot_splits(run_dir, epoch):
            engine = Engine(num_classes, {layer: Layer(class_means=train_means.for_split(split))})
            for verify in (True, False):  # hash the files on the first pass only
                for feats, labels in snapshots.iter_split(run_dir, epoch, split, chunk_rows,
                                                          verify=verify, layer=layer):
                    engine.update(feats, labels)
                engine.end_pass()
            values = engine.result()
            train_means.keep(split, engine.class_means())
            rows += [{"split": split, "layer": layer, "metric": key, "value": values[key]}
                     for key in CLASSIFIER_FREE_KEYS]
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
    missing = set(KEY_COLUMNS) - {"layer"} - set(table.columns)
    if missing:
        raise RunError(f"{path}: not a metrics table (lacks {sorted(missing)}); delete it")
    if "layer" not in table.columns:  # written before layer-wise collapse: all penultimate
        table.insert(table.columns.get_loc("metric"), "layer", PENULTIMATE)
    return table


def _read_table(path: Path) -> pd.DataFrame | None:
    return read_table(path) if path.is_file() else None


def _join_history(run_dir: Path, table: pd.DataFrame) -> pd.DataFrame:
    """Add the epoch's history row and the run's TPT onset; recomputed on every call, so
    a table made while the run was training gets the onset once it is known."""
    try:
        history = store.legacy_history(store.read_history(run_dir))
    except (FileNotFoundError, SnapshotError, RunError) as exc:
        # the metrics do not depend on it: measured anyway, said once, never silently
        warnings.warn(f"{exc}; the table is written without its history columns",
                      stacklevel=3)
        history = pd.DataFrame(columns=["epoch"])
    history = history.reindex(columns=["epoch", *HISTORY_COLUMNS])
    history = history.drop_duplicates("epoch", keep="last")
    table = _with_options(table)[[*KEY_COLUMNS, *OPTION_COLUMNS]].astype({"epoch": int})
    table = table.merge(history.astype({"epoch": int}), on="epoch", how="left")
    table["tpt_onset_epoch"] = _tpt_onset(run_dir, history)
    rank = {"split": {s: i for i, s in enumerate(SPLIT_ORDER)},
            "metric": {m: i for i, m in enumerate(TABLE_METRICS)}}
    # layers keep the order they were measured in (depth, the penultimate last)
    rank["layer"] = {name: i for i, name in enumerate(pd.unique(table["layer"]))}
    table = table.sort_values(
        ["epoch", "split", "layer", "metric"],
        key=lambda col: col.map(rank[col.name]).fillna(len(rank[col.name]))
        if col.name in rank else col,
        kind="stable",
    )
    return table.reset_index(drop=True)[COLUMNS]


def _with_options(table: pd.DataFrame) -> pd.DataFrame:
    """The table with :data:`OPTION_COLUMNS` (a table written before them: the defaults)."""
    table = table.copy()
    if "global_mean" not in table.columns:
        table["global_mean"] = "samples"
    if "classes" not in table.columns:
        table["classes"] = "all"
    table["classes"] = table["classes"].fillna("all").astype(str)
    return table


def _tpt_onset(run_dir: Path, history: pd.DataFrame) -> float:
    """The onset of the terminal phase: run.json's ``tpt_onset_epoch``, else the first
    history row whose eval-mode ``train_acc`` reaches the config's ``train.tpt_accuracy``
    (:func:`nctools.runs.store.tpt_onset`; runs without a manifest); NaN before the onset."""
    manifest = store.read_manifest(run_dir) if (run_dir / MANIFEST_FILE).is_file() else {}
    onset = manifest.get("tpt_onset_epoch")
    if onset is None:
        threshold = load_config(run_dir / CONFIG_FILE).train.tpt_accuracy
        accuracy = pd.to_numeric(history["train_acc"], errors="coerce")
        onset = store.tpt_onset(history["epoch"].astype(int).tolist(), accuracy.tolist(),
                                threshold)
    return float("nan") if onset is None else float(onset)
