"""The run manifest (``RUN/run.json``): its one schema, written by ``nctools train`` and by
runs written from another library's loop (Lightning), and the run's identity.

Usage::

    store.write_manifest(run_dir, new_manifest(name="demo", run_id=run_identity(run_dir),
                                               device="cpu", ...))

Reading and writing the file are :func:`nctools.runs.store.read_manifest` and
:func:`~nctools.runs.store.write_manifest`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from nctools._version import __version__
from nctools.runs import store
from nctools.runs.layout import MANIFEST_FILE

# how a run stands: training, or how it ended
STATUSES = ("running", "completed", "interrupted", "diverged", "failed")


def new_manifest(*, name: str, run_id: str, device: str, world_size: int, dataset: str,
                 num_train: int | None, num_test: int | None, num_classes: int | None,
                 feature_dim: int | None, epochs: int, epochs_done: int,
                 tpt_onset_epoch: int | None, snapshot_epochs: Sequence[int],
                 status: str = "running", source: str | None = None) -> dict:
    """The manifest of a run, every key in its place: the versions that wrote it, where
    it trains (``device``, ``world_size``), the data set's sizes, ``C`` (``num_classes``)
    and ``D`` (``feature_dim``), how far it got and its snapshot epochs. ``source`` names
    the library whose loop trained a run not trained by ``nctools train``."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return {
        "name": name,
        "run_id": run_id,
        "status": status,
        **({} if source is None else {"source": source}),
        "nctools_version": __version__,
        "torch_version": torch.__version__,
        "device": device,
        "world_size": world_size,
        "dataset": dataset,
        "num_train": num_train,
        "num_test": num_test,
        "num_classes": num_classes,
        "feature_dim": feature_dim,
        "epochs": epochs,
        "epochs_done": epochs_done,
        "tpt_onset_epoch": tpt_onset_epoch,
        "snapshot_epochs": list(snapshot_epochs),
    }


def read_if_any(run_dir: Path) -> dict:
    """``run.json`` of ``run_dir``, or ``{}`` where there is none yet."""
    return store.read_manifest(run_dir) if (run_dir / MANIFEST_FILE).is_file() else {}


def run_identity(run_dir: Path) -> str:
    """The run's id: made once, when the run starts, and kept by every resume (``run.json``
    ``run_id``), so a run stays the same run whatever its folder is called later."""
    known = read_if_any(run_dir).get("run_id")
    return known if isinstance(known, str) and known else uuid.uuid4().hex


def is_complete(run_dir: Path, epochs: int) -> bool:
    """Whether the run in ``run_dir`` finished all its ``epochs`` (``run.json`` says so)."""
    stands = read_if_any(run_dir)
    return stands.get("status") == "completed" and stands.get("epochs_done") == epochs
