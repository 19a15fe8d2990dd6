"""The callbacks' features spilled to disk for the second pass: bit for bit the tensors of
the first pass, the metrics of two eval-mode forward passes exactly, one forward pass per
split, one chunk read back at a time, and no folder left behind, even after an error."""

import math
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import Trainer, TrainingArguments

from nctools.integrations import hf, lightning
from nctools.integrations.core import SplitKeys, measure_splits
from nctools.integrations.spill import SpilledChunks, spilled
from tests.helpers import Tokens, tiny_bert

NUM_CLASSES, DIM = 3, 8


KEYS = SplitKeys({"train": "nc/train/", "val": "nc/val/"})

def chunk_list(dtype, sizes=(5, 0, 7, 4), dim=6, seed=0):
    """(features (n, dim) of ``dtype``, some not contiguous, labels (n,) int64) chunks."""
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for i, n in enumerate(sizes):
        feats = torch.randn(n, dim, generator=gen).to(dtype)
        if i % 2:  # a transposed copy: the same values in another memory layout
            feats = feats.T.contiguous().T
        chunks.append((feats, torch.randint(0, NUM_CLASSES, (n,), generator=gen)))
    return chunks


class Counted:
    """A chunks callable that counts its calls."""

    def __init__(self, chunks):
        self.chunks, self.calls = chunks, 0

    def __call__(self):
        self.calls += 1
        return iter(self.chunks)


def bits(t):
    """A tensor's bytes, to compare bit for bit."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a, b):
    """Two metric dicts with equal keys and bit-for-bit equal values (NaN equals NaN)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_second_pass_reads_back_the_first_bit_for_bit(tmp_path, dtype):
    chunks = chunk_list(dtype)
    source = Counted(chunks)
    with spilled(source, tmp_path) as spill:
        first = list(spill())
        (folder,) = tmp_path.iterdir()
        rows, dim = sum(f.shape[0] for f, _ in chunks), chunks[0][0].shape[1]
        itemsize = torch.finfo(dtype).bits // 8
        # the disk holds the features in their own dtype, N x D x itemsize bytes, + labels
        assert sum(p.stat().st_size for p in folder.glob("*.features")) == rows * dim * itemsize
        assert sum(p.stat().st_size for p in folder.glob("*.labels")) == rows * 8
        for _ in range(2):
            again = list(spill())
            assert len(again) == len(chunks)
            for (x, y), (x2, y2) in zip(chunks, again, strict=True):
                assert x2.dtype == dtype and x2.shape == x.shape and y2.dtype == torch.int64
                assert torch.equal(bits(x2), bits(x)) and torch.equal(y2, y)
        assert all(a is x for (a, _), (x, _) in zip(first, chunks, strict=True))
    assert source.calls == 1  # the source (the model) ran once for three passes
    assert list(tmp_path.iterdir()) == []


def test_written_as_they_stream_and_read_back_one_at_a_time(tmp_path, monkeypatch):
    reads, fromfile = [], np.fromfile

    def counted(path, **kwargs):  # every file read
        reads.append(path)
        return fromfile(path, **kwargs)

    monkeypatch.setattr(np, "fromfile", counted)
    chunks = chunk_list(torch.float32, sizes=(3, 4, 5, 6))
    with spilled(Counted(chunks), tmp_path) as spill:
        (folder,) = tmp_path.iterdir()
        stream = spill()
        for k in range(1, len(chunks) + 1):
            next(stream)  # chunk k is on disk when it is handed on, the next is not yet
            assert len(list(folder.glob("*.features"))) == k
        assert next(stream, None) is None and reads == []
        replay = spill()
        for k in range(1, len(chunks) + 1):
            next(replay)  # one chunk's features and labels read per chunk handed on
            assert len(reads) == 2 * k
    assert not folder.exists()


def test_an_unfinished_first_pass_is_run_again(tmp_path):
    chunks = chunk_list(torch.float32)
    source = Counted(chunks)
    spill = SpilledChunks(source, tmp_path)
    next(spill())  # abandoned after one chunk
    assert [x.shape for x, _ in spill()] == [x.shape for x, _ in chunks]
    assert source.calls == 2 and len(list(tmp_path.glob("*.features"))) == len(chunks)
    assert [x.shape for x, _ in spill()] == [x.shape for x, _ in chunks] and source.calls == 2
    spill.clear()
    assert list(tmp_path.iterdir()) == []


