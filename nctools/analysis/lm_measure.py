"""`measure_language_model`: token-level neural collapse of a language model, streamed.

Usage::

    from nctools.analysis.lm_measure import measure_language_model
    from nctools.data.text import load_tokenizer, text_batches, text_documents

    tokenizer = load_tokenizer("path/to/gpt2")
    batches = lambda: text_batches(text_documents("text:corpus.txt"), tokenizer, 512)
    metrics = measure_language_model(model, batches, min_count=10)   # docs/metrics.md keys

Wu & Papyan (NeurIPS 2024, "Linguistic Collapse") read a language model as a classifier
over its vocabulary: each position's LM-head input is a sample, the token it predicts its
label (:mod:`nctools.models.tokens`), the LM head the classifier. The token samples are
streamed through the measurement engine's two passes (the model runs on every batch
twice), so memory holds the class statistics (V x D) and one batch, never the features.
Tokens that never occur as labels are not classes (``classes_measured``); the NC4 keys
compare the nearest class mean with the model's own argmax over the whole vocabulary.
See docs/language-models.md for the conventions and their costs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nctools.metrics.measure import measure_chunks
from nctools.models.tokens import IGNORE_INDEX, Task, lm_head, lm_task, lm_token_samples

Batches = Iterable[Mapping[str, Tensor]]


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
) -> dict[str, float]:
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

    Returns:
        the metrics dict of :func:`nctools.measure` on the flattened token samples, with
        ``classes_measured`` (and ``ncc_samples`` when asked).
    """
    task = task or lm_task(model)
    if task is None:
        raise ValueError(f"model: {type(model).__name__} is not a causal or masked LM "
                         "(*ForCausalLM, *LMHeadModel, *ForMaskedLM)")
    weight, bias = lm_head(model)
    fresh = _fresh(batches)

    def chunks() -> Iterator[tuple[Tensor, Tensor]]:
        return lm_token_samples(model, fresh(), task, ignore_index)

    result, _ = measure_chunks(
        chunks, weight, bias, device=device, group=group, global_mean=global_mean,
        drop_empty=True, min_count=min_count, top_k=top_k, cdnv_power=cdnv_power,
        ncc_samples=ncc_samples, argmax_all_classes=True,
        etf_without_simplex=etf_without_simplex, pair_precision=pair_precision)
    return result


def _fresh(batches: Callable[[], Batches] | Batches) -> Callable[[], Batches]:
    """A callable giving the batches anew for each pass; an iterator is refused (the
    second pass would find it exhausted)."""
    if callable(batches):
        return batches
    if iter(batches) is batches:
        raise ValueError("batches: an iterator can be read only once; pass a callable "
                         "returning fresh batches (they are read twice)")
    return lambda: batches
