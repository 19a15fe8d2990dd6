"""One model forward pass for both of ``measure_chunks``' passes: the first pass's feature
chunks are written to a temporary folder as they stream by and the second pass reads
them back, instead of running the model over the data again.

Usage (by :func:`nctools.integrations.core.measure_splits`)::

    with spilled(split_chunks, spill_dir) as chunks:   # a temporary folder in spill_dir
        result, means = measure_chunks(chunks, weight, bias)   # the model runs once
    # the folder and its files are gone, also after an error or KeyboardInterrupt

Each chunk's features (n, D) and labels (n,) are stored as their raw bytes in their own
dtype (float16 and bfloat16 included), so the second pass sees bit for bit the tensors
of the first: the metrics equal those of two forward passes of a deterministic eval-mode
model, and of a loader that shuffles or augments they are those of one set of features
(two forward passes would centre the second pass's features on other samples' means).
Only one chunk is in memory at a time; the disk holds N x (D x the features' itemsize +
the labels' itemsize) bytes for the split (about 4 MB for N = 4096, D = 256 float32).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nctools.metrics.measure import Chunks

FEATURES_SUFFIX, LABELS_SUFFIX = ".features", ".labels"


@dataclass(frozen=True)
class _Stored:
    """Where one stored tensor is and what it was: the bytes alone do not say."""

    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _write(tensor: Tensor, path: Path) -> _Stored:
    flat = tensor.detach().contiguous().reshape(-1)
    flat.cpu().view(torch.uint8).numpy().tofile(path)
    return _Stored(path, tuple(tensor.shape), tensor.dtype, tensor.device)


def _read(stored: _Stored) -> Tensor:
    raw = torch.from_numpy(np.fromfile(stored.path, dtype=np.uint8))
    if raw.numel() == 0:  # an empty chunk: NumPy's empty array has no stride to view
        return torch.empty(stored.shape, dtype=stored.dtype, device=stored.device)
    return raw.view(stored.dtype).reshape(stored.shape).to(stored.device)


class SpilledChunks:
    """A chunks callable (as ``measure_chunks`` takes) that calls ``source`` once.

    The first call streams ``source()``'s ``(features (n, D), labels (n,))`` chunks through,
    writing each to ``folder`` before passing it on; once that pass has run to its end,
    every later call reads the chunks back from ``folder``, one at a time, onto the
    devices they came from. A first pass left unfinished is run again from ``source``.
    """

    def __init__(self, source: Chunks, folder: str | os.PathLike) -> None:
        self.source, self.folder = source, Path(folder)
        self.stored: list[tuple[_Stored, _Stored]] = []
        self.complete = False

    def __call__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._replay() if self.complete else self._spill()

    def _spill(self) -> Iterator[tuple[Tensor, Tensor]]:
        self.clear()
        for index, (features, labels) in enumerate(self.source()):
            features, labels = torch.as_tensor(features), torch.as_tensor(labels)
            name = self.folder / f"{index:06d}"
            self.stored.append((_write(features, name.with_suffix(FEATURES_SUFFIX)),
                                _write(labels, name.with_suffix(LABELS_SUFFIX))))
            yield features, labels
        self.complete = True

    def _replay(self) -> Iterator[tuple[Tensor, Tensor]]:
        for features, labels in self.stored:
            yield _read(features), _read(labels)

    def clear(self) -> None:
        """Delete the stored chunks (the next call runs ``source`` again)."""
        for pair in self.stored:
            for stored in pair:
                stored.path.unlink(missing_ok=True)
        self.stored, self.complete = [], False


def check_spill_dir(spill_dir: str | os.PathLike | None) -> str | None:
    """``spill_dir`` as a path string (None: the system's temporary folder), or a
    ValueError when it is not an existing directory."""
    if spill_dir is None:
        return None
    if not isinstance(spill_dir, (str, os.PathLike)) or not Path(spill_dir).expanduser().is_dir():
        raise ValueError(f"spill_dir must be an existing directory, got {spill_dir!r}")
    return str(Path(spill_dir).expanduser())


def check_reuse(reuse_features: bool, spill_dir: str | os.PathLike | None) -> None:
    """The callbacks' ``reuse_features`` and ``spill_dir`` arguments, or a ValueError."""
    if not isinstance(reuse_features, bool):
        raise ValueError(f"reuse_features must be True or False, got {reuse_features!r}")
    if spill_dir is not None and not reuse_features:
        raise ValueError("spill_dir is where reuse_features=True spills features; "
                         "set reuse_features=True or leave spill_dir unset")
    check_spill_dir(spill_dir)


@contextmanager
def spilled(source: Chunks, spill_dir: str | os.PathLike | None = None) -> Iterator[SpilledChunks]:
    """:class:`SpilledChunks` of ``source`` in a new temporary folder inside ``spill_dir``
    (default: the system's, ``tempfile.gettempdir()``), removed with its files on leaving
    the ``with`` block, however it is left."""
    where = check_spill_dir(spill_dir)
    with tempfile.TemporaryDirectory(prefix="nctools-spill-", dir=where) as folder:
        yield SpilledChunks(source, folder)
