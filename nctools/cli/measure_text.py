"""``nctools measure --model hf:PATH --dataset text:FILE``: a language model's token-level
neural collapse (Wu & Papyan, NeurIPS 2024; docs/language-models.md).

The task is read from the folder's ``config.json`` (``architectures``): ``*ForCausalLM``
and ``*LMHeadModel`` predict the next token, ``*ForMaskedLM`` the masked tokens (BERT's
15%, from a fixed seed); any other model goes the classification way of ``nctools
measure``. The text (``text:FILE`` or ``datasets:PATH``) is tokenised with the model's own
tokenizer, packed into ``--seq-len`` sequences every ``--stride`` tokens and streamed
twice through :func:`nctools.analysis.lm_measure.measure_language_model`. Under torchrun
batch i of the stream goes to rank i mod K and the statistics are summed.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from nctools.errors import ConfigError, NctoolsError

if TYPE_CHECKING:  # torch and transformers load only when a language model is measured
    from torch import Tensor, nn

    from nctools.models.tokens import Task

TEXT_SOURCES = ("text:", "datasets:")
TEXT_BATCH = 8  # sequences a batch unless --batch-size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a language model's measurement (ignored by the classification way)."""
    g = p.add_argument_group("language models (--model hf:PATH of a *ForCausalLM or "
                             "*ForMaskedLM, --dataset text:FILE or datasets:PATH)")
    g.add_argument("--seq-len", type=int, default=512, metavar="T",
                   help="tokens a sequence (default 512)")
    g.add_argument("--stride", type=int, metavar="S",
                   help="tokens between sequence starts (default --seq-len: no overlap)")
    g.add_argument("--min-count", type=int, default=1, metavar="K",
                   help="measure the tokens with at least K samples (Wu & Papyan 2024)")
    g.add_argument("--top-k", type=int, metavar="K", help="measure the K most frequent tokens")
    g.add_argument("--cdnv-power", type=int, choices=(1, 2), default=1,
                   help="CDNV's distance power: 1, or 2 as the Linguistic Collapse code")
    g.add_argument("--global-mean", choices=("samples", "classes"), default="samples",
                   help="centre on the mean of the tokens or of the class means (the paper)")
    g.add_argument("--ncc-samples", type=int, metavar="N",
                   help="NC4 on N evenly spaced tokens (its cost is N x vocabulary x D)")
    g.add_argument("--pair-precision", choices=("float32", "float64"), default="float32",
                   help="GNC2 and CDNV's pairs of tokens in float32 tiles summed in float64 "
                        "(default; ~1e-7 relative) or all in float64")


def lm_task_of(args: argparse.Namespace) -> Task | None:
    """The task of ``--model hf:PATH`` read from its config.json, or None (not a language
    model, or not an hf: folder): the classification way. A text data set without a
    language model is an error."""
    from nctools.models.tokens import task_of_class

    task = None
    if args.model is not None and args.model.startswith("hf:"):
        config = Path(args.model[3:]).expanduser() / "config.json"
        if config.is_file():
            try:
                names = json.loads(config.read_text()).get("architectures") or []
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{config}: not a JSON object") from None
            task = next((t for t in map(task_of_class, names) if t is not None), None)
    text = args.dataset.startswith(TEXT_SOURCES)
    if text and task is None:
        raise ConfigError(f"--dataset {args.dataset}: text needs --model hf:PATH of a "
                          "language model (*ForCausalLM, *LMHeadModel or *ForMaskedLM)")
    if task is not None and not text:
        raise ConfigError(f"--model {args.model} is a {task} language model: --dataset must "
                          "be text:FILE or datasets:PATH")
    return task


def measure(args: argparse.Namespace, task: Task) -> dict[str, dict[str, float]]:
    """The metrics of the language model's token samples (every rank gets them), by layer:
    ``{"lm_head": metrics}`` without ``--layers``."""
    import torch.distributed as dist

    from nctools.analysis.lm_measure import measure_language_model
    from nctools.cli.measure_data import device
    from nctools.models.tokens import LM_HEAD
    from nctools.training import distributed

    _check(args)
    folder = args.model[3:]
    model = _load(folder, task)
    info = distributed.dist_from_env()
    dev = distributed.rank_device(device(args.device), info, key="--device")
    model.to(dev)
    batches = _batches(args, folder, task, info.rank, info.world_size)
    layers = layer_names(args)
    with distributed.process_group(info, dev):
        group = dist.group.WORLD if info.distributed else None
        try:
            result = measure_language_model(
                model, batches, task=task, min_count=args.min_count, top_k=args.top_k,
                cdnv_power=args.cdnv_power, global_mean=args.global_mean,
                ncc_samples=args.ncc_samples, pair_precision=args.pair_precision,
                group=group, layers=layers)
        except ValueError as exc:
            raise NctoolsError(f"measure --model {args.model}: {exc}") from None
    if layers is None:
        return {LM_HEAD: cast("dict[str, float]", result)}
    return cast("dict[str, dict[str, float]]", result)


def layer_names(args: argparse.Namespace) -> str | list[str] | None:
    """``--layers`` of a language model: None, ``all`` / ``blocks`` (every hidden state and
    the LM head's input), or a list of names (``embeddings,block.3,lm_head``)."""
    if not args.layers:
        return None
    return args.layers if args.layers in ("all", "blocks") else args.layers.split(",")


def _check(args: argparse.Namespace) -> None:
    for flag in ("ood_dataset", "layer", "weights", "num_classes"):
        if getattr(args, flag, None):
            name = "--" + flag.replace("_", "-")
            raise ConfigError(f"{name}: not for a language model (measured at its LM head's "
                              "input, over its vocabulary)")
    for flag in ("ncc_samples", "top_k"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: must be an int >= 1, got {value}")
    if args.min_count < 1:
        raise ConfigError(f"--min-count: must be an int >= 1, got {args.min_count}")
    if args.seq_len < 2:
        raise ConfigError(f"--seq-len: must be an int >= 2 (a next-token pair), got "
                          f"{args.seq_len}")
    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise ConfigError(f"--stride: must be in [1, --seq-len = {args.seq_len}], got "
                          f"{args.stride}")


def _load(folder: str, task: Task) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps to nctools' one-line messages
    auto = AutoModelForCausalLM if task == "causal" else AutoModelForMaskedLM
    try:
        return auto.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model hf:{folder}: {first}") from None


def _batches(args: argparse.Namespace, folder: str, task: Task, rank: int,
             world: int) -> Callable[[], Iterator[dict[str, Tensor]]]:
    """A callable giving this rank's batches of the text anew (batch i to rank i mod K)."""
    from nctools.data.text import load_tokenizer, text_batches, text_documents

    tokenizer = load_tokenizer(folder)
    size = TEXT_BATCH if args.batch_size is None else args.batch_size

    def fresh() -> Iterator[dict[str, Tensor]]:
        stream = text_batches(text_documents(args.dataset), tokenizer, args.seq_len,
                              args.stride, size, task)
        return itertools.islice(stream, rank, None, world)

    return fresh


