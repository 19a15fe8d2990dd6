"""Snapshots in the run directory: features, labels and classifier at one epoch.

Layout (docs/design.md, "The run folder")::

    RUN/snapshots/epoch-NNNN/{train,test}.safetensors  classifier.safetensors  meta.json

Every file goes through :mod:`nctools.runs.store`'s atomic writes (temp name, fsync, rename)
and gets its size and sha256 in ``meta.json``, which is written last: a snapshot
directory without it is incomplete and ignored. Under torchrun each rank writes its own
shard and rank 0 merges their metas (:func:`finalize_sharded_snapshot`).

Usage::

    write_snapshot(run, epoch=5, splits={"train": (features, labels)}, weight=W, bias=b)
    features, labels = load_split(run, 5, "train")       # features: (N, D), labels: (N,)
    for chunk, chunk_labels in iter_split(run, 5, "train", chunk_rows=4096): ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from nctools._version import __version__
from nctools.config.schema import SNAPSHOT_DTYPES
from nctools.errors import SnapshotError
from nctools.runs import files, store
from nctools.runs.files import PathLike
from nctools.runs.layout import CLASSIFIER_FILE, META_FILE

TORCH_DTYPES = {name: getattr(torch, name) for name in SNAPSHOT_DTYPES}  # name -> torch dtype
LAYER_KEY = "layers."  # + layer name: an inner layer's features inside a split file
META_FORMAT = 1
_EPOCH_DIR = re.compile(r"epoch-(\d+)")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # no path, not hidden


# ---------------------------------------------------------------------------------------
# Snapshots: writing


def snapshot_dir(run_dir: PathLike, epoch: int) -> Path:
    """``RUN/snapshots/epoch-NNNN`` (four digits at least)."""
    return Path(run_dir) / store.SNAPSHOTS_DIR / f"epoch-{epoch:04d}"


def _shard_suffix(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f"-{shard[0]:05d}-of-{shard[1]:05d}"


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], sync_dir: bool = True) -> dict:
    """Write a safetensors file atomically; returns its meta entry (sha256, bytes)."""
    entry: dict = {}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        # hash the temp file before the rename: the page cache makes this read cheap
        entry.update(sha256=files.sha256_file(tmp), bytes=tmp.stat().st_size)

    files.atomic_write(path, write, sync_dir)
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
    if dtype not in TORCH_DTYPES:
        raise SnapshotError(f"snapshot dtype must be one of {', '.join(TORCH_DTYPES)}, "
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
    layers: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Save the features of each split and the classifier at ``epoch``; returns the folder.

    ``splits``: name -> (features (N, D), labels (N,)); features are stored in ``dtype``
    (float32 | float16), labels as int64. ``weight``: (C, D), ``bias``: (C,) or None
    (stored as zeros), both float32. ``extra_meta`` is merged into meta.json.
    With ``shard=(rank, world)`` this rank writes ``train-RRRRR-of-WWWWW.safetensors`` and
    ``meta-RRRRR-of-WWWWW.json`` (rank 0 also the classifier); rank 0 then calls
    :func:`finalize_sharded_snapshot` after a barrier to write meta.json.
    ``layers``: split name -> {layer: (N, D_layer)} pooled inner-layer features, stored in
    the split's own file (tensor ``layers.NAME``, same dtype, shard and checksum) and
    listed in depth order as meta.json's ``layers`` {name: D_layer}.
    """
    C, D = _check_snapshot_inputs(splits, weight, bias, dtype, shard)
    layers = layers or {}
    layer_dims: dict[str, int] = {}
    for name, inner in layers.items():
        for layer, feats in inner.items():
            if feats.ndim != 2 or feats.shape[0] != splits[name][0].shape[0]:
                raise SnapshotError(f"{name} layer {layer!r} features must be "
                                    f"({splits[name][0].shape[0]}, D), got {tuple(feats.shape)}")
            layer_dims[layer] = max(layer_dims.get(layer, 0), int(feats.shape[1]))
    has_bias = bias is not None
    weight = weight.detach().to("cpu", torch.float32).contiguous()
    bias = torch.zeros(C) if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
    folder = snapshot_dir(run_dir, epoch)
    folder.mkdir(parents=True, exist_ok=True)
    _clear_snapshot(folder, whole=shard is None)  # only once the inputs are known to be good
    suffix = _shard_suffix(shard)
    written: dict[str, dict] = {}
    split_meta: dict[str, dict] = {}
    for name, (features, labels) in splits.items():
        file = f"{name}{suffix}.safetensors"
        stored = {LAYER_KEY + layer: feats for layer, feats in layers.get(name, {}).items()}
        stored["features"] = features
        tensors = {key: value.detach().to("cpu", TORCH_DTYPES[dtype]).contiguous()
                   for key, value in stored.items()}
        tensors["labels"] = labels.detach().to("cpu", torch.int64).contiguous()
        written[file] = _save_tensors(folder / file, tensors, sync_dir=False)
        split_meta[name] = {"files": [file], "rows": [features.shape[0]]}
    classifier = None
    if shard is None or shard[0] == 0:
        written[CLASSIFIER_FILE] = _save_tensors(folder / CLASSIFIER_FILE,
                                               {"weight": weight, "bias": bias}, sync_dir=False)
        classifier = {"file": CLASSIFIER_FILE, "weight_shape": [C, D], "bias_shape": [C],
                      "dtype": "float32", "has_bias": has_bias}
    files.fsync_dir(folder)  # the renames above are durable before meta.json names them
    meta = _meta(epoch, dtype, C, D, split_meta, classifier, written, extra_meta)
    if layer_dims:
        meta["layers"] = layer_dims
    if shard is None:
        files.write_json(folder / META_FILE, meta)  # last: the snapshot is complete from here on
    else:
        meta["shard"] = list(shard)
        files.write_json(folder / f"meta{suffix}.json", meta)
    return folder


