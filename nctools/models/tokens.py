"""Tokens as samples: a language model's LM-head inputs paired with the tokens they predict.

Wu & Papyan (NeurIPS 2024, "Linguistic Collapse") treat a language model as a classifier
over its vocabulary: the LM head's input at a position is a sample, the token the model is
trained to predict there is its label, and the LM head (the output embedding) is the
classifier. Usage::

    task = lm_task(model)                          # "causal", "masked" or None
    weight, bias = lm_head(model)                  # (V, D), (V,) or None
    for features, labels in lm_token_samples(model, batches):
        ...                                        # (N, D), (N,): one batch's tokens

The pairs are exactly those of the model's own loss:
a causal LM's position t predicts the token at t + 1 (the last position predicts nothing);
a masked LM's masked positions predict the original token. Positions whose label is
``ignore_index`` or that the attention mask hides are not samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from nctools.models.features import InputOf

IGNORE_INDEX = -100  # the label PyTorch's cross_entropy and Hugging Face's losses skip

Task = Literal["causal", "masked"]


def lm_task(model: nn.Module) -> Task | None:
    """The language-modelling task of a Hugging Face model, read from its class name.

    ``*ForCausalLM`` and ``*LMHeadModel`` (GPT-2's name) -> ``"causal"`` (next token);
    ``*ForMaskedLM`` -> ``"masked"``; anything else -> None (a classifier of its inputs).
    """
    return task_of_class(type(model).__name__)


def find_language_model(module: nn.Module) -> nn.Module | None:
    """The language model in ``module``: ``module`` itself when :func:`lm_task` knows its
    class, else its first submodule that is one (a LightningModule that holds a Hugging
    Face ``*ForCausalLM``), else None."""
    return next((m for m in module.modules() if lm_task(m) is not None), None)


def task_of_class(name: str) -> Task | None:
    """The task of a model class name (as a Hugging Face config's ``architectures``)."""
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return None


def lm_head(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head as the classifier: W (V, D) and b (V,) or None, detached.

    The head is ``model.get_output_embeddings()``: GPT-2 ties it to the input embeddings
    and has no bias; BERT's decoder has a bias of its own.
    """
    head = output_embeddings(model)
    weight: Tensor = getattr(head, "weight")  # noqa: B009 (an nn.Module attribute to mypy)
    bias: Tensor | None = getattr(head, "bias", None)
    return weight.detach(), None if bias is None else bias.detach()


def output_embeddings(model: nn.Module) -> nn.Module:
    """The LM head module, ``model.get_output_embeddings()``; ValueError if it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"model: {type(model).__name__} has no output embeddings (LM head)")
    return head


def token_samples(
    hidden: Tensor,
    input_ids: Tensor,
    task: Task,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """The (features, labels) samples of one batch of token positions.

    Args:
        hidden: (B, T, D) the LM head's input.
        input_ids: (B, T) token ids fed to the model (any device: the labels and mask
            are read on ``hidden``'s).
        task: ``"causal"``: position t's label is ``labels[:, t + 1]`` (``input_ids`` when
            no labels are given), the model's own shift; ``"masked"``: position t's label
            is ``labels[:, t]``, which a masked LM needs (``ignore_index`` where not masked).
        attention_mask: (B, T) 1 for real tokens; a causal pair is dropped when either its
            position or its label's position is hidden.
        labels: (B, T) the labels the model's loss would be given, ``ignore_index`` to skip.
        ignore_index: the label value that is not a sample.

    Returns:
        features (N, D) in ``hidden``'s dtype and labels (N,) int64 on its device, in
        row-major (b, t) order, N <= B * T.
    """
    batch, length = input_ids.shape
    if hidden.shape[:2] != (batch, length):
        raise ValueError(f"hidden: shape {tuple(hidden.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    if task == "masked" and labels is None:
        raise ValueError("labels: a masked LM needs labels (ignore_index where not masked)")
    target = (input_ids if labels is None else labels).to(hidden.device, torch.long)
    keep_mask = (torch.ones_like(target, dtype=torch.bool) if attention_mask is None
                 else attention_mask.to(hidden.device).bool())
    if task == "causal":
        target = nn.functional.pad(target[:, 1:], (0, 1), value=ignore_index)
        keep_mask = keep_mask & nn.functional.pad(keep_mask[:, 1:], (0, 1), value=False)
    elif task != "masked":
        raise ValueError(f"task: {task!r} is not 'causal' or 'masked'")
    keep = keep_mask & (target != ignore_index)
    return hidden[keep], target[keep]


def flatten_tokens(features: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
                   ) -> tuple[Tensor, Tensor]:
    """Token positions as samples: features (B, T, D) and labels (B, T) -> (N, D), (N,).

    Each position's label is its own (already shifted for a causal LM, e.g. by
    :func:`token_samples`); positions labelled ``ignore_index`` are not samples. Row-major
    (b, t) order.
    """
    if features.ndim != 3 or labels.shape != features.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but features has shape "
                         f"{tuple(features.shape)}: expected (B, T) labels for (B, T, D)")
    keep = labels != ignore_index
    return features[keep], labels[keep]


class LMHeadInput(InputOf):
    """A forward pre-hook that keeps the LM head's input, (B, T, D), of the last forward.

    Usage::

        with LMHeadInput(model) as hook:
            model(input_ids=ids)
            hidden = hook.take()           # (B, T, D) detached
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(output_embeddings(model))

    def _keep(self, _module: nn.Module, args: tuple) -> None:
        self.value = args[0].detach()  # not flattened: positions stay apart

    def take(self) -> Tensor:
        """The captured input, cleared so that a stale one is never read twice."""
        if self.value is None:
            raise ValueError("the LM head did not run in the last forward pass")
        return super().take()


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # labels stay ours


@torch.no_grad()
def lm_token_samples(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    task: Task | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Run ``model`` on each batch and yield its token samples (features (N, D), labels (N,)).

    Args:
        model: a Hugging Face language model (on its device, in eval mode if wanted).
        batches: dicts with ``input_ids`` (B, T), optionally ``attention_mask``,
            ``token_type_ids`` and ``labels`` (B, T) (a masked LM's batches need labels).
        task: as :func:`token_samples`; read from the model when None.

    The labels are not passed to the model, so it computes no loss; the samples are
    picked on the model's device and moved to the CPU batch by batch, so memory holds one
    batch. A batch may come on any device (a Trainer's loader places it on the model's).
    """
    task = task or lm_task(model)
    if task is None:
        raise ValueError(f"model: {type(model).__name__} is not a causal or masked LM")
    device = next(model.parameters()).device
    with LMHeadInput(model) as hook:
        for batch in batches:
            model(**_model_inputs(batch, device))
            features, labels = token_samples(hook.take(), batch["input_ids"], task,
                                             batch.get("attention_mask"),
                                             batch.get("labels"), ignore_index)
            yield features.cpu(), labels.cpu()


LM_HEAD = "lm_head"  # the layer name of the LM head's input


@torch.no_grad()
def lm_layer_names(model: nn.Module) -> list[str]:
    """The layers of a language model that :func:`lm_layer_samples` measures, in depth order.

    They are the hidden states the model returns with ``output_hidden_states=True`` (the
    Hugging Face way): ``"embeddings"``, then ``"block.1"``, ``"block.2"``, ... (the output
    of each transformer block), and last ``"lm_head"``, the LM head's input. Where the last
    hidden state is the LM head's input (GPT-2 and Llama return it after their final
    norm), it is ``"lm_head"``; where the head transforms it first (BERT), the last block
    keeps its name and ``"lm_head"`` follows. One forward pass on two tokens tells which.
    """
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    with LMHeadInput(model) as hook:
        hidden = _hidden_states(model, {"input_ids": ids})
        head = hook.take()
    blocks = len(hidden) - (1 if torch.equal(head, hidden[-1]) else 0)
    return ["embeddings", *(f"block.{i}" for i in range(1, blocks)), LM_HEAD]


@torch.no_grad()
def lm_layer_samples(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    layers: list[str],
    task: Task | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Run ``model`` on each batch and yield the token samples of several layers:
    ``({layer: features (N, D)}, labels (N,))``, every layer's picked at the same
    positions (:func:`token_samples`), on the model's device.

    Args:
        model, batches, task, ignore_index: as :func:`lm_token_samples`.
        layers: names among :func:`lm_layer_names`'s (the hidden states, ``"lm_head"``
            the LM head's input).
    """
    task = task or lm_task(model)
    if task is None:
        raise ValueError(f"model: {type(model).__name__} is not a causal or masked LM")
    device = next(model.parameters()).device
    names = lm_layer_names(model)
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(f"layers: {unknown[0]!r} is not a layer of the model; its layers: "
                         f"{', '.join(names)}")
    with LMHeadInput(model) as hook:
        for batch in batches:
            hidden = _hidden_states(model, _model_inputs(batch, device))
            states = {**dict(zip(names[:-1], hidden, strict=False)), LM_HEAD: hook.take()}
            features, labels = {}, None
            for name in layers:
                features[name], labels = token_samples(
                    states[name], batch["input_ids"], task, batch.get("attention_mask"),
                    batch.get("labels"), ignore_index)
            assert labels is not None
            yield features, labels


def _hidden_states(model: nn.Module, inputs: Mapping[str, Tensor]) -> tuple[Tensor, ...]:
    """The hidden states (L + 1 of (B, T, D)) of one forward pass."""
    hidden = getattr(model(**inputs, output_hidden_states=True), "hidden_states", None)
    if not hidden:
        raise ValueError(f"model: {type(model).__name__} returns no hidden_states with "
                         "output_hidden_states=True")
    return tuple(hidden)


def _model_inputs(batch: object, device: torch.device) -> dict[str, Tensor]:
    """A batch's model inputs (``MODEL_INPUTS``) on ``device``; a batch that is not a dict
    of input_ids is refused."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        kind = (f"a dict of {', '.join(map(str, batch))}"
                if isinstance(batch, Mapping) else f"a {type(batch).__name__}")
        raise ValueError("batches: a language model's batch is a dict of input_ids "
                         f"(B, T) and optionally attention_mask, labels; got {kind}")
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
