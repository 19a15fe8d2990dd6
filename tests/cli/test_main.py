"""The `nctools` entry point: help with examples, Ctrl-C, one-line errors with status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nctools import cli
from nctools.cli import analyze as analyze_command
from nctools.cli import main


def test_help_has_examples(capsys):
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"example:\n  nctools {command}" in capsys.readouterr().out


def test_help_imports_no_torch():
    """`nctools --help` and every command's help answer without torch (seconds to import)."""
    code = ("import sys\n"
            "from nctools.cli import COMMANDS, main\n"
            "for argv in [['--help'], *([c, '--help'] for c in COMMANDS)]:\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, argv\n"
            "print(sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze_command, "run", interrupted)
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
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
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


# ----------------------------------------------------------------------- optional libraries

TINY = ["--set", "data.dataset=synthetic", "--set", "data.num_classes=4",
        "--set", "data.train_per_class=16", "--set", "data.test_per_class=8",
        "--set", "data.samples_per_class=null", "--set", "data.test_samples_per_class=null",
        "--set", "data.image_size=8", "--set", "model.width=8", "--set", "train.epochs=1",
        "--set", "snapshot.epochs=all", "--set", "train.device=cpu", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("extras") / "run"
    assert main(["train", "demo", "--out", str(run), *TINY]) == 0
    return run


@pytest.mark.parametrize("module, extra, argv", [
    ("timm", "timm", ["measure", "--model", "timm:resnet18", "--dataset", "synthetic"]),
    ("transformers", "hf", ["measure", "--model", "hf:.", "--dataset", "synthetic"]),
    ("submitit", "slurm", ["sweep", "demo", "--grid", "train.lr=0.1", "--out", "{tmp}/sweep",
                           "--executor", "slurm"]),
    ("tensorboard", "tensorboard", ["analyze", "{run}", "--export", "tensorboard", "--quiet"]),
    ("mlflow", "mlflow", ["train", "demo", "--out", "{tmp}/run", *TINY,
                          "--set", "train.loggers=[mlflow]"]),
    ("wandb", "wandb", ["train", "demo", "--out", "{tmp}/run", *TINY,
                        "--set", "train.loggers=[wandb]"]),
    ("pyarrow", "parquet", ["collect", "{run}", "--out", "{tmp}/table.parquet"]),
])  # fmt: skip
def test_a_missing_optional_library_is_one_line_naming_its_extra(
        capsys, monkeypatch, tmp_path, tiny_run, module, extra, argv):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails as if absent
    argv = [a.format(tmp=tmp_path, run=tiny_run) for a in argv]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f'nctools: {module} is not installed: pip install "nctools-collapse[{extra}]"']



def test_a_run_stopped_by_a_missing_logger_restarts_without_it(capsys, monkeypatch, tmp_path):
    """The command's end to end: a missing logger library stops `nctools train` before its
    first epoch (one line, exit 2); the same folder then takes the config without it."""
    from nctools.runs import store

    run = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert main(["train", "demo", "--out", str(run), *TINY,
                 "--set", "train.loggers=[mlflow]"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        'nctools: mlflow is not installed: pip install "nctools-collapse[mlflow]"')
    assert store.read_manifest(run)["epochs_done"] == 0
    assert store.read_manifest(run)["status"] == "failed"  # not left saying "running"
    monkeypatch.undo()
    assert main(["train", "demo", "--out", str(run), *TINY]) == 0
    manifest = store.read_manifest(run)
    assert (manifest["status"], manifest["epochs_done"]) == ("completed", 1)
