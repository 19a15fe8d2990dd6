"""The run directory: its file names (every one here, once), manifest, history,
checkpoint and saved config. Atomic writes and checksums are :mod:`nctools.runs.files`;
snapshots (features, labels and classifier per epoch) are :mod:`nctools.runs.snapshots`.

Layout (docs/design.md, "The run folder")::

    RUN/config.yaml  run.json  history.csv  checkpoint.pt  metrics.csv
    RUN/snapshots/epoch-NNNN/{train,test}.safetensors  classifier.safetensors  meta.json

Usage::

    append_history(run, {"epoch": 3, "train_loss": 0.1})
    state = load_checkpoint(run / CHECKPOINT_FILE)  # weights_only: never runs code
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from nctools.config.schema import Config, config_to_dict
from nctools.errors import CheckpointError, RunError, SnapshotError  # noqa: F401 (re-exported)
from nctools.runs import files
from nctools.runs.files import PathLike, atomic_torch_save, atomic_write_text, write_json
from nctools.runs.layout import (  # the file names are re-exported: store.CONFIG_FILE, ...
    CHECKPOINT_FILE,  # noqa: F401
    CONFIG_FILE,  # noqa: F401
    HISTORY_COLUMNS,
    HISTORY_FILE,
    MANIFEST_FILE,
    METRICS_FILE,  # noqa: F401
    SNAPSHOTS_DIR,
)

if TYPE_CHECKING:
    import pandas as pd





def remove_stale_temps(run_dir: PathLike) -> list[Path]:
    """Delete what writers of this run killed mid-write left (:func:`files.remove_stale_temps`)
    in the run folder and its snapshot folders. Returns the deleted paths."""
    root = Path(run_dir)
    return files.remove_stale_temps([root, *sorted((root / SNAPSHOTS_DIR).glob("epoch-*"))])


def read_manifest(run_dir: PathLike) -> dict:
    """The run's ``run.json`` (versions, device, sizes, status, epochs done)."""
    path = Path(run_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: not found; is {run_dir} a run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: manifest is corrupt ({exc})") from None


def write_manifest(run_dir: PathLike, manifest: dict) -> None:
    """Write ``run.json`` atomically."""
    write_json(Path(run_dir) / MANIFEST_FILE, manifest)


def _corrupt_history(path: Path, why: str) -> RunError:
    return RunError(f"{path}: history is corrupt ({why}); restore it, or delete it "
                    "to start a new one")


def _read_history_rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        return list(HISTORY_COLUMNS), []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns, rows = list(reader.fieldnames or HISTORY_COLUMNS), list(reader)
        for row in rows:
            int(row["epoch"])  # every later use sorts and filters on it
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as exc:
        raise _corrupt_history(path, f"{type(exc).__name__}: {exc}") from None
    return columns, rows


def _write_history_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # floats go out as repr(): read back exactly
    atomic_write_text(path, out.getvalue())


def append_history(run_dir: PathLike, row: dict) -> None:
    """Add one epoch's row to ``history.csv`` (the whole file is rewritten atomically).

    A row for an epoch already present replaces it; a new key becomes a new column.
    """
    if "epoch" not in row:
        raise RunError(f"history row needs an 'epoch', got keys {sorted(row)}")
    path = Path(run_dir) / HISTORY_FILE
    columns, rows = _read_history_rows(path)
    columns += [key for key in row if key not in columns]
    rows = [r for r in rows if int(r["epoch"]) != int(row["epoch"])] + [row]
    rows.sort(key=lambda r: int(r["epoch"]))
    _write_history_rows(path, columns, rows)


def truncate_history(run_dir: PathLike, last_epoch: int) -> None:
    """Drop rows after ``last_epoch`` (a resumed run repeats them); no file is a no-op."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return
    columns, rows = _read_history_rows(path)
    _write_history_rows(path, columns, [r for r in rows if int(r["epoch"]) <= last_epoch])


def read_history(run_dir: PathLike) -> pd.DataFrame:
    """``history.csv`` as a DataFrame; empty with the standard columns if there is none."""
    import pandas as pd  # only the readers of tables need pandas

    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(HISTORY_COLUMNS))
    try:
        history = pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise _corrupt_history(path, f"{type(exc).__name__}: {exc}") from None
    epochs = history.get("epoch")
    if epochs is None or (len(epochs) and not pd.api.types.is_integer_dtype(epochs)):
        raise _corrupt_history(path, "no integer 'epoch' column")
    for column in HISTORY_COLUMNS:  # every standard column holds numbers (NaN allowed)
        if column in history and not pd.api.types.is_numeric_dtype(history[column]):
            bad = pd.to_numeric(history[column], errors="coerce").isna() & history[column].notna()
            if not bad.any():  # no rows, or only empty cells: text-typed, but no text
                continue
            row = int(bad.to_numpy().argmax()) + 2  # the header is line 1
            raise _corrupt_history(path, f"line {row}: {column} is not a number: "
                                         f"{history[column][bad].iloc[0]!r}")
    return history


def tpt_onset(epochs: Sequence[int], train_acc: Sequence[float | None],
              threshold: float) -> int | None:
    """The onset of the terminal phase of training: the first epoch whose eval-mode
    training accuracy reaches ``threshold`` (99.9%, and 99.6% on ImageNet, in Papyan, Han
    & Donoho, PNAS 2020); None if none does. ``train_acc`` holds None or NaN where it was
    not measured."""
    reached = [int(e) for e, acc in zip(epochs, train_acc, strict=True)
               if acc is not None and not math.isnan(acc) and acc >= threshold]
    return min(reached) if reached else None


def legacy_history(history: pd.DataFrame) -> pd.DataFrame:
    """A history written before ``train_acc_running`` existed, in today's columns: its
    ``train_acc`` was the running, train-mode accuracy, so it moves to
    ``train_acc_running`` and the eval-mode ``train_acc`` is unknown (NaN)."""
    if "train_acc_running" in history.columns or "train_acc" not in history.columns:
        return history
    history = history.rename(columns={"train_acc": "train_acc_running"})
    history.insert(list(history.columns).index("train_acc_running") + 1, "train_acc",
                   float("nan"))
    return history


def save_checkpoint(path: PathLike, state: dict) -> None:
    """Save a training state atomically.

    ``state`` may hold only tensors, numbers, strings, None and lists/tuples/dicts of them,
    so that :func:`load_checkpoint` can read it without unpickling arbitrary objects.
    """
    atomic_torch_save(state, path)


def _load_failure(exc: Exception) -> str:
    """The one informative line of a torch.load error (its text runs to a paragraph)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    line = found.group(1) if found else (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {line[:200]}"


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``: it can never run code.

    Any failure (a pickle of arbitrary objects, a truncated or non-torch file) raises
    CheckpointError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise CheckpointError(f"{path}: not a regular file, not a checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # a raw pickle draws a protocol warning: it is refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # every failure means the same to the user: do not trust it
        raise CheckpointError(
            f"{path}: checkpoint cannot be loaded safely ({_load_failure(exc)})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: checkpoint cannot be loaded safely "
                              f"(expected a dict, found {type(state).__name__})")
    return state


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (section order kept) atomically; load_config reads it back equal."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)
