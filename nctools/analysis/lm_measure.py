"""`measure_language_model`: token-level neural collapse of a language model, streamed.

Usage::

    from nctools.analysis.lm_measure import measure_language_model
    from nctools.data.text import load_tokenizer, text_batches, text_documents

    tokenizer = load_tokenizer("path/to/gpt2")
    batches = lambda: text_batches(text_documents("text:corpus.txt"), tokenizer, 512)
    metrics = measure_language_model(model, batches, min_count=10)   # docs/metrics.md keys
    by_layer = measure_language_model(model, batches, layers="all")  # {layer: metrics}

Wu & Papyan (NeurIPS 2024, "Linguistic Collapse") read a language model as a classifier
over its vocabulary: each position's LM-head input is a sample, the token it predicts its
label (:mod:`nctools.models.tokens`), the LM head the classifier. The token samples are
streamed through the measurement engine's two passes (the model runs on every batch
twice), so memory holds the class statistics (V x D) and one batch, never the features.
Tokens that never occur as labels are not classes (``classes_measured``); the NC4 keys
compare the nearest class mean with the model's own argmax over the whole vocabulary.
With ``layers``, every hidden state the model returns (``output_hidden_states=True``) is
measured against the same token labels in the same two passes; the LM head is the
classifier of the last one only (docs/language-models.md, "Layer by layer").
See docs/language-models.md for the conventions and their costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import overload

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nctools.metrics.engine import CLASSIFIER_FREE_KEYS, Engine, Layer
from nctools.metrics.inputs import check_labels
from nctools.metrics.measure import measure_chunks
from nctools.metrics.vocab import VocabularyOptions
from nctools.models.tokens import (
    IGNORE_INDEX,
    LM_HEAD,
    Task,
    lm_head,
    lm_layer_names,
    lm_layer_samples,
    lm_task,
    lm_token_samples,
)

Batches = Iterable[Mapping[str, Tensor]]


@overload
def measure_language_model(
    model: nn.Module,
    batches: Callable[[], Batches] | Batches,
    *,
    task: Task | None = None,
    min_count: int = 1,
    top_k: int | None = None,
    cdnv_power: int = 1,
    global_mean: str = "samples",
    ncc_samples: int | None = None,
    etf_without_simplex: bool = False,
    pair_precision: str = "float32",
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    layers: None = None,
) -> dict[str, float]: ...


@overload
def measure_language_model(
    model: nn.Module,
    batches: Callable[[], Batches] | Batches,
    *,
    task: Task | None = None,
    min_count: int = 1,
    top_k: int | None = None,
    cdnv_power: int = 1,
    global_mean: str = "samples",
    ncc_samples: int | None = None,
    etf_without_simplex: bool = False,
    pair_precision: str = "float32",
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    layers: str | Sequence[str],
) -> dict[str, dict[str, float]]: ...


@overload
def measure_language_model(
    model: nn.Module,
    batches: Callable[[], Batches] | Batches,
    *,
    task: Task | None = None,
    min_count: int = 1,
    top_k: int | None = None,
    cdnv_power: int = 1,
    global_mean: str = "samples",
    ncc_samples: int | None = None,
    etf_without_simplex: bool = False,
    pair_precision: str = "float32",
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    layers: str | Sequence[str] | None = None,
) -> dict[str, float] | dict[str, dict[str, float]]: ...


def measure_language_model(
    model: nn.Module,
    batches: Callable[[], Batches] | Batches,
    *,
    task: Task | None = None,
    min_count: int = 1,
    top_k: int | None = None,
    cdnv_power: int = 1,
    global_mean: str = "samples",
    ncc_samples: int | None = None,
    etf_without_simplex: bool = False,
    pair_precision: str = "float32",
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
    layers: str | Sequence[str] | None = None,
) -> dict[str, float] | dict[str, dict[str, float]]:
    """The docs/metrics.md keys of ``model``'s token samples (Wu & Papyan 2024).

    Args:
        model: a Hugging Face causal (``*ForCausalLM``, ``*LMHeadModel``) or masked
            (``*ForMaskedLM``) language model, on its device (put it in eval mode).
        batches: a callable returning a fresh iterable of batches (it is called twice), or
            a re-iterable (a list, a DataLoader); each batch a dict of ``input_ids``
            (B, T) and optionally ``attention_mask``, ``token_type_ids``, ``labels`` (B, T)
            (:func:`nctools.data.text.text_batches` makes them; a masked LM needs labels).
            Under torch.distributed with ``group``: this process's share of the text.
        task: ``"causal"`` or ``"masked"``; read from the model's class when None.
        min_count, top_k: measure only the tokens with at least ``min_count`` samples,
            then the ``top_k`` most frequent (Wu & Papyan's ``--min_per_class``).
        cdnv_power: 1, or 2 as the Linguistic Collapse code (||mu_c - mu_c'||^4).
        global_mean: ``"samples"`` or ``"classes"`` (the mean of the class means, Wu &
            Papyan's centre).
        ncc_samples: NC4 on this many evenly spaced tokens (its cost is N x V x D).
        etf_without_simplex: compute the simplex-ETF keys also when C > D + 1 (by
            default NaN with a warning there: no simplex ETF exists).
        pair_precision: ``"float32"`` (GNC2 and CDNV's pairs of tokens in float32
            tiles summed in float64: ~1e-7 relative at a vocabulary's scale, about 3x
            faster on a CPU) or ``"float64"`` (exact to rounding); see
            :func:`nctools.measure`.
        ignore_index: the label value that is not a sample.
        device: where the statistics live (default: the LM head's device).
        group: under torch.distributed, the processes whose token streams are measured
            as one (statistics summed); None: this process's alone.
        layers: None: the LM head's input alone; ``"all"`` (or ``"blocks"``): every layer
            of :func:`nctools.models.tokens.lm_layer_names` (the embeddings, each block's
            output, the LM head's input); or a list of those names.

    Returns:
        the metrics dict of :func:`nctools.measure` on the flattened token samples, with
        ``classes_measured`` (and ``ncc_samples`` when asked); with ``layers``
        ``{layer: metrics}`` in depth order, the full suite at ``"lm_head"``, the
        classifier-free keys (``CLASSIFIER_FREE_KEYS``) at the others, the same classes
        measured at every layer.
    """
    task = task or lm_task(model)
    if task is None:
        raise ValueError(f"model: {type(model).__name__} is not a causal or masked LM "
                         "(*ForCausalLM, *LMHeadModel, *ForMaskedLM)")
    options = VocabularyOptions(min_count=min_count, top_k=top_k, cdnv_power=cdnv_power,
                                global_mean=global_mean, ncc_samples=ncc_samples,
                                etf_without_simplex=etf_without_simplex,
                                pair_precision=pair_precision)
    weight, bias = lm_head(model)
    fresh = _fresh(batches)
    if layers is not None:
        return _measure_layers(model, fresh, task, _layer_names(model, layers), options,
                               ignore_index, device, group)

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        return lm_token_samples(model, fresh(), task, ignore_index)

    result, _ = measure_chunks(chunks, weight, bias, device=device, group=group,
                               **options.measure_options())
    return result


def _layer_names(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """``layers`` as names of :func:`lm_layer_names`, in the order given."""
    if isinstance(layers, str):
        if layers not in ("all", "blocks"):
            raise ValueError(f"layers: give 'all', 'blocks' or a list of layer names, "
                             f"got {layers!r}")
        return lm_layer_names(model)
    names = list(layers)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"layers: give distinct layer names, got {names}")
    return names


def _measure_layers(model: nn.Module, fresh: Callable[[], Batches], task: Task,
                    names: list[str], options: VocabularyOptions, ignore_index: int,
                    device: torch.device | str | None, group: dist.ProcessGroup | None
                    ) -> dict[str, dict[str, float]]:
    """Every layer of ``names`` in the engine's two passes over the token samples: the
    LM head the classifier of ``"lm_head"``, the other layers classifier-free."""
    weight, bias = lm_head(model)
    device = torch.device(device if device is not None else weight.device)
    weight = weight.to(device, torch.float64)
    bias = None if bias is None else bias.to(device, torch.float64)
    vocabulary = weight.shape[0]
    engine = Engine(vocabulary, {name: Layer(weight, bias) if name == LM_HEAD else Layer()
                                 for name in names},
                    device=device, sync=group is not None, group=group,
                    **options.measure_options())
    for _ in range(2):
        for features, labels in lm_layer_samples(model, fresh(), names, task, ignore_index):
            check_labels(labels, vocabulary)
            engine.update(features, labels)
        engine.end_pass()
    inner = (*CLASSIFIER_FREE_KEYS, "classes_measured", "ncc_samples")
    return {name: values if name == LM_HEAD else {k: v for k, v in values.items() if k in inner}
            for name, values in engine.results().items()}


def _fresh(batches: Callable[[], Batches] | Batches) -> Callable[[], Batches]:
    """A callable giving the batches anew for each pass; an iterator is refused (the
    second pass would find it exhausted)."""
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise ValueError("batches: an iterator can be read only once; pass a callable "
                         "returning fresh batches (they are read twice)")
    return lambda: batches
