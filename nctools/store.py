"""The run directory: atomic writes, sha256 checksums, manifest, history, checkpoint.

Layout (DESIGN.md "Run directory")::

    RUN/config.yaml  run.json  history.csv  checkpoint.pt
    RUN/snapshots/epoch-NNNN/{train,test}.safetensors  classifier.safetensors  meta.json

Every file is written to ``.NAME.tmp-<host>-<pid>`` beside its final name, flushed, fsynced
and renamed into place, so a crash never leaves a half-written file under the final name
(:func:`remove_stale_temps` deletes the temp files of writers that died).
``meta.json`` is written last: a snapshot directory without it is incomplete and ignored.

Snapshots (features, labels and classifier per epoch) are :mod:`nctools.snapshots`.

Usage::

    atomic_write_text(run / "notes.txt", text)    # temp file, fsync, rename
    append_history(run, {"epoch": 3, "train_loss": 0.1})
    state = load_checkpoint(run / CHECKPOINT_FILE)  # weights_only: never runs code
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from nctools.errors import CheckpointError, RunError, SnapshotError

if TYPE_CHECKING:
    import pandas as pd

PathLike = str | os.PathLike

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "run.json"
HISTORY_FILE = "history.csv"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
SNAPSHOTS_DIR = "snapshots"
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")
HASH_BLOCK = 8 << 20  # 8 MiB: large enough to stream at disk speed, small enough for any host



def _fault_delay() -> float:
    """Seconds to pause between writing a temp file and renaming it into place.

    Set only by the fault tests (``NCTOOLS_FAULT_DELAY=0.1``): the pause widens the moment
    a process can be killed mid-write, so that the tests hit it reliably. Unset: 0.
    """
    try:
        return max(0.0, float(os.environ.get("NCTOOLS_FAULT_DELAY") or 0.0))
    except ValueError:
        return 0.0


_FAULT_DELAY = _fault_delay()
# Temp files carry the writer's host and pid, so a crashed writer's leftovers are told
# apart from those of a live one (on this host or another sharing the file system).
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(r"\..+\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)")

# safetensors creates files 0600; give every file the mode open() would (0666 minus umask).
# Reading the umask means setting it: done once, at import.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# ---------------------------------------------------------------------------------------
# Atomic writes


def _atomic_write(path: PathLike, write: Callable[[Path], None], sync_dir: bool = True) -> None:
    """Call ``write(tmp)`` then fsync and rename ``tmp`` to ``path``.

    ``sync_dir=False`` leaves the folder's fsync (which makes the rename durable) to the
    caller, who renames several files into one folder and syncs it once. On any failure
    the temp file is removed and ``path`` keeps its previous content; an OSError (disk
    full, permission) becomes RunError naming ``path``.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{_HOST}-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
        except (RuntimeError, SafetensorError) as exc:
            # torch.save and safetensors report a full disk in their own words
            raise RunError(f"cannot write {path}: {_write_failure(exc, path.parent)}") from exc
        os.chmod(tmp, 0o666 & ~_UMASK)
        # O_RDWR: fsync needs a writable descriptor on some platforms
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if _FAULT_DELAY:
            time.sleep(_FAULT_DELAY)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RunError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    if sync_dir:
        _fsync_dir(path.parent)


def _write_failure(exc: Exception, folder: Path) -> str:
    """Why a torch/safetensors write failed, in one line.

    safetensors names the OS error (``... No space left on device (os error 28)``);
    torch.save only says ``unexpected pos 576 vs 534``, so the free space is checked.
    """
    found = re.search(r"I/O error: (.*?) \(os error \d+\)", str(exc))
    if found:
        return found.group(1)
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free == 0:
            return "No space left on device"
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"the write failed ({type(exc).__name__}: {line}); is the disk full or read-only?"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def remove_stale_temps(run_dir: PathLike) -> list[Path]:
    """Delete the temp files that writers on this host left when killed mid-write.

    A SIGKILL or power cut between a temp write and its rename leaves ``.NAME.tmp-*``
    beside the final name (a checkpoint or feature file: possibly gigabytes). Temp files of
    live processes and of other hosts are kept. Returns the deleted paths.
    """
    root = Path(run_dir)
    folders = [root, *sorted((root / SNAPSHOTS_DIR).glob("epoch-*"))]
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _TEMP_NAME.fullmatch(path.name)
            if (match and match["host"] == _HOST and not _pid_alive(int(match["pid"]))
                    and path.is_file()):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of the temp files nctools writes before renaming."""
    return _TEMP_NAME.fullmatch(name) is not None


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; not every platform can open a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _write_json(path: PathLike, data: dict) -> None:
    # default=str: Paths and torch dtypes in a manifest are worth keeping as text
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------
# Checksums


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks so memory does not grow with its size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _check_file(path: Path, expected: dict, data: bytes | None = None) -> None:
    """Raise SnapshotError unless ``path`` (or its bytes ``data``) matches its meta entry."""
    if data is None:
        if not path.is_file():
            raise SnapshotError(f"{path}: snapshot file is missing")
        size = path.stat().st_size
    else:
        size = len(data)
    if size != expected["bytes"]:
        raise SnapshotError(
            f"{path}: snapshot file is corrupt (truncated or overwritten: "
            f"{size} bytes, meta.json says {expected['bytes']})"
        )
    actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if actual != expected["sha256"]:
        raise SnapshotError(
            f"{path}: snapshot file is corrupt (sha256 {actual[:12]}... does not match "
            f"{expected['sha256'][:12]}... in meta.json)"
        )


# ---------------------------------------------------------------------------------------
# Manifest, history, checkpoints


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
    _write_json(Path(run_dir) / MANIFEST_FILE, manifest)


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
