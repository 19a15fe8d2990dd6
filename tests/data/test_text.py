"""Streamed text for language models: documents, tokens, packing and batches, with a
tokenizer trained here on the test text (no download)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import nctools
from nctools.data.text import (
    IGNORE_INDEX,
    documents_of_lines,
    file_documents,
    load_tokenizer,
    pack,
    text_batches,
    text_documents,
    token_stream,
)
from nctools.errors import ConfigError, DataError
from nctools.models.tokens import token_samples

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "far", "away", "from",
         "home", "while", "it", "rained"]


def corpus(lines: int = 60, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + ".\n"
                   for _ in range(lines))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's kind) trained on the corpus, saved and loaded offline."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus().splitlines(keepends=True), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                      mask_token="[MASK]")
    folder = tmp_path_factory.mktemp("model")
    wrapped.save_pretrained(folder)
    return load_tokenizer(folder)


def whole_text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_packing_round_trip(tokenizer, tmp_path) -> None:
    text = corpus()
    (tmp_path / "c.txt").write_text(text)
    want = whole_text_ids(tokenizer, text)
    stream = list(token_stream(text_documents(f"text:{tmp_path / 'c.txt'}"), tokenizer,
                               docs_per_call=7))
    assert stream == want and len(want) > 300
    batches = list(text_batches(file_documents(tmp_path / "c.txt"), tokenizer, seq_len=32,
                                batch_size=4))
    ids = torch.cat([b["input_ids"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    assert ids.shape == (-(-len(want) // 32), 32)
    assert ids[mask.bool()].tolist() == want  # concatenated, nothing lost or repeated
    assert int((mask == 0).sum()) == ids.numel() - len(want)  # only the tail is padded
    labels = torch.cat([b["labels"] for b in batches])
    assert torch.equal(labels, ids.masked_fill(mask == 0, IGNORE_INDEX))


@pytest.mark.parametrize("stride", [8, 11, 32])
def test_stride_predicts_every_token_once(tokenizer, stride: int) -> None:
    want = whole_text_ids(tokenizer, corpus())
    windows = list(pack(iter(want), 32, stride))
    starts = [i * stride for i in range(len(windows))]
    assert [w for w, _ in windows] == [want[s:s + 32] for s in starts]  # the overlap
    assert [c for _, c in windows] == [0] + [32 - stride] * (len(windows) - 1)
    predicted = []
    for batch in text_batches([corpus()], tokenizer, seq_len=32, stride=stride, batch_size=3):
        hidden = torch.zeros(*batch["input_ids"].shape, 1)
        predicted += token_samples(hidden, batch["input_ids"], "causal",
                                   batch["attention_mask"], batch["labels"])[1].tolist()
    # with an overlap, each token after the first once, in order; without one (run_clm's
    # packing) a sequence's first token has no position before it to predict it
    unpredicted = range(0, len(want), 32) if stride == 32 else [0]
    assert predicted == [t for i, t in enumerate(want) if i not in unpredicted]


def test_jsonl_documents(tokenizer, tmp_path) -> None:
    texts = corpus(12).splitlines(keepends=True)
    lines = [json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)]
    (tmp_path / "c.jsonl").write_text("".join(lines[:5]) + "\n" + "".join(lines[5:]))
    assert list(text_documents(f"text:{tmp_path / 'c.jsonl'}")) == texts  # blank skipped
    stream = list(token_stream(file_documents(tmp_path / "c.jsonl"), tokenizer))
    assert stream == [i for t in texts for i in whole_text_ids(tokenizer, t)]


class CountingLines:
    """An open file's lines, counting how many were read."""

    def __init__(self, path: Path) -> None:
        self.file = path.open()
        self.read = 0

    def __iter__(self) -> Iterator[str]:
        for line in self.file:
            self.read += 1
            yield line


def test_first_batch_reads_only_the_lines_it_needs(tokenizer, tmp_path) -> None:
    text = corpus(400)
    (tmp_path / "c.txt").write_text(text)
    lines = text.splitlines(keepends=True)
    tokens_per_line = [len(whole_text_ids(tokenizer, line)) for line in lines]
    needed = next(i + 1 for i in range(len(lines)) if sum(tokens_per_line[:i + 1]) >= 2 * 16)
    for per_call in (1, 5):
        counted = CountingLines(tmp_path / "c.txt")
        docs = documents_of_lines(counted, "c.txt", jsonl=False)
        first = next(iter(text_batches(docs, tokenizer, seq_len=16, batch_size=2,
                                       docs_per_call=per_call)))
        assert first["input_ids"].tolist() == [
            whole_text_ids(tokenizer, text)[:16], whole_text_ids(tokenizer, text)[16:32]]
        # the lines the batch needs, rounded up to one block of the tokenizer's calls
        assert counted.read == -(-needed // per_call) * per_call < len(lines)
        counted.file.close()


def test_masked_batches_mask_bert_s_share(tokenizer) -> None:
    text = corpus(300)
    runs = [list(text_batches([text], tokenizer, seq_len=64, task="masked", seed=3))
            for _ in range(2)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(*runs, strict=True) for k in a)
    original = torch.tensor(whole_text_ids(tokenizer, text))
    n = len(original)  # no overlap: the batches' tokens, in order, then the tail's padding
    ids = torch.cat([b["input_ids"] for b in runs[0]]).flatten()[:n]
    labels = torch.cat([b["labels"] for b in runs[0]]).flatten()[:n]
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen], original[~chosen])  # the rest reach the model as is
    assert abs(float(chosen.sum()) / n - 0.15) < 0.02  # ~5,000 tokens: 0.15 +- 3 s.e.
    masked = float((ids[chosen] == tokenizer.mask_token_id).float().mean())
    kept = float((ids[chosen] == original[chosen]).float().mean())
    assert abs(masked - 0.8) < 0.05 and abs(kept - 0.1) < 0.05


