"""`measure_model`: collapse metrics of any network at any layer, streamed over a data set.

Usage::

    import nctools, timm
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    result = nctools.measure_model(net, loader, layers=["layer2", "layer3", "fc"])
    result["layer3"]["nc1"], result["fc"]["accuracy"]

``data`` is any re-iterable of batches (a DataLoader, a list; not a one-shot generator):
``(inputs, labels, ...)`` tuples, of which the first two items are used, or dicts with a
labels key (``labels``, ``label`` or ``y``), whose other items are the model's keyword
inputs (``model(**rest)``, as Hugging Face loaders yield them). It is read
twice, and every requested layer is measured in the same two forward sweeps: the first
gathers each layer's class counts and means, the second its centred second moments and
the nearest-class-centre decisions: the two passes of the measurement engine
(:class:`nctools.metrics.engine.Engine`, which ``nctools.measure`` drives too, so a
layer's numbers equal ``nctools.measure`` on its features, to rounding). Only one batch
of activations and each layer's statistics live at a time: peak memory does not grow
with the number of samples. Under ``torch.distributed`` each process passes its
own shard and the statistics are summed with ``all_reduce``: every process gets the
metrics of the union.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nctools.metrics.engine import CLASSIFIER_FREE_KEYS, Engine, Layer
from nctools.metrics.inputs import check_labels, check_not_meta
from nctools.models.features import LayerTaps, last_linear, top_level_blocks
from nctools.models.tokens import lm_task

F64 = torch.float64
FRAME_COLUMNS = ("layer", "kind", "at", "metric", "value")  # measure_model(as_frame=True)
# the keys a dict batch's labels go under (Hugging Face: labels; datasets: label)
LABEL_KEYS = ("labels", "label", "y")


def measure_model(
    model: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    layers: Sequence[str] | str | None = None,
    classifier: str | None = None,
    pool: str = "auto",
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
    reference: Iterable[tuple[Tensor, Tensor]] | None = None,
    ood: Iterable[tuple[Tensor, Tensor]] | None = None,
    as_frame: bool = False,
) -> Any:
    """Neural-collapse metrics (Papyan, Han & Donoho, PNAS 2020) of ``model`` at named layers.

    Args:
        model: any ``nn.Module`` classifier (nctools, timm, torchvision, Hugging Face, own).
        data: a re-iterable of ``(inputs (B, ...), labels (B,), ...)`` batches or of dicts
            holding ``labels`` (or ``label``, ``y``) (B,) and the model's keyword inputs,
            iterated twice in the same order. Under torch.distributed: this process's shard.
        layers: module names (``model.named_modules()``); ``"blocks"`` for every top-level
            child with parameters, then the classifier. Default: the classifier only.
            A layer's OUTPUT is measured, except the classifier's name, which stands for
            its INPUT (the penultimate features).
        classifier: name of the last ``nn.Linear`` (default: found by
            :func:`nctools.models.features.last_linear`); its input gets the full suite
            of docs/metrics.md, every other layer the classifier-free subset
            (``CLASSIFIER_FREE_KEYS``).
        pool: how a layer's activation becomes (B, D) rows. ``"avg"``: a (B, K, H, W) map
            by global average pooling (docs/metrics.md), a (B, T, K) token sequence by
            its mean token; ``"cls"``: a sequence's first token; ``"flatten"``: every value.
            ``"auto"`` (default): maps averaged, sequences as the network's own head reads
            them: the first token where it reads a CLS token (ViT, DeiT, BERT), else their
            mean (:func:`nctools.models.features.reads_cls_token` states the rule). A layer
            returning a model-output object, dict or tuple is measured on its hidden
            states (``last_hidden_state``, else its first tensor).
        device: where the forward passes and statistics run (default: the model's).
        num_classes: C, needed only when the model has no ``nn.Linear`` classifier.
        group: process group for the all_reduce under torch.distributed.
        progress: report batches done to stderr once every few seconds.
        reference: batches of another split (e.g. the training set) whose class means the
            nearest-class-centre rule uses (docs/metrics.md, "On other data"), at every layer;
            one more forward sweep. Default: ``data``'s own class means.
        ood: batches of out-of-distribution inputs (``(inputs, labels)`` pairs, labels
            ignored): adds ``nc5`` (Ammar et al., ICLR 2024; docs/metrics.md) at the
            classifier's input, the one layer it is reported at; one more forward sweep,
            only the mean of those features is kept. Under torch.distributed: this
            process's shard.
        as_frame: return a tidy ``pandas.DataFrame`` instead (:func:`layers_frame`).

    A Hugging Face causal or masked language model (``*ForCausalLM``, ``*LMHeadModel``,
    ``*ForMaskedLM``) with dict batches of ``input_ids`` (B, T) is measured token by token
    as :func:`nctools.analysis.lm_measure.measure_language_model` measures it (Wu & Papyan
    2024; docs/language-models.md): ``layers`` None gives ``{"lm_head": metrics}``,
    ``"blocks"`` every hidden state; the vocabulary options are that function's.

    Returns:
        ``{layer: {metric: value}}`` in the order of ``layers``; with ``as_frame`` one row
        per layer and metric, columns ``FRAME_COLUMNS``.

    Raises:
        ValueError naming the argument: an unknown layer, pool or classifier, labels
        outside [0, C), an empty data set or class, NaN or Inf activations.
    """
    _check_reiterable(data)
    if lm_task(model) is not None:
        unused = {"classifier": classifier, "num_classes": num_classes, "reference": reference,
                  "ood": ood, "pool": None if pool == "auto" else pool}
        given = [name for name, value in unused.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not for a language model, whose classes "
                             "are its vocabulary and classifier its LM head "
                             "(docs/language-models.md)")
        return _language_model(model, data, layers, device, group, as_frame)
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        check_not_meta(f"model parameter {name}", tensor)
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
    if ood is not None and input_of is None:
        warnings.warn("ood: nc5 is measured at the classifier's input only (docs/metrics.md), "
                      "and no measured layer is it", stacklevel=2)
    make = functools.partial(Engine, classes, device=device, source="data", ood_source="ood",
                             sync=True, group=group)
    was_training = model.training
    model.eval()
    try:
        with LayerTaps(model, names, input_of=input_of, pool=pool) as taps:
            sweep = functools.partial(_sweep, model, taps, device, progress)
            centres: dict[str, Tensor | None] = dict.fromkeys(names)
            if reference is not None:  # class means of the reference split: pass 1 only
                means = make({name: Layer() for name in names})
                sweep(reference, means, "reference")
                centres = {name: means.class_means(name) for name in names}
            engine = make({name: Layer(weight, bias, centres[name], ood=ood is not None)
                           if name == input_of else Layer(class_means=centres[name])
                           for name in names})
            sweep(data, engine, "first")
            sweep(data, engine, "second")
            if ood is not None and input_of is not None:
                sweep(ood, engine, "ood", ood_layer=input_of)
    finally:
        model.train(was_training)
    results = engine.results()
    result = {name: values if name == input_of else {k: values[k] for k in CLASSIFIER_FREE_KEYS}
              for name, values in results.items()}
    return layers_frame(model, result, input_of) if as_frame else result


def _language_model(model: nn.Module, data: Any, layers: Sequence[str] | str | None,
                    device: torch.device | str | None, group: dist.ProcessGroup | None,
                    as_frame: bool) -> Any:
    """``measure_model`` of a language model: its token samples, layer by layer."""
    from nctools.analysis.lm_measure import measure_language_model
    from nctools.models.tokens import LM_HEAD

    if layers is None:
        result = {LM_HEAD: measure_language_model(model, data, device=device, group=group)}
    else:
        result = measure_language_model(model, data, device=device, group=group,
                                        layers=layers)
    if not as_frame:
        return result
    import pandas as pd

    kind = type(model).__name__
    rows = [(name, kind, "input" if name == LM_HEAD else "output", key, value)
            for name, values in result.items() for key, value in values.items()]
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


def layers_frame(model: nn.Module, result: dict[str, dict[str, float]],
                 input_of: str | None = None) -> Any:
    """``{layer: {metric: value}}`` as a tidy DataFrame, one row per layer and metric:
    ``layer``, ``kind`` (the module's class, e.g. ``Conv2d``, ``ViTModel``), ``at``
    (``output``, or ``input`` for ``input_of``, the classifier whose input is measured),
    ``metric``, ``value``; layers in measuring order, metrics in docs/metrics.md order."""
    import pandas as pd

    modules = dict(model.named_modules())
    rows = [(name, type(modules[name]).__name__, "input" if name == input_of else "output",
             key, value)
            for name, values in result.items() for key, value in values.items()]
    return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))


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


def _sweep(model: nn.Module, taps: LayerTaps, device: torch.device, progress: bool,
           data: Iterable, engine: Engine, sweep: str, ood_layer: str | None = None) -> None:
    """One forward sweep over ``data``: each batch's labels are checked, and every layer's
    features go into the engine (or, for ``ood``, layer ``ood_layer``'s into its OOD
    mean); a data pass ends the engine's pass."""
    shown, batches = time.monotonic(), 0
    with torch.no_grad():
        for batch in data:
            if ood_layer is None:
                inputs, labels = _split_batch(batch)
                _forward(model, inputs, device)
                features = taps.pop()
                engine.update(features, _checked_labels(labels, features, engine, device))
            else:
                _ood_forward(model, batch, device)
                engine.update_ood(ood_layer, _checked_ood(taps.pop()[ood_layer], engine,
                                                          ood_layer))
            batches += 1
            if progress and time.monotonic() - shown > 5:
                print(f"measure_model: {sweep} pass, {batches} batches", file=sys.stderr)
                shown = time.monotonic()
    if ood_layer is not None:
        return
    try:
        engine.end_pass()
    except ValueError as exc:
        raise ValueError(f"reference: {exc}" if sweep == "reference" else str(exc)) from None


def _checked_labels(labels: object, features: dict[str, Tensor], engine: Engine,
                    device: torch.device) -> Tensor:
    """A batch's labels (B,) as int64 on ``device``, checked against C and the batch."""
    labels = torch.as_tensor(labels).to(device)
    rows = next(iter(features.values())).shape[0]
    if labels.ndim != 1 or labels.shape[0] != rows:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but the batch has {rows} "
                         "samples")
    check_labels(labels, engine.num_classes)
    return labels


def _ood_forward(model: nn.Module, batch: object, device: torch.device) -> None:
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(inputs, dict):
        inputs = {k: v for k, v in inputs.items() if k not in LABEL_KEYS}
    try:
        _forward(model, inputs, device)
    except RuntimeError as exc:  # e.g. other channels or sizes than the data's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "error"
        raise ValueError(f"ood: the network fails on these inputs: {first}") from None


def _checked_ood(features: Tensor, engine: Engine, name: str) -> Tensor:
    """Layer ``name``'s OOD features (B, D), checked against the data's width."""
    dim = engine.class_means(name).shape[1]
    if features.shape[1] != dim:
        raise ValueError(f"ood: features of width {features.shape[1]} at {name!r}, "
                         f"the data's are {dim}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("ood: features contain NaN or Inf values")
    return features


def _check_reiterable(data: object) -> None:
    """ValueError for an iterator (a generator): its second pass would be empty."""
    if isinstance(data, Iterator):
        raise ValueError("data must be re-iterable (it is read twice): pass a DataLoader "
                         "or a list")


def _split_batch(batch: object) -> tuple[object, object]:
    """(inputs, labels) of one batch: a tuple's first two items, or a dict's labels key
    and its other items (the model's keyword inputs)."""
    if isinstance(batch, dict):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise ValueError(f"data: a dict batch needs a labels key ({', '.join(LABEL_KEYS)}); "
                             f"got keys {sorted(map(str, batch))}")
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError("data: batches must be (inputs, labels, ...) tuples or dicts with a "
                     f"labels key, got {type(batch).__name__}")


def _forward(model: nn.Module, inputs: object, device: torch.device) -> None:
    """Run ``model`` on a batch's inputs moved to ``device``: a tensor positionally (a
    Hugging Face model takes pixel_values so too), a dict as keyword inputs."""
    if isinstance(inputs, dict):
        model(**{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                 for k, v in inputs.items()})
    elif isinstance(inputs, Tensor):
        model(inputs.to(device, non_blocking=True))
    else:
        raise ValueError("data: a batch's inputs must be a Tensor or a dict of them, got "
                         f"{type(inputs).__name__}")
