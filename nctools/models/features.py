"""Penultimate-layer features of a whole split: the one extraction pass nctools uses.

Training snapshots and the per-epoch test metrics both call :func:`extract_features`;
code that measures a saved model should call it too, so that its features and a
snapshot's agree bit for bit (same batches, same order, same precision).

Usage::

    features, labels = extract_features(model, dataset.test, batch_size=512, device="cpu")
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from nctools.data.splits import Split, iterate_batches
from nctools.errors import DataError
from nctools.models.networks import feature_dim, penultimate


def extract_features(
    model: nn.Module,
    split: Split,
    batch_size: int,
    device: str | torch.device,
    indices: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Penultimate features (N, D) and labels (N,) of a split: :func:`extract_split`
    without inner layers."""
    features, labels, _ = extract_split(model, split, batch_size, device, indices)
    return features, labels


@torch.no_grad()
def extract_split(
    model: nn.Module,
    split: Split,
    batch_size: int,
    device: str | torch.device,
    indices: Tensor | None = None,
    layers: list[str] | tuple[str, ...] = (),
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Run ``model.features`` over a full split in eval mode, without augmentation.

    The collapse metrics (Papyan, Han & Donoho, PNAS 2020) are defined on the features of
    the training set as the network sees it at test time, hence eval mode (batch-norm
    running statistics, no dropout), no augmentation and the split's own order. The pass
    runs in float32 even when training uses bf16 autocast: NC1 falls to ~1e-3 and below,
    under bf16's resolution. The model's train/eval mode is restored on return.

    Args:
        model: a network with ``features(x) -> (B, D)``, already on ``device``.
        split: ``images`` (N, C_in, H, W), ``labels`` (N,).
        batch_size: rows per forward pass (no gradients are kept, so it may exceed the
            training batch size).
        device: where the forward passes run.
        indices: (n,) the rows to extract, in this order (default: all N). Under torchrun
            each rank passes its own contiguous rows; they may be none (n = 0).
        layers: inner modules whose outputs are captured in the same pass
            (:class:`LayerTaps`, globally average-pooled), for layer-wise collapse.

    Returns:
        features: (N, D) float32 on the CPU; labels: (N,) int64 on the CPU, in split order
        (``(n, D)`` and ``(n,)`` in the order of ``indices``); ``{layer: (N, D_layer)}``
        float32 on the CPU (``(0, 0)`` for a rank without rows).
    """
    device = torch.device(device)
    if indices is None:
        indices = torch.arange(len(split.labels))
    elif indices.numel() == 0:  # a rank without rows still writes its (empty) shard
        dim = feature_dim(model)
        empty = {name: torch.zeros(0, 0) for name in layers}
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.long), empty
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    inner: dict[str, list[Tensor]] = {name: [] for name in layers}
    try:
        with LayerTaps(model, list(layers)) as taps:
            for x, y in iterate_batches(split, indices, batch_size, augment=False):
                out = penultimate(model, x.to(device, non_blocking=True))
                feats.append(out.float().cpu())
                labels.append(y.cpu())
                for name, value in (taps.pop() if layers else {}).items():
                    inner[name].append(value.float().cpu())  # as the penultimate rows
    finally:
        model.train(was_training)
    if not feats:
        raise DataError("extract_features: the split is empty (N = 0)")
    return torch.cat(feats), torch.cat(labels).long(), {k: torch.cat(v) for k, v in inner.items()}


# --------------------------------------------------------------------- hooks by layer name
POOLS = ("avg", "flatten", "cls", "auto")


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the network's classifier: the last ``nn.Linear`` it registers.

    nctools networks name theirs ``classifier``; timm and torchvision networks end in one
    too (``fc``, ``head``, ``classifier``). Raises ValueError when there is none.
    """
    modules = dict(model.named_modules())
    if isinstance(modules.get("classifier"), nn.Linear):
        return "classifier", cast(nn.Linear, modules["classifier"])
    linears = [(name, m) for name, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer (no classifier)")
    return linears[-1]


def top_level_blocks(model: nn.Module) -> list[str]:
    """The network's blocks in depth order (``layers="blocks"``), its classifier included.

    A network that names its own (a ``block_names`` attribute, as nctools' ConvNet and
    ResNets do) gets those; otherwise every top-level child that holds parameters,
    descending into a lone such child (a network that is one Sequential trunk and a
    head). Parameter-free children (ReLU, pools, flatten, dropout) are skipped: their
    output is a block's output transformed, not a stage of the network.
    """
    named = getattr(model, "block_names", None)
    if named is not None:
        return list(named)
    stages = _timm_stages(model)
    if stages:
        return [*stages, last_linear(model)[0]]
    prefix, module = "", model
    while True:
        children = [(name, child) for name, child in module.named_children()
                    if any(True for _ in child.parameters())]
        if len(children) != 1 or not any(True for _ in children[0][1].children()):
            return [prefix + name for name, _ in children]
        prefix, module = prefix + children[0][0] + ".", children[0][1]


def _timm_stages(model: nn.Module) -> list[str]:
    """The stages a timm network reports in ``feature_info`` (its ``features_only`` taps:
    resnet18's act1, layer1..layer4; a ViT's blocks.0..), [] for other networks."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list) or not all(isinstance(i, dict) for i in info):
        return []
    modules = dict(model.named_modules())
    return [i["module"] for i in info if i.get("module") in modules]


def reads_cls_token(model: nn.Module) -> bool:
    """Whether the network's own head reads the first token of its sequences (ViT, BERT).

    The rule ``pool="auto"`` follows: a timm network says so in ``global_pool``
    (``"token"``); otherwise a network with a learned ``cls_token`` (Hugging Face and timm
    ViT, DeiT) or a BERT-style ``pooler`` module (which reads token 0) reads it; any other
    network averages its tokens.
    """
    global_pool = getattr(model, "global_pool", None)
    if isinstance(global_pool, str):
        return global_pool == "token"
    for name, _ in model.named_parameters():
        if name.split(".")[-1] == "cls_token":
            return True
    return any(name.split(".")[-1] == "pooler" and type(m).__name__.endswith("Pooler")
               for name, m in model.named_modules())


def hidden_state(name: str, output: Any) -> Tensor:
    """The tensor a layer's output stands for: itself, a model-output object's or dict's
    ``last_hidden_state`` (else its first tensor), a tuple's first tensor.

    Raises ValueError naming the layer when the output holds no tensor.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):  # Hugging Face ModelOutput is an OrderedDict
        if isinstance(output.get("last_hidden_state"), Tensor):
            return output["last_hidden_state"]
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, (Tensor, tuple, list, dict)):
                return hidden_state(name, item)
    raise ValueError(f"layers: {name!r} returns {type(output).__name__}, which holds no "
                     "tensor to measure")