def test_datasets_sources_equal_the_text_reader(tokenizer, tmp_path) -> None:
    import datasets

    text = corpus(30)
    (tmp_path / "c.txt").write_text(text)
    rows = [{"text": t} for t in text.splitlines(keepends=True)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    want = list(text_documents(f"text:{tmp_path / 'c.txt'}"))
    for source in ("saved", "c.txt", "c.jsonl"):
        assert list(text_documents(f"datasets:{tmp_path / source}")) == want, source
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}
                         ).save_to_disk(str(tmp_path / "dict"))
    assert list(text_documents(f"datasets:{tmp_path / 'dict'}", split="test")) == want[3:]
    with pytest.raises(DataError, match=r"dict: choose a split with split= \(one of"):
        text_documents(f"datasets:{tmp_path / 'dict'}")


def test_bad_inputs_are_one_line_errors(tokenizer, tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "one.txt").write_text("the")
    (tmp_path / "junk.jsonl").write_text('{"text": "a"}\n{"text": \n')
    cases = [
        (lambda: list(text_documents("text:" + str(tmp_path / "nope.txt"))),
         DataError, r"nope.txt: no such text file"),
        (lambda: list(file_documents(tmp_path / "empty.txt")), DataError,
         r"empty.txt: empty \(no text\)"),
        (lambda: list(file_documents(tmp_path / "bad.jsonl")), DataError,
         r"bad.jsonl line 2: no 'text' field"),
        (lambda: list(file_documents(tmp_path / "junk.jsonl")), DataError,
         r"junk.jsonl line 2: not JSON \(Expecting value\)"),
        (lambda: list(text_batches(["a b"], tokenizer, seq_len=1)), ConfigError,
         r"seq_len: 1 < 2"),
        (lambda: list(text_batches(["a b"], tokenizer, seq_len=4, stride=5)), ConfigError,
         r"stride: 5 is not in \[1, seq_len = 4\]"),
        (lambda: list(text_batches(file_documents(tmp_path / "one.txt"), tokenizer)),
         DataError, r"text: 1 token\(s\); a sample needs at least 2"),
        (lambda: text_documents("csv:x"), ConfigError, r"'csv:x' is not text:FILE"),
        (lambda: load_tokenizer(tmp_path / "nomodel"), DataError, r"nomodel: no such model"),
        (lambda: text_documents(f"datasets:{tmp_path / 'x.xlsx'}"), DataError,
         r"x.xlsx: no such datasets folder"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_text_to_token_level_measurement(tokenizer, tmp_path) -> None:
    """text:FILE -> batches -> a causal LM's token samples -> the frequent tokens measured:
    two streamed passes (measure_chunks) equal one measurement of all samples at once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nctools.metrics.vocab import frequent_classes
    from nctools.models.tokens import lm_head, lm_token_samples

    (tmp_path / "c.txt").write_text(corpus(80))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16,
                                       n_layer=1, n_head=2)).double().eval()
    weight, _ = lm_head(model)

    def samples():
        docs = text_documents(f"text:{tmp_path / 'c.txt'}")
        return lm_token_samples(model, text_batches(docs, tokenizer, seq_len=32, stride=24,
                                                    batch_size=4))

    features, labels = (torch.cat(parts) for parts in zip(*samples(), strict=True))
    assert labels.tolist() == whole_text_ids(tokenizer, corpus(80))[1:]
    kept = frequent_classes(torch.bincount(labels, minlength=len(tokenizer)), min_count=5)
    assert 10 < len(kept) < len(tokenizer)
    options = {"classes": kept.tolist(), "global_mean": "classes"}
    want = nctools.measure(features, labels, weight, **options)
    got, _ = nctools.measure_chunks(samples, weight, **options)
    assert got.keys() == want.keys()
    assert all(np.isclose(got[k], want[k], rtol=1e-9, equal_nan=True) for k in want)
