"""The nctools command: measure against a hand-made reference, the run workflow, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nctools.analysis.tables
import nctools.cli.analyze
import nctools.data.sets
from nctools import cli
from nctools.cli import main
from nctools.config.schema import load_config
from nctools.metrics.measure import METRIC_KEYS, class_means, measure
from nctools.runs import snapshots

TINY_YAML = """\
name: tiny
data: {dataset: synthetic, num_classes: 4, train_per_class: 16, test_per_class: 8,
       image_size: 8}
model: {arch: convnet, width: 8}
train: {epochs: 3, batch_size: 32, device: cpu}
snapshot: {epochs: all}
"""


# ----------------------------------------------------------------------------- measure


@pytest.fixture
def small_synthetic(monkeypatch):
    """`--dataset synthetic` at 8 x 8 pixels, 8 + 4 samples per class: a ResNet pass in ms."""
    real = nctools.data.sets.load_dataset

    def small(cfg, seed):
        cfg = dataclasses.replace(cfg, train_per_class=8, test_per_class=4, image_size=8)
        return real(cfg, seed)

    monkeypatch.setattr(nctools.data.sets, "load_dataset", small)
    return lambda: small(nctools.data.sets.DataConfig(dataset="synthetic"), seed=0)


@pytest.fixture
def torchvision_resnet(tmp_path):
    """A randomly initialised torchvision resnet18 with a 1-channel small-image stem."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    for module in net.modules():  # non-trivial eval-mode batch norm
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "resnet18.pt"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def hooked(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = net.fc.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    with torch.no_grad():
        net(images)
    handle.remove()
    return captured[0]


def run_json(capsys, *argv: str) -> dict[str, float]:
    assert main(["measure", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same(got: dict, expected: dict) -> None:
    assert list(got)[: len(METRIC_KEYS)] == list(METRIC_KEYS)  # then the newer keys
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key


def test_measure_torchvision_state_dict(capsys, small_synthetic, torchvision_resnet):
    net, path = torchvision_resnet
    data = small_synthetic()
    args = ["--arch", "resnet18", "--checkpoint", str(path), "--dataset", "synthetic"]
    train_h = hooked(net, data.train.images)
    got = run_json(capsys, *args)
    assert_same(got, measure(train_h, data.train.labels, net.fc.weight.detach(),
                             net.fc.bias.detach()))
    # Test split: NC4 and ncc_accuracy against the training class means (METRICS.md).
    test_h = hooked(net, data.test.images)
    means = class_means(train_h, data.train.labels, 10)
    got = run_json(capsys, *args, "--split", "test", "--layer", "classifier")
    assert_same(got, measure(test_h, data.test.labels, net.fc.weight.detach(),
                             net.fc.bias.detach(), class_means=means))


def test_measure_nctools_checkpoint_and_text_table(capsys, small_synthetic, torchvision_resnet,
                                                   tmp_path):
    net, path = torchvision_resnet
    data = small_synthetic()
    expected = measure(hooked(net, data.train.images), data.train.labels,
                       net.fc.weight.detach(), net.fc.bias.detach())
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model": torch.load(path, weights_only=True)}, ckpt)
    # Batches of 32 (3 of them, the last partial) give the same features as one batch.
    args = ["--arch", "resnet18", "--dataset", "synthetic", "--batch-size", "32",
            "--checkpoint", str(ckpt)]
    assert_same(run_json(capsys, *args), expected)
    assert main(["measure", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines][: len(METRIC_KEYS)] == list(METRIC_KEYS)
    for line in lines:
        key, value = line.split()
        assert float(value) == pytest.approx(expected[key], rel=1e-5, abs=1e-12)


def test_measure_layer_must_be_linear(capsys, small_synthetic, torchvision_resnet):
    _, path = torchvision_resnet
    argv = ["measure", "--arch", "resnet18", "--checkpoint", str(path), "--dataset", "synthetic"]
    assert main([*argv, "--layer", "layer4"]) == 2
    assert capsys.readouterr().err == (
        "nctools: error: --layer 'layer4' is a Sequential, not an nn.Linear\n"
    )
    assert main([*argv, "--layer", "head"]) == 2
    assert "--layer 'head': no such module; nn.Linear layers: ['classifier']" in \
        capsys.readouterr().err


def test_measure_refuses_code_in_checkpoint(capsys, small_synthetic, tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"weight": torch.zeros(1)}, "hook": Path("x")}, evil)
    argv = ["measure", "--arch", "convnet", "--checkpoint", str(evil), "--dataset", "synthetic"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nctools: error: {evil}: checkpoint cannot be loaded safely")
    assert err.count("\n") == 1


# ----------------------------------------------------------------------------- workflow


def test_train_analyze_plot_workflow(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    assert main(["train", "tiny.yaml"]) == 0  # default --out: runs/<config name>
    run = Path("runs/tiny")
    out = capsys.readouterr().out.splitlines()  # not a terminal: a line per epoch
    assert out[-1] == f"run saved in {run}" and [line.split()[1] for line in out[:-1]] == [
        "1/3", "2/3", "3/3"]
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [
        "epoch-0001", "epoch-0002", "epoch-0003"]

    history = (run / "history.csv").read_text()
    assert main(["train", "--resume", "--out", str(run)]) == 0  # complete: nothing to redo
    assert (run / "history.csv").read_text() == history
    capsys.readouterr()

    # plot without a table analyses first, then draws to RUN/figures/collapse.png
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'figures' / 'collapse.png'}\n"
    assert (run / "figures" / "collapse.png").read_bytes().startswith(b"\x89PNG")
    table = nctools.analysis.tables.read_table(run / "metrics.csv")
    assert sorted(table["epoch"].unique()) == [1, 2, 3]

    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {run / 'metrics.csv'} ({len(table)} rows)"  # 3 epochs x 2 x keys
    assert len(table) == 3 * 2 * table["metric"].nunique()
    assert out[1] == "epoch 3:"
    assert out[2].split() == ["train", "test"]
    last = table[(table["epoch"] == 3) & (table["metric"] == "nc1")].set_index("split")
    nc1_row = next(line.split() for line in out if line.startswith("nc1 "))
    assert float(nc1_row[1]) == pytest.approx(last.loc["train", "value"], rel=1e-3)
    assert float(nc1_row[2]) == pytest.approx(last.loc["test", "value"], rel=1e-3)

    # A snapshot failing its checksum: skipped with a one-line warning, or an error (--strict).
    clf = run / "snapshots" / "epoch-0002" / "classifier.safetensors"
    clf.write_bytes(clf.read_bytes()[:-4] + b"\0\0\0\0")
    (run / "metrics.csv").unlink()
    assert main(["analyze", str(run)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"nctools: warning: skipping the snapshot of epoch 2: {clf}")
    (run / "metrics.csv").unlink()
    assert main(["analyze", "--strict", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"nctools: error: {clf}")
    assert not (run / "metrics.csv").exists()


def test_demo_config_is_packaged_and_valid():
    with files("nctools.configs").joinpath("demo.yaml").open() as f:
        assert "mnist5k" in f.read()
    cfg = load_config("demo")
    assert (cfg.name, cfg.data.dataset, cfg.model.arch) == ("demo", "mnist5k", "convnet")


def test_demo_runs_end_to_end(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from any folder: the config comes from the package
    overrides = ["data.dataset=synthetic", "data.num_classes=4", "data.train_per_class=16",
                 "data.samples_per_class=null", "data.test_samples_per_class=null",
                 "data.test_per_class=8", "data.image_size=8",
                 "model.width=8",
                 "train.epochs=2", "snapshot.epochs=all", "train.device=cpu"]
    argv = ["demo", "--out", "d"] + [a for o in overrides for a in ("--set", o)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"metrics table: {Path('d') / 'metrics.csv'}" in out
    assert f"figure:        {Path('d') / 'figures' / 'collapse.png'}" in out
    assert (tmp_path / "d" / "figures" / "collapse.png").stat().st_size > 0


@pytest.mark.slow
def test_demo_packaged_config_one_epoch(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "train.epochs=1",
                 "--set", "snapshot.epochs=all"]) == 0
    assert "mnist5k" in (tmp_path / "demo" / "metrics.csv").read_text()


def test_help_has_examples(capsys):
    for command in ("train", "analyze", "plot", "demo", "measure"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"example:\n  nctools {command}" in capsys.readouterr().out


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.analyze, "run", interrupted)
    assert main(["analyze", "anywhere"]) == 130
    assert capsys.readouterr().err == "nctools: interrupted\n"


# ----------------------------------------------------------------------------- errors


def _error_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty_run").mkdir()
    state = {"model": nn.Linear(3, 2).state_dict()}
    torch.save(state, tmp / "linear.pt")
    return {
        "missing run": (["analyze", str(tmp / "nowhere")],
                        f"no run directory at {tmp / 'nowhere'}"),
        "no snapshots": (["analyze", str(tmp / "empty_run")],
                         f"{tmp / 'empty_run'} has no snapshots to analyze; make some with "
                         f"`nctools train CONFIG --out {tmp / 'empty_run'} "
                         "--set snapshot.epochs=all`"),
        "unknown arch": (["measure", "--arch", "alexnet", "--checkpoint", "x.pt",
                          "--dataset", "synthetic"],
                         "--arch 'alexnet': unknown architecture; valid names: convnet, "),
        "checkpoint misfit": (["measure", "--arch", "convnet", "--checkpoint",
                               str(tmp / "linear.pt"), "--dataset", "synthetic"],
                              f"{tmp / 'linear.pt'} does not fit convnet with 10 classes and 1 "
                              "input channels: "),
        "missing config": (["train", str(tmp / "nope.yaml")],
                           f"{tmp / 'nope.yaml'}: config file not found"),
        "bad figure format": (["plot", str(tmp / "empty_run"), "--out", "f.gif"],
                              "cannot save a figure as f.gif: unknown extension '.gif'"),
    }


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Each error case run as `python -m nctools ...`, all started at once (imports are slow)."""
    tmp = tmp_path_factory.mktemp("errors")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = {
        name: (subprocess.Popen([sys.executable, "-m", "nctools", *argv], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
               expected)
        for name, (argv, expected) in _error_cases(tmp).items()
    }
    results = {}
    for name, (proc, expected) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                         expected)
    return results


@pytest.mark.parametrize("case", ["missing run", "no snapshots", "unknown arch",
                                  "checkpoint misfit", "missing config", "bad figure format"])
def test_errors_are_one_line_exit_2(error_runs, case):
    result, expected = error_runs[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"nctools: error: {expected}")


def test_measure_a_run_checkpoint_uses_the_run_model_settings(capsys, tmp_path):
    """A run's checkpoint.pt (a convnet of non-default width) is rebuilt from its config.yaml,
    and its data set with the run's subsets, seed and standardisation: the metrics equal
    those of the run's last snapshot, taken from the same weights."""
    from nctools.training.loop import train

    config = load_config("demo", [
        "data.dataset=synthetic", "data.samples_per_class=20", "seed=5",
        "data.test_samples_per_class=null", "model.width=4",
        "train.epochs=2", "snapshot.epochs=all", "train.device=cpu"])
    run = train(config, tmp_path / "run")
    got = run_json(capsys, "--arch", "convnet", "--checkpoint", str(run / "checkpoint.pt"),
                   "--dataset", "synthetic")
    weight, bias = snapshots.load_classifier(run, 2)
    features, labels = snapshots.load_split(run, 2, "train")
    expected = measure(features, labels, weight, bias)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key


def test_measure_set_gives_a_plain_checkpoint_the_run_settings(capsys, tmp_path):
    """Without the run's config.yaml beside it, the same checkpoint measures the same
    once --set gives the run's data subsets, seed and network width."""
    from nctools.training.loop import train

    sets = ["data.dataset=synthetic", "data.samples_per_class=20", "seed=5",
            "data.test_samples_per_class=null", "model.width=4"]
    config = load_config("demo",
                         [*sets, "train.epochs=1", "snapshot.epochs=all", "train.device=cpu"])
    run = train(config, tmp_path / "run")
    plain = tmp_path / "plain.pt"
    plain.write_bytes((run / "checkpoint.pt").read_bytes())
    argv = ["--arch", "convnet", "--checkpoint", str(plain), "--dataset", "synthetic"]
    got = run_json(capsys, *argv, *[f"--set={item}" for item in sets[1:]])
    weight, bias = snapshots.load_classifier(run, 1)
    features, labels = snapshots.load_split(run, 1, "train")
    expected = measure(features, labels, weight, bias)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
    # without them the network does not fit (width 32 by default): a one-line error
    assert main(["measure", *argv]) == 2
    assert "does not fit convnet" in capsys.readouterr().err
    for bad, message in [
        ("train.lr=0.1", "--set train.lr=0.1: measure takes data.*, model.* and seed only"),
        ("model.arch=vgg11", "--set model.arch=vgg11: give model.arch as --arch"),
        ("data.samples_per_clas=3", "did you mean 'data.samples_per_class'"),
        ("data.samples_per_class=0", "--set: data.samples_per_class: must be"),
    ]:
        assert main(["measure", *argv, "--set", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nctools: error: ") and message in err, err
        assert err.count("\n") == 1
