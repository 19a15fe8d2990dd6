"""Atomic file writes and sha256 checksums: how every file of a run reaches the disk.

Every file is written to ``.NAME.tmp-<host>-<pid>`` beside its final name, flushed, fsynced
and renamed into place, so a crash never leaves a half-written file under the final name
(:func:`remove_stale_temps` deletes the temp files of writers that died).

Usage::

    atomic_write_text(run / "notes.txt", text)    # temp file, fsync, rename
    check_file(path, {"sha256": ..., "bytes": ...})  # SnapshotError if it differs
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from nctools.errors import RunError, SnapshotError

PathLike = str | os.PathLike
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


def atomic_write(path: PathLike, write: Callable[[Path], None], sync_dir: bool = True) -> None:
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
        fsync_dir(path.parent)


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


def remove_stale_temps(folders: Iterable[Path]) -> list[Path]:
    """Delete the temp files in ``folders`` that writers on this host left when killed
    mid-write.

    A SIGKILL or power cut between a temp write and its rename leaves ``.NAME.tmp-*``
    beside the final name (a checkpoint or feature file: possibly gigabytes). Temp files of
    live processes and of other hosts are kept. Returns the deleted paths.
    """
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


def fsync_dir(folder: Path) -> None:
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
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save(obj, path)`` atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path: PathLike, data: dict) -> None:
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


def check_file(path: Path, expected: dict, data: bytes | None = None) -> None:
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