def _meta(epoch: int, dtype: str, C: int, D: int, split_meta: dict, classifier: dict | None,
          written: dict, extra: dict | None) -> dict:

    meta = {
        "format": META_FORMAT,
        "epoch": epoch,
        "nctools_version": __version__,
        "num_classes": C,
        "dim": D,
        "dtype": dtype,
        "labels_dtype": "int64",
        "splits": {name: {**entry, "shape": [sum(entry["rows"]), D]}
                   for name, entry in split_meta.items()},
        "classifier": classifier,
        "files": written,
    }
    if extra and "layers" in extra:
        raise SnapshotError("extra_meta may not set the reserved key 'layers'")
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
        for layer, dim in part.get("layers", {}).items():  # a rank without rows has D = 0
            meta.setdefault("layers", {})[layer] = max(meta["layers"].get(layer, 0), dim)
    del meta["shard"]
    meta["world"] = world
    files.write_json(folder / META_FILE, meta)
    for stale in folder.iterdir():  # parts, and files of an earlier layout meta does not list
        stale_data = stale.suffix == ".safetensors" and stale.name not in meta["files"]
        if stale.is_file() and (stale.name.startswith("meta-") or stale_data):
            stale.unlink(missing_ok=True)
    return folder


# ---------------------------------------------------------------------------------------
# Snapshots: reading


def list_snapshots(run_dir: PathLike) -> list[int]:
    """Epochs with a complete snapshot (one whose meta.json exists), ascending.

    Only folders named as :func:`snapshot_dir` names them count: ``epoch-00001`` beside
    ``epoch-0001`` would be the same epoch twice (see :func:`stray_snapshot_folders`).
    """
    root = Path(run_dir) / store.SNAPSHOTS_DIR
    if not root.is_dir():
        return []
    epochs = []
    for folder in root.iterdir():
        match = _EPOCH_DIR.fullmatch(folder.name)
        if match and folder.name == snapshot_dir(run_dir, int(match.group(1))).name \
                and (folder / META_FILE).is_file():
            epochs.append(int(match.group(1)))
    return sorted(epochs)


def stray_snapshot_folders(run_dir: PathLike) -> list[Path]:
    """Folders ``epoch-N`` with a meta.json that :func:`list_snapshots` ignores because their
    name is not the epoch's own (``epoch-00001``, ``epoch-1``): copies, never measured."""
    root = Path(run_dir) / store.SNAPSHOTS_DIR
    if not root.is_dir():
        return []
    return sorted(
        folder for folder in root.iterdir()
        if (match := _EPOCH_DIR.fullmatch(folder.name))
        and folder.name != snapshot_dir(run_dir, int(match.group(1))).name
        and (folder / META_FILE).is_file()
    )


def read_meta(run_dir: PathLike, epoch: int) -> dict:
    """The parsed meta.json of the snapshot at ``epoch``."""
    path = snapshot_dir(run_dir, epoch) / META_FILE
    if path.parent.is_symlink():
        # a link to another epoch's folder would measure that epoch's data twice
        raise SnapshotError(f"{path.parent}: is a symbolic link to {path.parent.readlink()}; "
                            "a snapshot folder must be the run's own")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no complete snapshot at epoch {epoch} "
                            f"(have {list_snapshots(run_dir)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"{path}: snapshot meta is corrupt ({exc})") from None
    problem = _meta_problem(meta) or _meta_mismatch(meta, epoch)
    if problem:
        raise SnapshotError(f"{path}: snapshot meta is corrupt ({problem})")
    return meta


def _meta_mismatch(meta: dict, epoch: int) -> str | None:
    """Where a well-formed meta.json disagrees with its folder, or None: the epoch it was
    written at, file names that leave the folder, a split read from another split's file."""
    if meta.get("epoch") != epoch:
        return (f"it was written at epoch {meta.get('epoch')!r}, but its folder is "
                f"{snapshot_dir('.', epoch).name}; a copied or renamed snapshot?")
    for name in meta["files"]:
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in (".", ".."):
            return f"file name {name!r} is not a plain name inside the snapshot folder"
    for split, entry in meta["splits"].items():
        own = re.compile(re.escape(str(split)) + r"(-\d{5}-of-\d{5})?\.safetensors")
        for name in entry.get("files", []):
            if not own.fullmatch(name):
                return f"the {split!r} split names the file {name!r}, not its own"
    return None


