"""Text for language models, streamed: documents -> tokens -> packed sequences -> batches.

Usage::

    tokenizer = load_tokenizer("path/to/model")            # the model's own tokenizer
    docs = text_documents("text:corpus.txt")                # or "datasets:FOLDER_OR_FILE"
    for batch in text_batches(docs, tokenizer, seq_len=512, task="causal"):
        ...                    # input_ids, attention_mask, labels: (B, seq_len) int64

Sources: ``text:FILE`` is plain text (one document a line, line breaks kept) or JSON lines
(``.jsonl``/``.json``, a ``text`` field a line); ``datasets:PATH`` is Hugging Face
``datasets`` data, a ``save_to_disk`` folder or a local ``.txt``/``.json(l)``/``.csv``/
``.parquet`` file, read through ``datasets`` (its ``text`` column). Every stage is a
generator, so memory holds one block of documents and one batch, never the file.

Documents are tokenised without special tokens and concatenated, then cut into sequences
of ``seq_len`` tokens every ``stride`` tokens. With ``stride = seq_len`` (the default,
Hugging Face's ``run_clm`` packing) a sequence's first token is predicted by no position;
with ``stride < seq_len`` a sequence's first ``seq_len - stride`` tokens are context whose
labels are -100, so every token after the first is predicted once (Hugging Face's
fixed-length perplexity recipe). The tail is one padded sequence (attention mask 0).
A masked LM's batches mask 15% of the predicted tokens as BERT does (Devlin et al. 2019:
80% the mask token, 10% a random token, 10% unchanged), from a fixed seed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nctools.errors import ConfigError, DataError, install_hint

IGNORE_INDEX = -100  # the label the losses skip (as in nctools.models.tokens)
JSON_SUFFIXES = (".jsonl", ".json")
DATASETS_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                     ".parquet": "parquet"}  # local file suffix -> datasets' builder
DOCS_PER_CALL = 64  # documents tokenised in one call of the (Rust, batched) tokenizer
MLM_PROBABILITY = 0.15  # BERT's share of masked tokens


def load_tokenizer(model_folder: str | Path) -> Any:
    """The model's own tokenizer, ``AutoTokenizer.from_pretrained(model_folder)``, offline."""
    from transformers import AutoTokenizer

    folder = Path(model_folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: no such model folder (for its tokenizer)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ------------------------------------------------------------------------------ documents
def text_documents(spec: str, split: str | None = None) -> Iterator[str]:
    """The documents of ``text:FILE`` or ``datasets:PATH``, one string at a time."""
    kind, _, path = spec.partition(":")
    if kind == "text" and path:
        return file_documents(path)
    if kind == "datasets" and path:
        return dataset_documents(path, split)
    raise ConfigError(f"dataset: {spec!r} is not text:FILE or datasets:PATH")


def file_documents(path: str | Path) -> Iterator[str]:
    """A text file's documents: its lines (line breaks kept), or JSON lines' ``text``."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{file}: no such text file")
    return _read_file(file)


def _read_file(file: Path) -> Iterator[str]:
    with file.open(encoding="utf-8") as lines:
        yield from documents_of_lines(lines, str(file), file.suffix in JSON_SUFFIXES)


def documents_of_lines(lines: Iterable[str], name: str, jsonl: bool) -> Iterator[str]:
    """Documents from lines read one at a time: each line, or each JSON line's ``text``.

    Args:
        lines: an open file or any iterable of lines.
        name: the file named in errors.
        jsonl: lines are JSON objects with a ``text`` field (blank lines skipped).
    """
    empty = True
    for number, line in enumerate(lines, start=1):
        if jsonl:
            if not line.strip():
                continue
            line = _json_text(line, name, number)
        empty = False
        yield line
    if empty:
        raise DataError(f"{name}: empty (no text)")


def _json_text(line: str, name: str, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {number}: not JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{name} line {number}: no 'text' field with a string")
    return record["text"]


def dataset_documents(path: str | Path, split: str | None = None,
                      column: str = "text") -> Iterator[str]:
    """Documents of Hugging Face ``datasets`` data: a ``save_to_disk`` folder (memory-mapped)
    or a local file streamed through the builder of its suffix."""
    try:
        import datasets
    except ImportError:
        raise DataError("datasets:PATH needs the datasets library: "
                        f"pip install '{install_hint('hf')}'") from None
    source = Path(path).expanduser()
    if source.is_dir():
        data = datasets.load_from_disk(str(source))
    elif source.suffix in DATASETS_BUILDERS and source.is_file():
        builder = DATASETS_BUILDERS[source.suffix]
        options = {"keep_linebreaks": True} if builder == "text" else {}
        data = datasets.load_dataset(builder, data_files=str(source), streaming=True,
                                     **options)
    else:
        raise DataError(f"{source}: no such datasets folder or "
                        f"{'/'.join(DATASETS_BUILDERS)} file")
    data = _one_split(data, source, split)
    if data.column_names is not None and column not in data.column_names:
        raise DataError(f"{source}: no {column!r} column (columns: {data.column_names})")
    return _column(data, column, source)


def _column(rows: Iterable[dict[str, Any]], column: str, source: Path) -> Iterator[str]:
    for row in rows:  # a streamed file's columns are known only from its rows
        if column not in row:
            raise DataError(f"{source}: no {column!r} column (columns: {list(row)})")
        yield row[column]


def _one_split(data: Any, source: Path, split: str | None) -> Any:
    if not hasattr(data, "keys"):  # a single Dataset
        return data
    names = list(data.keys())
    if split is None and len(names) == 1:
        split = names[0]
    if split not in names:
        raise DataError(f"{source}: choose a split with split= (one of {names})")
    return data[split]


# ------------------------------------------------------------------------ tokens, packing
def token_stream(documents: Iterable[str], tokenizer: Any,
                 docs_per_call: int = DOCS_PER_CALL) -> Iterator[int]:
    """The token ids of the documents, concatenated, tokenised ``docs_per_call`` at a time."""
    block: list[str] = []
    for document in documents:
        block.append(document)
        if len(block) == docs_per_call:
            yield from _tokenise(block, tokenizer)
            block = []
    if block:
        yield from _tokenise(block, tokenizer)


def _tokenise(block: list[str], tokenizer: Any) -> Iterator[int]:
    # verbose=False: documents longer than the model's context are expected (we pack them)
    for ids in tokenizer(block, add_special_tokens=False, verbose=False)["input_ids"]:
        yield from ids


def pack(tokens: Iterable[int], seq_len: int, stride: int | None = None
         ) -> Iterator[tuple[list[int], int]]:
    """Windows of ``seq_len`` tokens every ``stride`` tokens: (tokens, context) pairs.

    ``context`` is the number of leading tokens already predicted in an earlier window
    (0 for the first window, ``seq_len - stride`` after); the last window may be shorter.
    """
    stride = _check_lengths(seq_len, stride)
    buffer: list[int] = []
    context, seen = 0, 0
    for token in tokens:
        buffer.append(token)
        seen += 1
        if len(buffer) == seq_len:
            yield buffer, context
            buffer, context = buffer[stride:], seq_len - stride
    if seen < 2:
        raise DataError(f"text: {seen} token(s); a sample needs at least 2")
    if len(buffer) > context:  # tokens no window has predicted yet
        yield buffer, context


def _check_lengths(seq_len: int, stride: int | None) -> int:
    if seq_len < 2:
        raise ConfigError(f"seq_len: {seq_len} < 2 (a next-token pair needs two tokens)")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ConfigError(f"stride: {stride} is not in [1, seq_len = {seq_len}]")
    return stride


# -------------------------------------------------------------------------------- batches
def text_batches(
    documents: Iterable[str],
    tokenizer: Any,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 8,
    task: str = "causal",
    seed: int = 0,
    docs_per_call: int = DOCS_PER_CALL,
) -> Iterator[dict[str, Tensor]]:
    """Batches of packed sequences: ``input_ids``, ``attention_mask``, ``labels`` (B, seq_len).

    Args:
        documents: strings, e.g. :func:`text_documents`.
        tokenizer: a Hugging Face tokenizer (:func:`load_tokenizer`).
        seq_len: tokens a sequence (>= 2); stride: tokens between sequence starts
            (default ``seq_len``, no overlap).
        task: ``"causal"`` (labels are the input ids, -100 on context and padding: the
            model's loss shifts them) or ``"masked"`` (BERT's 15% masking from ``seed``;
            labels are the original tokens there, -100 elsewhere).
        docs_per_call: documents read ahead and tokenised together.
    """
    _check_lengths(seq_len, stride)
    if task not in ("causal", "masked"):
        raise ConfigError(f"task: {task!r} is not 'causal' or 'masked'")
    if task == "masked" and tokenizer.mask_token_id is None:
        raise ConfigError("task: 'masked' needs a tokenizer with a mask token")
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                   if i is not None)
    gen = torch.Generator().manual_seed(seed)
    windows: list[tuple[list[int], int]] = []
    for window in pack(token_stream(documents, tokenizer, docs_per_call), seq_len, stride):
        windows.append(window)
        if len(windows) == batch_size:
            yield _batch(windows, seq_len, pad_id, task, tokenizer, gen)
            windows = []
    if windows:
        yield _batch(windows, seq_len, pad_id, task, tokenizer, gen)


def _batch(windows: list[tuple[list[int], int]], seq_len: int, pad_id: int, task: str,
           tokenizer: Any, gen: torch.Generator) -> dict[str, Tensor]:
    ids = torch.full((len(windows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    predicted = torch.zeros_like(ids, dtype=torch.bool)  # tokens no earlier window predicts
    for row, (tokens, context) in enumerate(windows):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = 1
        predicted[row, context:len(tokens)] = True
    if task == "causal":
        return {"input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(~predicted, IGNORE_INDEX)}
    inputs, labels = mask_tokens(ids, predicted, tokenizer, gen)
    return {"input_ids": inputs, "attention_mask": mask, "labels": labels}


def mask_tokens(ids: Tensor, candidates: Tensor, tokenizer: Any, gen: torch.Generator,
                probability: float = MLM_PROBABILITY) -> tuple[Tensor, Tensor]:
    """BERT's masking (Devlin et al. 2019, as Hugging Face's DataCollatorForLanguageModeling).

    Each candidate position that is not a special token is chosen with ``probability``;
    a chosen token becomes the mask token (80%), a random token (10%) or stays (10%).

    Args:
        ids: (B, T) token ids; candidates: (B, T) bool, the positions that may be masked.

    Returns:
        the model's inputs (B, T) and the labels (B, T): the original token where chosen,
        -100 elsewhere.
    """
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids, dtype=torch.long))
    chosen = candidates & ~special & (torch.rand(ids.shape, generator=gen) < probability)
    draw = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(tokenizer), ids.shape, generator=gen)
    inputs = torch.where(chosen & (draw < 0.8), tokenizer.mask_token_id, ids)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, inputs)
    return inputs, ids.masked_fill(~chosen, IGNORE_INDEX)