def test_folder_removed_after_an_error_or_interrupt_mid_way(tmp_path):
    chunks = chunk_list(torch.float32, sizes=(6, 6, 6))
    layer = nn.Linear(6, NUM_CLASSES)

    def failing():  # the data loader fails in the middle of the (only) model pass
        yield chunks[0]
        assert len(list(tmp_path.glob("nctools-spill-*/*.features"))) == 1
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        measure_splits({"train": failing}, layer, "cpu", KEYS, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt), spilled(Counted(chunks), tmp_path) as spill:
        list(spill())
        replay = spill()
        next(replay)  # interrupted while the second pass reads the chunks back
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_measure_splits_reuse_equals_two_passes_and_calls_the_source_once(tmp_path):
    train, val = chunk_list(torch.float32, (9, 7, 8)), chunk_list(torch.float32, (5, 6), seed=1)
    layer = nn.Linear(6, NUM_CLASSES)
    sources = {"train": Counted(train), "val": Counted(val)}
    reused = measure_splits(sources, layer, "cpu", KEYS, spill_dir=tmp_path)
    assert [s.calls for s in sources.values()] == [1, 1]
    twice = measure_splits(sources, layer, "cpu", KEYS, reuse_features=False)
    assert [s.calls for s in sources.values()] == [3, 3]
    same(reused, twice)
    assert {k.split("/")[1] for k in reused} == {"train", "val"}
    assert list(tmp_path.iterdir()) == []


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, DIM), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(DIM, NUM_CLASSES)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.head(self.body(x))


def test_lightning_callback_reuse_is_bit_identical_with_one_forward_pass(tmp_path):
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(50) % NUM_CLASSES
    x = torch.randn(NUM_CLASSES, 5, generator=gen)[y] * 2 + torch.randn(50, 5, generator=gen)
    loaders = types.SimpleNamespace(train_dataloader=DataLoader(TensorDataset(x, y), 16),
                                    val_dataloaders=DataLoader(TensorDataset(x[:20], y[:20]), 7))
    model = Tiny().train()
    model.device = torch.device("cpu")  # what a LightningModule has; the callback uses it
    batches = 4 + 3
    reused = lightning.NeuralCollapseCallback(spill_dir=tmp_path).measure(loaders, model)
    assert model.forwards == batches and model.training  # one pass per split; mode restored
    twice = lightning.NeuralCollapseCallback(reuse_features=False).measure(loaders, model)
    assert model.forwards == batches + 2 * batches
    same(reused, twice)
    assert "nc/val/ncc_mismatch" in reused and list(tmp_path.iterdir()) == []


def test_hf_callback_reuse_is_bit_identical_with_one_forward_pass(tmp_path):
    torch.manual_seed(0)
    model = tiny_bert(NUM_CLASSES)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=8,
                             use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(8, 2),
                      eval_dataset=Tokens(30, 2))
    calls = []
    model.bert.register_forward_hook(lambda *_: calls.append(1))
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    # the eval loader is sequential, so two passes see the same batches in the same order
    loaders = {"eval": trainer.get_eval_dataloader()}
    reused = hf.NeuralCollapseCallback(splits=("eval",), spill_dir=spill_dir).measure(model,
                                                                                      loaders)
    assert len(calls) == 4 and list(spill_dir.iterdir()) == []  # 30 rows / 8: 4 batches
    twice = hf.NeuralCollapseCallback(splits=("eval",), reuse_features=False).measure(model,
                                                                                      loaders)
    assert len(calls) == 4 + 8
    same(reused, twice)


def test_bad_spill_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="spill_dir must be an existing directory"):
        lightning.NeuralCollapseCallback(spill_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="spill_dir is where reuse_features=True"):
        lightning.NeuralCollapseCallback(reuse_features=False, spill_dir=tmp_path)
    with pytest.raises(ValueError, match="reuse_features must be True or False"):
        lightning.NeuralCollapseCallback(reuse_features="yes")
    with pytest.raises(ValueError, match="spill_dir must be an existing directory"), spilled(
            Counted([]), tmp_path / "missing"):
        pass
