"""`measure_model`: collapse metrics of any network at any layer, streamed over a data set.

Usage::

    import nctools, timm
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    result = nctools.measure_model(net, loader, layers=["layer2", "layer3", "fc"])
    result["layer3"]["nc1"], result["fc"]["accuracy"]

``data`` is any re-iterable of ``(inputs, labels)`` batches (a DataLoader). It is read
twice, and every requested layer is measured in the same two forward sweeps: the first
gathers each layer's class counts and means, the second its centred second moments and
the nearest-class-centre decisions, exactly the two passes of
:func:`nctools.metrics.measure.measure_chunks` (so a layer's numbers equal
``nctools.measure`` on its features, to rounding). Only one batch of activations and
each layer's :class:`~nctools.metrics.stats.ClassStats` live at a time: peak memory does
not grow with the number of samples. Under ``torch.distributed`` each process passes its
own shard and the statistics are summed with ``all_reduce``: every process gets the
metrics of the union.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nctools.metrics import functional
from nctools.metrics.decisions import DecisionTally
from nctools.metrics.measure import (
    BEYOND_KEYS,
    CLASSIFIER_FREE_KEYS,
    METRIC_KEYS,
    beyond_metrics,
    collapse_metrics,
)
from nctools.metrics.stats import ClassStats
from nctools.models.features import LayerTaps, last_linear, top_level_blocks

F64 = torch.float64



def measure_model(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | str | None = None,
    classifier: str | None = None,
    pool: str = "avg",
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
    reference: Iterable[tuple[Tensor, Tensor]] | None = None,
    ood: Iterable[tuple[Tensor, Tensor]] | None = None,
) -> dict[str, dict[str, float]]:
    """Neural-collapse metrics (Papyan, Han & Donoho, PNAS 2020) of ``model`` at named layers.

    Args:
        model: any ``nn.Module`` classifier (nctools, timm, torchvision, Hugging Face, own).
        data: a re-iterable of ``(inputs (B, ...), labels (B,))`` batches, iterated twice in
            the same order. Under torch.distributed: this process's shard.
        layers: module names (``model.named_modules()``); ``"blocks"`` for every top-level
            child with parameters, then the classifier. Default: the classifier only.
            A layer's OUTPUT is measured, except the classifier's name, which stands for
            its INPUT (the penultimate features).
        classifier: name of the last ``nn.Linear`` (default: found by
            :func:`nctools.models.features.last_linear`); its input gets the full suite
            of METRICS.md, every other layer the classifier-free subset
            (``CLASSIFIER_FREE_KEYS``).
        pool: ``"avg"``: a (B, K, H, W) activation becomes (B, K) by global average
            pooling (METRICS.md); ``"flatten"``: (B, K * H * W).
        device: where the forward passes and statistics run (default: the model's).
        num_classes: C, needed only when the model has no ``nn.Linear`` classifier.
        group: process group for the all_reduce under torch.distributed.
        progress: report batches done to stderr once every few seconds.
        reference: batches of another split (e.g. the training set) whose class means the
            nearest-class-centre rule uses (METRICS.md, "On other data"), at every layer;
            one more forward sweep. Default: ``data``'s own class means.
        ood: batches of out-of-distribution inputs (``(inputs, labels)`` pairs, labels
            ignored): adds ``nc5`` (Ammar et al., ICLR 2024; METRICS.md) at the
            classifier's input, the one layer it is reported at; one more forward sweep,
            only the mean of those features is kept. Under torch.distributed: this
            process's shard.

    Returns:
        ``{layer: {metric: value}}`` in the order of ``layers``.

    Raises:
        ValueError naming the argument: an unknown layer, pool or classifier, labels
        outside [0, C), an empty data set or class, NaN or Inf activations.
    """
    modules = dict(model.named_modules())
    cls_name, linear = _classifier(model, modules, classifier, num_classes)
    names = _layer_names(model, layers, cls_name)
    if linear is None and num_classes is None:
        raise ValueError("num_classes: the model has no nn.Linear classifier; give C")
    classes = int(num_classes) if num_classes is not None else cast(nn.Linear, linear).out_features
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    input_of = cls_name if cls_name in names else None
    weight = bias = None
    if linear is not None and input_of is not None:
        weight = linear.weight.detach().to(device=device, dtype=F64)
        if linear.bias is not None:
            bias = linear.bias.detach().to(device=device, dtype=F64)
    was_training = model.training
    model.eval()
    try:
        with LayerTaps(model, names, input_of=input_of, pool=pool) as taps:
            centres: dict[str, Tensor | None] = dict.fromkeys(names)
            if reference is not None:  # class means of the reference split: pass 1 only
                means = {name: LayerPasses(classes, None, None) for name in names}
                _passes(model, reference, taps, means, ("reference",), device, group, progress)
                centres = {name: layer.class_means() for name, layer in means.items()}
            passes = {name: LayerPasses(classes, weight if name == input_of else None, bias,
                                        ncc_means=centres[name]) for name in names}
            _passes(model, data, taps, passes, ("first", "second"), device, group, progress)
            if ood is not None and input_of is None:
                warnings.warn("ood: nc5 is measured at the classifier's input only (METRICS.md), "
                              "and no measured layer is it", stacklevel=2)
            elif ood is not None:
                layer = passes[cast(str, input_of)]
                layer.ood_mean = _ood_mean(model, ood, taps, cast(str, input_of),
                                           layer.class_means().shape[1], device, group,
                                           progress)
    finally:
        model.train(was_training)
    return {name: layer.result() for name, layer in passes.items()}


def _passes(model: nn.Module, data: Iterable, taps: LayerTaps, layers: dict[str, LayerPasses],
            sweeps: tuple[str, ...], device: torch.device, group: dist.ProcessGroup | None,
            progress: bool) -> None:
    """Forward sweeps over ``data``, each ending every layer's pass (summed over ranks);
    errors name the layer (and the reference split)."""
    where = "reference, " if sweeps == ("reference",) else ""
    for sweep in sweeps:
        _sweep(model, data, taps, layers, sweep, device, progress)
        _agree_on_widths(layers, device, group)
        for name, layer in layers.items():
            try:
                layer.end_pass(group)
            except ValueError as exc:
                raise ValueError(f"{where}layer {name!r}: {exc}") from None


class LayerPasses:
    """One layer's two passes: class means, then centred moments and NC4 decisions.

    The steps of :func:`nctools.metrics.measure.measure_chunks`, fed batch by batch so
    that many layers share the same forward sweeps.

    Args:
        num_classes: C.
        weight: (C, D) float64 classifier rows, or None for a classifier-free layer.
        bias: (C,) float64 or None (zero).
        ncc_means: (C, D) centres of the NCC rule from another split (METRICS.md, "On
            other data"); default: these samples' own class means.
    """

    def __init__(self, num_classes: int, weight: Tensor | None, bias: Tensor | None,
                 ncc_means: Tensor | None = None) -> None:
        self.num_classes, self.weight, self.bias = num_classes, weight, bias
        self.ncc_means = ncc_means
        self.stats: ClassStats | None = None
        self.tally: DecisionTally | None = None
        self.second = False
        self.eig: tuple[Tensor, Tensor] | None = None
        self.means: Tensor | None = None
        self.reference: Tensor | None = None  # mu_G of the first pass
        self.ood_mean: Tensor | None = None  # (D,) mean of OOD features: nc5

    def start(self, dim: int, device: torch.device) -> None:
        """First-pass statistics of width ``dim``: counts and sums only."""
        no_basis = torch.zeros(dim, 0, dtype=F64, device=device)
        self.stats = ClassStats(self.num_classes, dim, basis=no_basis, device=device)

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add one batch: features (B, D), labels (B,)."""
        if self.stats is None:  # the first pass learns D from the first batch
            self.start(features.shape[1], labels.device)
        on_block = self.tally.add if self.tally is not None else None
        assert self.stats is not None
        self.stats.update(features, labels, on_block=on_block)

    def end_pass(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum over processes; after the first pass, set up the second."""
        if self.stats is None:
            raise ValueError("data is empty (no batches)")
        stats = self.stats.all_reduce(group)
        if self.second:
            if self.tally is not None and dist.is_available() and dist.is_initialized():
                dist.all_reduce(self.tally.tallied, op=dist.ReduceOp.SUM, group=group)
            return
        if stats.num_samples == 0:
            raise ValueError("data is empty (no samples in any batch)")
        if not bool(torch.isfinite(stats.sums).all()):
            raise ValueError("activations contain NaN or Inf values")
        stats.check_nonempty()
        means, reference = stats.class_means(), stats.global_mean()
        eigvals, eigvecs = functional.between_class_eig(means - reference)
        dim = means.shape[1]
        # as in measure_chunks: Sigma_W only along Sigma_B's <= C - 1 eigenvectors when
        # that is the smaller matrix, and the same projection serves the NCC rule
        basis = eigvecs if eigvecs.shape[1] < dim // 2 else None
        # without a classifier the NCC tally still needs one: a zero W whose decisions
        # are discarded (only ncc_accuracy is reported)
        weight = self.weight if self.weight is not None else means.new_zeros(means.shape)
        bias = self.bias if self.bias is not None else means.new_zeros(self.num_classes)
        ncc = None if self.ncc_means is None else self.ncc_means.to(means.device, F64)
        self.tally = DecisionTally(weight, bias, means, reference, ncc, basis)
        self.eig, self.means, self.second = (eigvals, eigvecs), means, True
        self.reference = reference
        self.stats = ClassStats(self.num_classes, dim, shift=means, basis=basis,
                                device=means.device)

    def class_means(self) -> Tensor:
        """(C, D) float64 class means (after the first pass)."""
        assert self.means is not None
        return self.means

    def result(self) -> dict[str, float]:
        """The full METRICS.md suite with a classifier, else ``CLASSIFIER_FREE_KEYS``."""
        assert self.stats is not None and self.tally is not None and self.eig is not None
        result = collapse_metrics(self.stats, self.weight, *self.eig)
        result.update(beyond_metrics(self.stats, self.weight, self.stats.global_mean()))
        counts = self.tally.counts
        total = float(self.stats.counts.sum())
        result["ncc_mismatch"] = float(counts[0]) / total
        result["accuracy"] = float(counts[1]) / total
        result["ncc_accuracy"] = float(counts[2]) / total
        if self.ood_mean is not None:
            assert self.means is not None and self.reference is not None
            result["nc5"] = functional.nc5(self.means - self.reference,
                                           self.ood_mean - self.reference)
        if self.weight is None:
            return {key: result[key] for key in CLASSIFIER_FREE_KEYS}
        return {key: result[key] for key in (*METRIC_KEYS, *BEYOND_KEYS) if key in result}


def _classifier(
    model: nn.Module, modules: dict[str, nn.Module], name: str | None, num_classes: int | None
) -> tuple[str | None, nn.Linear | None]:
    if name is not None:
        if not isinstance(modules.get(name), nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"classifier: {name!r} is not an nn.Linear of the model; "
                             f"nn.Linear layers: {linears}")
        return name, modules[name]  # type: ignore[return-value]
    try:
        return last_linear(model)
    except ValueError:
        if num_classes is None:
            raise
        return None, None


def _layer_names(model: nn.Module, layers: Sequence[str] | str | None,
                 cls_name: str | None) -> list[str]:
    if layers is None:
        if cls_name is None:
            raise ValueError("layers: the model has no nn.Linear classifier; name the layers")
        return [cls_name]
    if isinstance(layers, str):
        if layers != "blocks":
            raise ValueError(f"layers: give a list of module names or 'blocks', got {layers!r}")
        names = [n for n in top_level_blocks(model) if n != cls_name]
        return names + ([cls_name] if cls_name is not None else [])  # its input: last
    names = list(layers)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"layers: give distinct module names, got {names}")
    return names


def _sweep(model: nn.Module, data: Iterable, taps: LayerTaps, passes: dict[str, LayerPasses],
           sweep: str, device: torch.device, progress: bool) -> None:
    """One forward sweep over ``data``, each layer's batch of features into its pass."""
    shown, batches = time.monotonic(), 0
    with torch.no_grad():
        for inputs, labels in data:
            model(_to(inputs, device))
            features = taps.pop()
            labels = torch.as_tensor(labels).to(device)
            for name, layer in passes.items():
                layer.update(features[name], labels)
            batches += 1
            if progress and time.monotonic() - shown > 5:
                print(f"measure_model: {sweep} pass, {batches} batches", file=sys.stderr)
                shown = time.monotonic()


def _ood_mean(model: nn.Module, ood: Iterable, taps: LayerTaps, name: str, dim: int,
              device: torch.device, group: dist.ProcessGroup | None, progress: bool) -> Tensor:
    """(D,) float64 mean of layer ``name``'s features over the ``ood`` batches, one forward
    sweep (summed over processes)."""
    stats = ClassStats(1, dim, basis=torch.zeros(dim, 0, dtype=F64, device=device),
                       device=device)
    shown, batches = time.monotonic(), 0
    with torch.no_grad():
        for batch in ood:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            try:
                model(_to(inputs, device))
            except RuntimeError as exc:  # e.g. other channels or sizes than the data's
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
                raise ValueError(f"ood: the network fails on these inputs: {first}") from None
            features = taps.pop()[name]
            if features.shape[1] != dim:
                raise ValueError(f"ood: features of width {features.shape[1]} at {name!r}, "
                                 f"the data's are {dim}")
            try:
                stats.update(features, torch.zeros(features.shape[0], dtype=torch.long,
                                                   device=features.device))
            except ValueError as exc:
                raise ValueError(f"ood: {exc}") from None
            batches += 1
            if progress and time.monotonic() - shown > 5:
                print(f"measure_model: ood pass, {batches} batches", file=sys.stderr)
                shown = time.monotonic()
    stats.all_reduce(group)
    if stats.num_samples == 0:
        raise ValueError("ood is empty (no samples in any batch)")
    if not bool(torch.isfinite(stats.sums).all()):
        raise ValueError("ood: activations contain NaN or Inf values")
    return stats.global_mean()


def _agree_on_widths(passes: dict[str, LayerPasses], device: torch.device,
                     group: dist.ProcessGroup | None) -> None:
    """A process whose shard was empty learns each layer's width from the others, so
    that every process joins the same all_reduce calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    widths = torch.tensor([0 if p.stats is None else p.stats.dim for p in passes.values()],
                          dtype=torch.int64, device=device)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=group)
    for layer, width in zip(passes.values(), widths.tolist(), strict=True):
        if layer.stats is None and width > 0:
            layer.start(width, device)


def _to(inputs: object, device: torch.device) -> object:
    """Inputs on ``device`` (a Hugging Face model takes pixel_values positionally too)."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    raise ValueError(f"data: batches must be (Tensor, labels) pairs, got {type(inputs).__name__}")
