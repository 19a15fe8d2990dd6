"""The run directory: atomic writes, snapshots with sha256 checksums, manifest, history.

Layout (DESIGN.md "Run directory")::

    RUN/config.yaml  run.json  history.csv  checkpoint.pt
    RUN/snapshots/epoch-NNNN/{train,test}.safetensors  classifier.safetensors  meta.json

Every file is written to ``.NAME.tmp-<host>-<pid>`` beside its final name, flushed, fsynced
and renamed into place, so a crash never leaves a half-written file under the final name
(:func:`remove_stale_temps` deletes the temp files of writers that died).
``meta.json`` is written last: a snapshot directory without it is incomplete and ignored.

Usage::

    write_snapshot(run, epoch=5, splits={"train": (features, labels)}, weight=W, bias=b)
    features, labels = load_split(run, 5, "train")       # features: (N, D), labels: (N,)
    for chunk, chunk_labels in iter_split(run, 5, "train", chunk_rows=4096): ...
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

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
META_FILE = "meta.json"
CLASSIFIER_FILE = "classifier.safetensors"
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")
SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
META_FORMAT = 1
HASH_BLOCK = 8 << 20  # 8 MiB: large enough to stream at disk speed, small enough for any host

_EPOCH_DIR = re.compile(r"epoch-(\d+)")


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
# Snapshots: writing


def snapshot_dir(run_dir: PathLike, epoch: int) -> Path:
    """``RUN/snapshots/epoch-NNNN`` (four digits at least)."""
    return Path(run_dir) / SNAPSHOTS_DIR / f"epoch-{epoch:04d}"


def _shard_suffix(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f"-{shard[0]:05d}-of-{shard[1]:05d}"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], sync_dir: bool = True) -> dict:
    """Write a safetensors file atomically; returns its meta entry (sha256, bytes)."""
    entry: dict = {}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        # hash the temp file before the rename: the page cache makes this read cheap
        entry.update(sha256=sha256_file(tmp), bytes=tmp.stat().st_size)

    _atomic_write(path, write, sync_dir)
    return entry


def _clear_snapshot(folder: Path, whole: bool) -> None:
    """Make a re-written snapshot incomplete first (meta.json goes), then drop stale files."""
    (folder / META_FILE).unlink(missing_ok=True)
    if not whole:  # other shards may be writing beside us; finalize removes leftovers
        return
    for stale in folder.iterdir():
        if stale.is_file() and (stale.suffix == ".safetensors" or stale.name.startswith("meta-")):
            stale.unlink(missing_ok=True)


def _check_snapshot_inputs(splits: dict, weight: torch.Tensor, bias: torch.Tensor | None,
                           dtype: str, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Raise SnapshotError on inconsistent shapes; returns (C, D)."""
    if dtype not in SNAPSHOT_DTYPES:
        raise SnapshotError(f"snapshot dtype must be one of {', '.join(SNAPSHOT_DTYPES)}, "
                            f"got {dtype!r}")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise SnapshotError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    if weight.ndim != 2:
        raise SnapshotError(f"classifier weight must be (C, D), got shape {tuple(weight.shape)}")
    C, D = weight.shape
    if bias is not None and tuple(bias.shape) != (C,):
        raise SnapshotError(f"classifier bias must be ({C},), got shape {tuple(bias.shape)}")
    if not splits:
        raise SnapshotError("write_snapshot needs at least one split")
    for name, (features, labels) in splits.items():
        if features.ndim != 2 or features.shape[1] != D:
            raise SnapshotError(f"{name} features must be (N, {D}) to match the classifier, "
                                f"got shape {tuple(features.shape)}")
        if tuple(labels.shape) != (features.shape[0],):
            raise SnapshotError(f"{name} labels must be ({features.shape[0]},), "
                                f"got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= C):
            raise SnapshotError(f"{name} labels must lie in [0, {C}), "
                                f"got [{int(labels.min())}, {int(labels.max())}]")
    return C, D


def write_snapshot(
    run_dir: PathLike,
    epoch: int,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: str = "float32",
    shard: tuple[int, int] | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Save the features of each split and the classifier at ``epoch``; returns the folder.

    ``splits``: name -> (features (N, D), labels (N,)); features are stored in ``dtype``
    (float32 | float16), labels as int64. ``weight``: (C, D), ``bias``: (C,) or None
    (stored as zeros), both float32. ``extra_meta`` is merged into meta.json.
    With ``shard=(rank, world)`` this rank writes ``train-RRRRR-of-WWWWW.safetensors`` and
    ``meta-RRRRR-of-WWWWW.json`` (rank 0 also the classifier); rank 0 then calls
    :func:`finalize_sharded_snapshot` after a barrier to write meta.json.
    """
    C, D = _check_snapshot_inputs(splits, weight, bias, dtype, shard)
    has_bias = bias is not None
    weight = weight.detach().to("cpu", torch.float32).contiguous()
    bias = bias.detach().to("cpu", torch.float32).contiguous() if has_bias else torch.zeros(C)
    folder = snapshot_dir(run_dir, epoch)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_snapshot(folder, whole=shard is None)  # only once the inputs are known to be good
    suffix = _shard_suffix(shard)
    files: dict[str, dict] = {}
    split_meta: dict[str, dict] = {}
    for name, (features, labels) in splits.items():
        file = f"{name}{suffix}.safetensors"
        files[file] = _save_tensors(folder / file, {
            "features": features.detach().to("cpu", SNAPSHOT_DTYPES[dtype]).contiguous(),
            "labels": labels.detach().to("cpu", torch.int64).contiguous(),
        }, sync_dir=False)
        split_meta[name] = {"files": [file], "rows": [features.shape[0]]}
    classifier = None
    if shard is None or shard[0] == 0:
        files[CLASSIFIER_FILE] = _save_tensors(folder / CLASSIFIER_FILE,
                                               {"weight": weight, "bias": bias}, sync_dir=False)
        classifier = {"file": CLASSIFIER_FILE, "weight_shape": [C, D], "bias_shape": [C],
                      "dtype": "float32", "has_bias": has_bias}
    _fsync_dir(folder)  # the renames above are durable before meta.json names them
    meta = _meta(epoch, dtype, C, D, split_meta, classifier, files, extra_meta)
    if shard is None:
        _write_json(folder / META_FILE, meta)  # last: the snapshot is complete from here on
    else:
        meta["shard"] = list(shard)
        _write_json(folder / f"meta{suffix}.json", meta)
    return folder


def _meta(epoch: int, dtype: str, C: int, D: int, split_meta: dict, classifier: dict | None,
          files: dict, extra: dict | None) -> dict:
    import nctools  # at call time: the package may still be importing this module

    meta = {
        "format": META_FORMAT,
        "epoch": epoch,
        "nctools_version": nctools.__version__,
        "num_classes": C,
        "dim": D,
        "dtype": dtype,
        "labels_dtype": "int64",
        "splits": {name: {**entry, "shape": [sum(entry["rows"]), D]}
                   for name, entry in split_meta.items()},
        "classifier": classifier,
        "files": files,
    }
    clash = set(extra or {}) & set(meta)
    if clash:
        raise SnapshotError(f"extra_meta may not set the reserved keys {sorted(clash)}")
    meta.update(extra or {})
    return meta


def finalize_sharded_snapshot(run_dir: PathLike, epoch: int, world: int) -> Path:
    """Merge the ``meta-RRRRR-of-WWWWW.json`` parts of all ranks into meta.json (rank 0).

    Splits list their shard files in rank order, so readers see one split.
    """
    folder = snapshot_dir(run_dir, epoch)
    parts = []
    for rank in range(world):
        part = folder / f"meta{_shard_suffix((rank, world))}.json"
        try:
            parts.append(json.loads(part.read_text()))
        except FileNotFoundError:
            raise SnapshotError(f"{part}: shard meta is missing; did rank {rank} write "
                                f"its snapshot?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{part}: shard meta is corrupt ({exc})") from None
    meta = parts[0]
    if meta.get("classifier") is None:
        raise SnapshotError(f"{folder}: rank 0 did not write the classifier")
    for rank, part in enumerate(parts[1:], start=1):
        for key in ("epoch", "dim", "num_classes", "dtype"):
            if part[key] != meta[key]:
                raise SnapshotError(f"{folder}: rank {rank} wrote {key}={part[key]}, "
                                    f"rank 0 wrote {meta[key]}")
        if set(part["splits"]) != set(meta["splits"]):
            raise SnapshotError(f"{folder}: rank {rank} wrote splits {sorted(part['splits'])}, "
                                f"rank 0 wrote {sorted(meta['splits'])}")
        for name, entry in part["splits"].items():
            merged = meta["splits"][name]
            merged["files"] += entry["files"]
            merged["rows"] += entry["rows"]
            merged["shape"] = [sum(merged["rows"]), meta["dim"]]
        meta["files"].update(part["files"])
    del meta["shard"]
    meta["world"] = world
    _write_json(folder / META_FILE, meta)
    for stale in folder.iterdir():  # parts, and files of an earlier layout meta does not list
        stale_data = stale.suffix == ".safetensors" and stale.name not in meta["files"]
        if stale.is_file() and (stale.name.startswith("meta-") or stale_data):
            stale.unlink(missing_ok=True)
    return folder


# ---------------------------------------------------------------------------------------
# Snapshots: reading


def list_snapshots(run_dir: PathLike) -> list[int]:
    """Epochs with a complete snapshot (one whose meta.json exists), ascending."""
    root = Path(run_dir) / SNAPSHOTS_DIR
    if not root.is_dir():
        return []
    epochs = []
    for folder in root.iterdir():
        match = _EPOCH_DIR.fullmatch(folder.name)
        if match and (folder / META_FILE).is_file():
            epochs.append(int(match.group(1)))
    return sorted(epochs)


def read_meta(run_dir: PathLike, epoch: int) -> dict:
    """The parsed meta.json of the snapshot at ``epoch``."""
    path = snapshot_dir(run_dir, epoch) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no complete snapshot at epoch {epoch} "
                            f"(have {list_snapshots(run_dir)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: snapshot meta is corrupt ({exc})") from None
    problem = _meta_problem(meta)
    if problem:
        raise SnapshotError(f"{path}: snapshot meta is corrupt ({problem})")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What makes a parsed meta.json unusable by the readers below, or None."""
    if not isinstance(meta, dict):
        return f"expected an object, found {type(meta).__name__}"
    files, splits = meta.get("files"), meta.get("splits")
    if not isinstance(files, dict) or not isinstance(splits, dict):
        return "it lacks the 'files' or 'splits' tables"
    for name, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            return f"no sha256 and size for {name}"
    listed = [CLASSIFIER_FILE]
    for split in splits.values():
        listed += split.get("files", []) if isinstance(split, dict) else [None]
    unknown = [name for name in listed if name not in files]
    return f"no checksum for {unknown[0]}" if unknown else None


def verify_snapshot(run_dir: PathLike, epoch: int) -> None:
    """Check the size and sha256 of every file of a snapshot; SnapshotError names a bad one."""
    meta = read_meta(run_dir, epoch)
    folder = snapshot_dir(run_dir, epoch)
    for name, expected in meta["files"].items():
        _check_file(folder / name, expected)


def _split_files(run_dir: PathLike, epoch: int, split: str) -> tuple[Path, dict, list[str]]:
    meta = read_meta(run_dir, epoch)
    if split not in meta["splits"]:
        raise SnapshotError(f"{snapshot_dir(run_dir, epoch)}: no {split!r} split "
                            f"(has {', '.join(meta['splits'])})")
    return snapshot_dir(run_dir, epoch), meta, meta["splits"][split]["files"]


def _load_file(path: Path, expected: dict, verify: bool) -> dict[str, torch.Tensor]:
    """Read a safetensors file once; hash those same bytes when ``verify``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{path}: snapshot file is missing") from None
    if verify:
        _check_file(path, expected, data)
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"{path}: snapshot file is corrupt ({exc})") from None


def load_split(
    run_dir: PathLike, epoch: int, split: str, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) in the stored dtype and labels (N,) int64 of one split.

    Sharded snapshots are concatenated in rank order. ``verify`` checks each file's sha256
    on the bytes read (each file is read once).
    """
    folder, meta, names = _split_files(run_dir, epoch, split)
    feats, labels = [], []
    for name in names:
        tensors = _load_file(folder / name, meta["files"][name], verify)
        feats.append(tensors["features"])
        labels.append(tensors["labels"])
    if len(names) == 1:
        return feats[0], labels[0]
    return torch.cat(feats), torch.cat(labels)


def iter_split(
    run_dir: PathLike, epoch: int, split: str, chunk_rows: int = 65536, verify: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream one split as (features (n, D), labels (n,)) chunks of at most ``chunk_rows``.

    Memory stays O(chunk_rows * D) whatever N is (each chunk is copied out of a mapping
    that is closed before the chunk is yielded).
    Chunks do not span shard files; concatenated, they equal :func:`load_split`.
    Each file's sha256 is checked (streamed) before any of its rows is yielded.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    folder, meta, names = _split_files(run_dir, epoch, split)
    for name in names:
        path = folder / name
        if verify:
            _check_file(path, meta["files"][name])
        elif not path.is_file():
            raise SnapshotError(f"{path}: snapshot file is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                rows = f.get_slice("features").get_shape()[0]
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{path}: snapshot file is corrupt ({exc})") from None
        for start in range(0, rows, chunk_rows):
            yield _read_rows(path, start, min(start + chunk_rows, rows))


def _read_rows(path: Path, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start, stop) of a split file, copied out of a mapping that is closed again:
    pages of a mapping held open stay resident, so streaming would grow with N."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("features")[start:stop], f.get_slice("labels")[start:stop]
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"{path}: snapshot file is corrupt ({exc})") from None


def load_classifier(
    run_dir: PathLike, epoch: int, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last-layer classifier at ``epoch``: weight (C, D) and bias (C,), float32."""
    meta = read_meta(run_dir, epoch)
    path = snapshot_dir(run_dir, epoch) / CLASSIFIER_FILE
    tensors = _load_file(path, meta["files"][CLASSIFIER_FILE], verify)
    return tensors["weight"], tensors["bias"]


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