def resolve_layers(model: nn.Module, layers: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"blocks"`` -> the blocks before the classifier; a list stays as given (checked).

    Raises ValueError naming an unknown module, with the network's top-level modules.
    """
    if isinstance(layers, str):
        if layers != "blocks":
            raise ValueError(f"layers: give module names or 'blocks', got {layers!r}")
        classifier = last_linear(model)[0]
        return [name for name in top_level_blocks(model) if name != classifier]
    LayerTaps(model, list(layers))  # checks the names
    return list(layers)


def pool_activation(x: Tensor, pool: str) -> Tensor:
    """(B, ...) activation -> (B, D) rows of its own float dtype (a float64 network keeps
    float64 features: float32 would lose the within-class spread under a large common
    offset); a non-float activation becomes float32.

    ``pool="avg"``: a 4-D (B, K, H, W) map is averaged over H and W (docs/metrics.md,
    "Classifier-free measurement"); a 3-D token sequence (B, T, K) over T.
    ``pool="cls"``: a token sequence gives its first token (B, K), what a ViT or BERT head
    reads; a map is averaged as with "avg". Other shapes and ``pool="flatten"`` flatten
    everything after the batch axis.
    """
    if pool in ("avg", "cls") and x.ndim == 4:
        x = x.mean(dim=(2, 3))
    elif pool == "cls" and x.ndim == 3:
        x = x[:, 0]
    elif pool == "avg" and x.ndim == 3:
        x = x.mean(dim=1)
    x = x.flatten(1)
    return x if x.dtype.is_floating_point else x.float()


class LayerTaps:
    """Forward hooks that capture pooled activations of named modules, batch by batch.

    The one place a network's inner features are read: ``nctools.measure_model`` and the
    layer-wise training snapshots both use it. A name equal to ``input_of`` is captured
    at the INPUT of that module (the classifier's features); every other name at the
    module's OUTPUT (a model-output object, dict or tuple gives its hidden states:
    :func:`hidden_state`). ``pool="auto"`` pools token sequences as the network's own head
    reads them (:func:`reads_cls_token`: "cls" or "avg") and maps by averaging.

    Usage::

        with LayerTaps(model, ["layer1", "fc"], input_of="fc") as taps:
            model(x)
            feats = taps.pop()   # {"layer1": (B, 64), "fc": (B, 512)}
    """

    def __init__(
        self, model: nn.Module, layers: list[str], input_of: str | None = None,
        pool: str = "avg",
    ) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name not in modules or name == ""]
        if unknown:
            top = [name for name, _ in model.named_children()]
            raise ValueError(
                f"layers: no module named {unknown[0]!r} in {type(model).__name__}; "
                f"top-level modules: {top}"
            )
        if pool == "auto":
            pool = "cls" if reads_cls_token(model) else "avg"
        self.model, self.layers, self.input_of, self.pool = model, list(layers), input_of, pool
        self.modules = modules
        self.captured: dict[str, Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> LayerTaps:
        for name in self.layers:
            module = self.modules[name]
            if name == self.input_of:
                hook = self._store_input(name)
                self.handles.append(module.register_forward_hook(hook))
            else:
                self.handles.append(module.register_forward_hook(self._store_output(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _store_input(self, name: str):
        def hook(_module: nn.Module, inputs: tuple, _output: object) -> None:
            self.captured[name] = pool_activation(inputs[0].detach(), self.pool)
        return hook

    def _store_output(self, name: str):
        def hook(_module: nn.Module, _inputs: tuple, output: Any) -> None:
            self.captured[name] = pool_activation(hidden_state(name, output).detach(), self.pool)
        return hook

    def pop(self) -> dict[str, Tensor]:
        """``{layer: (B, D_layer) float32}`` of the last forward pass; raises if one is missing."""
        missing = [name for name in self.layers if name not in self.captured]
        if missing:
            raise ValueError(f"layers: {missing[0]!r} did not run in the forward pass")
        out, self.captured = self.captured, {}
        return out


class InputOf:
    """A forward pre-hook that keeps the input of ``module`` from the latest forward pass.

    Usage::

        with InputOf(model.fc) as hook:
            model(x)
            features = hook.value          # (B, D) detached: what model.fc received

    ``value`` is the first positional input, detached and flattened to (B, D); the hook
    is removed on leaving the ``with`` block (or by :meth:`remove`).
    """

    def __init__(self, module: nn.Module) -> None:
        self.value: Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0].detach().flatten(1)

    def take(self) -> Tensor:
        """The captured input, cleared so that a stale one is never read twice."""
        if self.value is None:
            raise ValueError("the hooked layer did not run in the last forward pass")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> InputOf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
