"""`nctools measure --model SPEC`: zoo and user networks, weights files, layers, outputs."""

from __future__ import annotations

import csv
import io
import json
import sys

import pytest
import torch
from safetensors.torch import save_file

from nctools.cli import main
from nctools.config.schema import DataConfig
from nctools.data.sets import load_dataset
from nctools.metrics.measure import CLASSIFIER_FREE_KEYS, METRIC_KEYS, measure
from tests.helpers import hooked, make_net, measure_json

DATA = ["--dataset", "synthetic", "--set", "data.image_size=8", "--set", "data.num_classes=3",
        "--set", "data.train_per_class=6"]
# a zoo network's own evaluation transform is the default; these tests measure the
# standardised tensors (1-channel networks, 8 px images)
OWN = [*DATA, "--set", "data.preprocess=nctools"]


def synthetic():
    return load_dataset(DataConfig(dataset="synthetic", image_size=8, num_classes=3,
                                   train_per_class=6), seed=0)


def test_user_factory_layers_match_own_hooks(capsys):
    data = synthetic()
    net = make_net(num_classes=3, in_channels=1)
    got = measure_json(capsys, "--model", "tests.helpers:make_net", *DATA,
                       "--layers", "block1,head", "--batch-size", "7")
    assert list(got) == ["block1", "head"]
    labels = data.train.labels
    block1 = measure(hooked(net, data.train.images, "block1"), labels, torch.randn(3, 8))
    head = measure(hooked(net, data.train.images, "head", True), labels,
                   net.head.weight.detach(), net.head.bias.detach())
    assert set(got["block1"]) == set(CLASSIFIER_FREE_KEYS)
    for key in CLASSIFIER_FREE_KEYS:
        assert got["block1"][key] == pytest.approx(block1[key], rel=1e-8, abs=1e-12), key
    for key in METRIC_KEYS:
        assert got["head"][key] == pytest.approx(head[key], rel=1e-8, abs=1e-12), key
    # the CSV: one row per layer, the same numbers
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--layers", "blocks",
                 "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["layer"] for r in rows] == ["block1", "block2", "head"]
    # each row says what was measured, so that rows of several commands make one table
    assert list(rows[0])[:4] == ["model", "dataset", "split", "layer"]
    assert {(r["model"], r["dataset"], r["split"]) for r in rows} == {
        ("tests.helpers:make_net", "synthetic", "train")}
    assert float(rows[2]["accuracy"]) == pytest.approx(head["accuracy"], abs=1e-15)
    assert rows[0]["accuracy"] == ""


