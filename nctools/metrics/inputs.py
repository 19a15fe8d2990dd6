"""The checks every measuring entry point applies to its inputs, in one place.

`nctools.measure`, `measure_chunks` and `ClassStats.update` refuse the same things with
the same messages: each names the argument and what was wrong with it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_tensor(name: str, value: Tensor | np.ndarray) -> Tensor:
    """``value`` as a torch tensor (numpy arrays shared, not copied; a big-endian or
    otherwise non-native array is converted); ValueError naming ``name`` otherwise."""
    if isinstance(value, Tensor):
        check_not_meta(name, value)
        return value.detach()  # measured, never differentiated: a live layer's grad is not ours
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:
            value = value.astype(value.dtype.newbyteorder("="))
        try:
            return torch.from_numpy(value)
        except TypeError as err:
            raise ValueError(
                f"{name}: numpy dtype {value.dtype} is not supported ({err})"
            ) from None
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


def check_not_meta(name: str, value: Tensor) -> None:
    """One line for a meta tensor (a shape without values, e.g. from a model built on the
    meta device): nothing can be measured from it."""
    if value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (shapes without values): materialise "
                         "the model (e.g. model.to_empty(device=...) and load its weights) "
                         "before measuring")


def dtype_name(value: Tensor | np.ndarray) -> str:
    """The dtype as the user wrote it: ``float32`` for numpy and torch alike."""
    return str(value.dtype).removeprefix("torch.")


def check_labels(labels: Tensor, num_classes: int) -> None:
    """ValueError unless ``labels`` (n,) are integers in [0, num_classes)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {dtype_name(labels)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (C = {num_classes}), "
            f"got values from {int(labels.min())} to {int(labels.max())}"
        )


def check_finite(name: str, value: Tensor) -> None:
    """ValueError naming ``name`` if ``value`` holds NaN or Inf."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_num_classes(num_classes: object) -> int:
    """``num_classes`` as an int >= 2; ValueError for 10.0, '10', True, 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return int(num_classes)


def check_pass_rows(first: int, again: int, source: str = "chunks") -> None:
    """ValueError when the ``source`` of a two-pass measurement (``measure_chunks``'
    chunks, ``measure_model``'s data) gave no rows, or other rows the second time: it must
    be re-iterable, and an exhausted iterator would look like empty classes."""
    if first == 0:
        raise ValueError(f"{source} yielded no rows: it must return a fresh iterable of "
                         "(features, labels) on every call (an exhausted iterator?)")
    if again != first:
        raise ValueError(f"{source} yielded {first} rows on the first pass and {again} on "
                         "the second: it must return the same rows on every call (an "
                         "exhausted iterator?)")


def check_pass_classes(first: Tensor, again: Tensor, classes: Tensor,
                       source: str = "chunks") -> None:
    """ValueError when the two passes of a measurement counted other samples per class,
    though as many in all: ``first`` and ``again`` are the (C',) counts of the classes
    measured, ``classes`` (C',) their labels. The class means of the first pass would
    then centre samples they were not taken from (a shuffled loader with
    ``drop_last=True``, or a random sampler)."""
    differ = torch.nonzero(first != again).flatten()
    if differ.numel():
        k = int(differ[torch.argmin(classes[differ])])  # the smallest label that differs
        raise ValueError(f"{source} yielded other samples on its second pass: class "
                         f"{int(classes[k])} had {int(first[k])} on the first and "
                         f"{int(again[k])} on the second; it must return the same samples on "
                         "every call (not a shuffled loader with drop_last=True, nor a "
                         "random sampler)")
