"""``nctools measure --model hf:PATH --dataset text:FILE`` end to end, on a tiny GPT-2 folder
saved here with a byte-level BPE trained on the test text (no download): the command's
numbers are `measure_language_model`'s on the same batches; under torchrun (2 gloo
processes) they equal one process's; ``--layers blocks --plot`` prints every layer's row
and draws them against depth; bad combinations are one-line errors."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from nctools.analysis.lm_measure import measure_language_model
from nctools.cli import main
from nctools.data.text import load_tokenizer, text_batches, text_documents
from tests.data.test_text import corpus
from tests.helpers import run_ranks


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A GPT-2 folder (random weights, float64) with its own tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("lm")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus().splitlines(keepends=True), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=24, n_layer=1,
                        n_head=2, bos_token_id=0, eos_token_id=0, torch_dtype="float64")
    GPT2LMHeadModel(config).double().save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    (root / "corpus.txt").write_text(corpus())
    return root


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["measure", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _args(folder: Path, *extra: str) -> list[str]:
    return ["--model", f"hf:{folder / 'gpt2'}", "--dataset", f"text:{folder / 'corpus.txt'}",
            "--seq-len", "16", "--batch-size", "4", *extra]


def _same(got: dict, want: dict, rel: float) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if value is None or math.isnan(value):
            assert got[key] is None or math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-13), key


def test_the_command_prints_measure_language_model_s_numbers(folder, capsys) -> None:
    code, out, _ = _cli(capsys, *_args(folder, "--json", "--min-count", "2", "--stride", "12",
                                       "--cdnv-power", "2", "--global-mean", "classes"))
    assert code == 0
    got = json.loads(out)
    model = GPT2LMHeadModel.from_pretrained(folder / "gpt2").eval()
    tokenizer = load_tokenizer(folder / "gpt2")
    with pytest.warns(RuntimeWarning, match=r"C > D \+ 1"):
        want = measure_language_model(
            model, lambda: text_batches(text_documents(f"text:{folder / 'corpus.txt'}"),
                                        tokenizer, 16, 12, 4),
            min_count=2, cdnv_power=2, global_mean="classes")
    _same(got, {k: (None if math.isnan(v) else v) for k, v in want.items()}, rel=1e-12)
    assert got["etf_means"] is None and 24 + 1 < got["classes_measured"] < 300
    code, out, _ = _cli(capsys, *_args(folder, "--csv", "--min-count", "2", "--stride", "12",
                                       "--cdnv-power", "2", "--global-mean", "classes"))
    header, row = out.strip().splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert values["layer"] == "lm_head"
    assert float(values["nc1"]) == want["nc1"]  # the CSV's exact repr


def test_pair_precision_float64_is_passed_on(folder, capsys) -> None:
    """``--pair-precision float64``: GNC2 and CDNV as measure_language_model's float64
    ones (the default float32 tiles differ from them by rounding only)."""
    code, out, _ = _cli(capsys, *_args(folder, "--json", "--pair-precision", "float64"))
    assert code == 0
    got = json.loads(out)
    code, out, _ = _cli(capsys, *_args(folder, "--json"))
    default = json.loads(out)
    model = GPT2LMHeadModel.from_pretrained(folder / "gpt2").eval()
    tokenizer = load_tokenizer(folder / "gpt2")
    with pytest.warns(RuntimeWarning, match=r"C > D \+ 1"):
        want = measure_language_model(
            model, lambda: text_batches(text_documents(f"text:{folder / 'corpus.txt'}"),
                                        tokenizer, 16, None, 4), pair_precision="float64")
    for key in ("cdnv", "gnc2_means", "gnc2_weights"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
        assert default[key] == pytest.approx(want[key], rel=1e-6), key
        assert default[key] != got[key], key


def _rank_measures(rank: int, folder: str, out: str) -> None:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["measure", *_args(Path(folder), "--json", "--device", "cpu")])
    assert code == 0
    if rank == 0:
        Path(out).write_text(buffer.getvalue())


def test_two_processes_equal_one(folder, capsys, tmp_path) -> None:
    code, out, _ = _cli(capsys, *_args(folder, "--json", "--device", "cpu"))
    assert code == 0
    run_ranks(_rank_measures, str(folder), str(tmp_path / "rank0.json"))
    _same(json.loads((tmp_path / "rank0.json").read_text()), json.loads(out), rel=1e-12)


@pytest.mark.parametrize(("extra", "message"), [
    (["--layers", "embeddings,block.9"], "layers: 'block.9' is not a layer of the model; its "
                                      "layers: embeddings, lm_head"),
    (["--plot", "depth.png"], "--plot needs --layers (e.g. --layers blocks)"),
    (["--layers", "blocks", "--plot", "depth.gif"], "cannot save a figure as depth.gif: "
                                                   "unknown extension '.gif'"),
    (["--layers", "lm_head", "--plot", "depth.png"], "--plot: draws metrics against depth "
                                                     "and --layers lm_head is one layer"),
    (["--ncc-samples", "0"], "--ncc-samples: must be an int >= 1, got 0"),
    (["--seq-len", "1"], "--seq-len: must be an int >= 2"),
    (["--stride", "17"], "--stride: must be in [1, --seq-len = 16], got 17"),
    (["--min-count", "100000"], "labels: only 0 class(es) have at least min_count = 100000"),
])
def test_bad_flags_are_one_line_errors(folder, capsys, extra, message) -> None:
    code, out, err = _cli(capsys, *_args(folder, *extra))
    assert code == 2 and out == ""
    assert err.startswith("nctools: error: ") and message in err and err.count("\n") == 1


def test_text_needs_a_language_model_and_a_language_model_needs_text(folder, capsys) -> None:
    code, _, err = _cli(capsys, "--model", "timm:resnet18", "--dataset",
                        f"text:{folder / 'corpus.txt'}")
    assert code == 2 and "text needs --model hf:PATH of a language model" in err
    code, _, err = _cli(capsys, "--model", f"hf:{folder / 'gpt2'}", "--dataset", "cifar10")
    assert code == 2 and "is a causal language model: --dataset must be text:FILE" in err


def test_layers_print_one_row_per_layer_and_plot_them(folder, capsys, tmp_path) -> None:
    out = tmp_path / "figs" / "depth.png"
    code, printed, err = _cli(capsys, *_args(folder, "--layers", "blocks", "--csv",
                                             "--min-count", "2", "--plot", str(out)))
    assert code == 0 and err.strip().endswith(f"wrote {out}")
    rows = list(csv.DictReader(io.StringIO(printed)))
    model = GPT2LMHeadModel.from_pretrained(folder / "gpt2").eval()
    tokenizer = load_tokenizer(folder / "gpt2")
    with pytest.warns(RuntimeWarning, match=r"C > D \+ 1"):
        want = measure_language_model(
            model, lambda: text_batches(text_documents(f"text:{folder / 'corpus.txt'}"),
                                        tokenizer, 16, None, 4),
            min_count=2, layers="all")
    # n_layer = 1: the embeddings, then GPT-2's last hidden state (after ln_f) = the head's input
    assert [r["layer"] for r in rows] == list(want) == ["embeddings", "lm_head"]
    assert list(rows[0])[:3] == ["model", "dataset", "layer"]
    for row, values in zip(rows, want.values(), strict=True):
        got = {k: float(v) for k, v in row.items() if k in values}
        _same(got, values, rel=1e-12)
        assert all(row[k] == "" for k in row if k not in values and k not in
                   ("model", "dataset", "layer"))  # the head's keys: lm_head only
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as image:
        image.verify()
        assert image.size[0] > 1000


def test_a_language_model_s_figure_replaces_the_undefined_etf_panel(folder, capsys) -> None:
    from nctools.analysis.layer_plots import layer_figure, measure_table

    code, printed, _ = _cli(capsys, *_args(folder, "--layers", "all", "--json"))
    assert code == 0
    layers = {name: {k: math.nan if v is None else v for k, v in values.items()}
              for name, values in json.loads(printed).items()}
    assert math.isnan(layers["lm_head"]["etf_means"])  # C > D + 1: no simplex ETF
    table = measure_table(layers, "text")
    assert set(table["epoch"]) == {0} and len(table) == sum(map(len, layers.values()))
    fig = layer_figure(table, title="tiny GPT-2")
    titles = [ax.get_title() for ax in fig.axes]
    assert not any("ETF" in t for t in titles)
    assert "GNC2: hyperspherical uniformity, class means" in titles
    legend = fig.axes[0].get_legend().get_texts()[0].get_text()
    assert legend.startswith("decay ratio")  # one measurement: no epoch