@pytest.mark.parametrize("wrap", ["plain", "ddp", "lightning", "safetensors"])
def test_timm_weights_files(capsys, tmp_path, wrap):
    import timm

    torch.manual_seed(1)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    state = net.state_dict()
    path = tmp_path / "w.pt"
    if wrap == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif wrap == "lightning":
        torch.save({"epoch": 2, "state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    elif wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    data = synthetic()
    got = measure_json(capsys, "--model", "timm:resnet10t", "--weights", str(path), *OWN)
    expected = measure(hooked(net, data.train.images, "fc", True), data.train.labels,
                       net.fc.weight.detach(), net.fc.bias.detach())
    assert list(got) == ["fc"]
    for key in METRIC_KEYS:
        assert got["fc"][key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), key


def test_torchvision_spec_and_bad_inputs(capsys, tmp_path):
    # torchvision builds 3-channel networks; the synthetic images here have one channel
    assert main(["measure", "--model", "torchvision:resnet18", *OWN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nctools: error: measure --model torchvision:resnet18: the network "
                          "fails on synthetic's images of 1 channel(s), 8 px: ")
    assert main(["measure", "--model", "torchvision:nonet", *DATA]) == 2
    assert "torchvision has no model 'nonet'" in capsys.readouterr().err
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--layers", "nope"]) == 2
    assert "no module named 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"x.weight": torch.zeros(2)}, bad)
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--weights",
                 str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nctools: error: --weights {bad}: ") and "missing keys" in err
    assert main(["measure", "--arch", "convnet", *DATA, "--layers", "a"]) == 2
    assert "--layers goes with --model" in capsys.readouterr().err


def test_test_split_uses_training_means(capsys):
    data = synthetic()
    net = make_net(num_classes=3, in_channels=1)
    got = measure_json(capsys, "--model", "tests.helpers:make_net", *DATA,
                       "--layers", "block2,head", "--split", "test")
    train_h = hooked(net, data.train.images, "head", True)
    test_h = hooked(net, data.test.images, "head", True)
    means = torch.stack([train_h[data.train.labels == c].mean(0) for c in range(3)])
    expected = measure(test_h, data.test.labels, net.head.weight.detach(),
                       net.head.bias.detach(), class_means=means)
    for key in METRIC_KEYS:
        assert got["head"][key] == pytest.approx(expected[key], rel=1e-8, abs=1e-12), key
    # block2's pooled output is the head's input: the same NCC decisions with train means
    assert got["block2"]["ncc_accuracy"] == pytest.approx(expected["ncc_accuracy"], abs=1e-15)
    nearest = torch.cdist(test_h, means).argmin(1)
    assert expected["ncc_accuracy"] == pytest.approx(
        float((nearest == data.test.labels).double().mean()), abs=1e-15)


def test_a_factory_in_the_current_folder_needs_no_pythonpath(capsys, tmp_path, monkeypatch):
    """`nctools measure --model nets:make` from the folder of nets.py, as the console script
    runs it (the current folder not on sys.path): the network of tests.helpers, the same
    numbers as naming it there."""
    (tmp_path / "nets_here.py").write_text("from tests.helpers import make_net as make\n")
    expected = measure_json(capsys, "--model", "tests.helpers:make_net", *DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    got = measure_json(capsys, "--model", "nets_here:make", *DATA)
    assert got == expected and list(got) == ["head"]


# ------------------------------------------------------------------ Hugging Face folders
def hf_folders(capsys, tmp_path):
    """A tiny ViT (3 labels, 16 px) and BERT saved as save_pretrained does, a folder of
    three image classes, an empty folder; nothing downloaded."""
    import numpy as np
    from PIL import Image
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=8,
                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                       num_labels=3)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3)).save_pretrained(tmp_path / "bert")
    (tmp_path / "empty").mkdir()
    rng = np.random.default_rng(0)
    for name in "abc":
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((16, 16, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "imgs" / name / f"{i}.png")
    capsys.readouterr()  # transformers' progress bars while saving
    return tmp_path


def test_hf_vit_blocks_are_measured_on_the_cls_token(capsys, tmp_path):
    root = hf_folders(capsys, tmp_path)
    vit, imgs = f"hf:{root / 'vit'}", f"folder:{root / 'imgs'}"
    # no --num-classes: the config's num_labels (3) agrees with the three class folders
    got = measure_json(capsys, "--model", vit, "--dataset", imgs, "--layers", "blocks")
    assert list(got) == ["vit", "classifier"]
    # the head reads the CLS token of vit's last_hidden_state: the same rows, the same NC1
    assert got["vit"]["nc1"] == pytest.approx(got["classifier"]["nc1"], rel=1e-9)
    assert got == measure_json(capsys, "--model", vit, "--dataset", imgs,
                               "--layers", "vit,classifier")


@pytest.mark.parametrize(("argv", "message"), [
    (["--num-classes", "7"], "--num-classes 7: --model hf:{root}/vit's config has num_labels = 3"),
    (["--num-classes", "2"], "--num-classes 2: --model hf:{root}/vit's config has num_labels = 3"),
    (["--weights", "{root}/garbage.safetensors"], "--weights {root}/garbage.safetensors: cannot "
     "be read as safetensors (Error while deserializing header: header too large)"),
    (["--weights", "{root}/garbage.pt"], "--weights {root}/garbage.pt: cannot be read as weights "
     "(PytorchStreamReader failed reading zip archive: failed finding central directory)"),
])
def test_hf_refusals_are_one_line(capsys, tmp_path, argv, message):
    root = hf_folders(capsys, tmp_path)
    (root / "garbage.safetensors").write_bytes(b"\x00garbage" * 10)
    (root / "garbage.pt").write_bytes(b"PK\x03\x04garbage" * 10)
    argv = [a.format(root=root) for a in argv]
    assert main(["measure", "--model", f"hf:{root / 'vit'}", "--dataset",
                 f"folder:{root / 'imgs'}", *argv]) == 2
    err = capsys.readouterr().err  # (after transformers' own progress bars)
    assert err.splitlines()[-1] == f"nctools: error: {message.format(root=root)}"
    assert "weights_only" not in err and "Traceback" not in err


def test_pickled_objects_get_no_advice_to_run_their_code(tmp_path):
    from nctools.errors import CheckpointError
    from nctools.models.weights import read_state_dict

    path = tmp_path / "obj.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module: unpickling runs code
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    assert str(err.value) == (
        f"{path}: cannot be read as weights (it holds pickled objects beyond tensors; nctools "
        "reads weights without running code: save model.state_dict() with torch.save, or a "
        ".safetensors file)")


def test_hf_folders_that_are_not_image_classifiers_are_one_line(capsys, tmp_path):
    root = hf_folders(capsys, tmp_path)
    imgs = f"folder:{root / 'imgs'}"
    assert main(["measure", "--model", f"hf:{root / 'bert'}", "--dataset", imgs]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: --model 'hf:{root / 'bert'}': a bert model is not an image classifier "
        "(measure reads images); measure its features in Python with nctools.measure_model\n")
    assert main(["measure", "--model", f"hf:{root / 'empty'}", "--dataset", imgs]) == 2
    assert capsys.readouterr().err == (
        f"nctools: error: --model 'hf:{root / 'empty'}': {root / 'empty'} holds no Hugging Face "
        "model (a config.json with a model_type, as save_pretrained writes)\n")


FACTORIES = """
def boom(num_classes, in_channels):
    raise RuntimeError("out of coffee")

def needs(x, num_classes, extra, scale=1.0):
    return None
"""


def test_a_failing_factory_is_one_line_naming_it(capsys, tmp_path, monkeypatch):
    (tmp_path / "facs_here.py").write_text(FACTORIES)
    (tmp_path / "broken_here.py").write_text("import no_such_module_here\n")
    (tmp_path / "raising_here.py").write_text("raise ValueError('bad module')\n")
    monkeypatch.chdir(tmp_path)
    cases = {
        "facs_here:boom": "the factory raised RuntimeError: out of coffee",
        "facs_here:needs": "the factory needs x, extra; it is called with num_classes and "
                           "in_channels (the ones its signature names) only",
        "broken_here:f": "cannot import broken_here: ModuleNotFoundError: No module named "
                         "'no_such_module_here'",
        "raising_here:f": "cannot import raising_here: ValueError: bad module",
    }
    for spec, message in cases.items():
        assert main(["measure", "--model", spec, *DATA]) == 2
        assert capsys.readouterr().err == f"nctools: error: --model {spec!r}: {message}\n"


def test_layers_plot_draws_the_measured_rows_against_depth(capsys, tmp_path):
    from nctools.analysis.layer_plots import layer_figure, measure_table

    out = tmp_path / "depth.svg"
    assert main(["measure", "--model", "tests.helpers:make_net", *DATA, "--layers", "blocks",
                 "--json", "--plot", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert list(got) == ["block1", "block2", "head"]
    assert out.read_text().lstrip().startswith("<?xml") and "</svg>" in out.read_text()
    # the figure drawn is that of the printed rows: its points are their values
    fig = layer_figure(measure_table(got, "train"), title="make_net")
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("NC1: Tr"))
    (line,) = [ln for ln in panel.get_lines() if ln.get_marker() == "o"]
    assert list(line.get_ydata()) == [got[name]["nc1_ratio"] for name in got]
    assert fig.get_suptitle() == "make_net (dotted: log-linear fit)"