def _meta_problem(meta: Any) -> str | None:
    """What makes a parsed meta.json unusable by the readers below, or None."""
    if not isinstance(meta, dict):
        return f"expected an object, found {type(meta).__name__}"
    written, splits = meta.get("files"), meta.get("splits")
    if not isinstance(written, dict) or not isinstance(splits, dict):
        return "it lacks the 'files' or 'splits' tables"
    for name, entry in written.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("bytes"), int)):
            return f"no sha256 and size for {name}"
    listed = [CLASSIFIER_FILE]
    for split in splits.values():
        listed += split.get("files", []) if isinstance(split, dict) else ["<missing>"]
    unknown = [name for name in listed if name not in written]
    return f"no checksum for {unknown[0]}" if unknown else None


def verify_snapshot(run_dir: PathLike, epoch: int) -> None:
    """Check the size and sha256 of every file of a snapshot; SnapshotError names a bad one."""
    meta = read_meta(run_dir, epoch)
    folder = snapshot_dir(run_dir, epoch)
    for name, expected in meta["files"].items():
        files.check_file(folder / name, expected)


def _split_files(run_dir: PathLike, epoch: int, split: str) -> tuple[Path, dict, list[str]]:
    meta = read_meta(run_dir, epoch)
    if split not in meta["splits"]:
        raise SnapshotError(f"{snapshot_dir(run_dir, epoch)}: no {split!r} split "
                            f"(has {', '.join(meta['splits'])})")
    return snapshot_dir(run_dir, epoch), meta, meta["splits"][split]["files"]


def _load_file(path: Path, expected: dict, verify: bool) -> dict[str, torch.Tensor]:
    """Read a safetensors file once; hash those same bytes when ``verify``.

    Only a regular file is read, and no more than meta.json says it holds (plus one byte to
    tell a longer file): a link to /dev/zero or a FIFO must not be read without end."""
    files.check_regular(path)
    try:
        with path.open("rb") as f:
            data = f.read(expected["bytes"] + 1) if verify else f.read()
    except FileNotFoundError:
        raise SnapshotError(f"{path}: snapshot file is missing") from None
    if verify:
        files.check_file(path, expected, data)
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SnapshotError(f"{path}: snapshot file is corrupt ({exc})") from None


def snapshot_layers(meta: dict) -> list[str]:
    """The inner layers a snapshot holds (``snapshot.layers``), in depth order."""
    return list(meta.get("layers", {}))


def _tensor_key(folder: Path, meta: dict, layer: str | None) -> str:
    if layer is None:
        return "features"
    if layer not in meta.get("layers", {}):
        raise SnapshotError(f"{folder}: no layer {layer!r} (has {snapshot_layers(meta)})")
    return LAYER_KEY + layer


def load_split(
    run_dir: PathLike, epoch: int, split: str, verify: bool = True, layer: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) in the stored dtype and labels (N,) int64 of one split.

    Sharded snapshots are concatenated in rank order. ``verify`` checks each file's sha256
    on the bytes read (each file is read once). ``layer``: an inner layer's features
    (N, D_layer) instead of the penultimate ones.
    """
    folder, meta, names = _split_files(run_dir, epoch, split)
    key = _tensor_key(folder, meta, layer)
    feats, labels = [], []
    for name in names:
        tensors = _load_file(folder / name, meta["files"][name], verify)
        feats.append(tensors[key] if tensors[key].numel() or layer is None
                     else tensors[key].reshape(0, meta["layers"][layer]))
        labels.append(tensors["labels"])
    if len(names) == 1:
        return feats[0], labels[0]
    return torch.cat(feats), torch.cat(labels)


def iter_split(
    run_dir: PathLike, epoch: int, split: str, chunk_rows: int = 65536, verify: bool = True,
    layer: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream one split as (features (n, D), labels (n,)) chunks of at most ``chunk_rows``.

    Memory stays O(chunk_rows * D) whatever N is (each chunk is copied out of a mapping
    that is closed before the chunk is yielded).
    Chunks do not span shard files; concatenated, they equal :func:`load_split`.
    Each file's sha256 is checked (streamed) before any of its rows is yielded.
    ``layer``: an inner layer's features instead of the penultimate ones.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    folder, meta, names = _split_files(run_dir, epoch, split)
    key = _tensor_key(folder, meta, layer)
    for name in names:
        path = folder / name
        if verify:
            files.check_file(path, meta["files"][name])
        else:
            files.check_regular(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                rows = f.get_slice("labels").get_shape()[0]
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"{path}: snapshot file is corrupt ({exc})") from None
        for start in range(0, rows, chunk_rows):
            yield _read_rows(path, start, min(start + chunk_rows, rows), key)


def _read_rows(path: Path, start: int, stop: int,
               key: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start, stop) of a split file, copied out of a mapping that is closed again:
    pages of a mapping held open stay resident, so streaming would grow with N."""
    try:
        with safe_open(str(path), framework="pt") as f:
            # a label slice is a view of the whole label array: clone it free
            return f.get_slice(key)[start:stop], f.get_slice("labels")[start:stop].clone()
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
