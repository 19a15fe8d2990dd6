"""The ``nctools`` command (also ``python -m nctools``).

Usage::

    nctools demo                                              # CPU minutes, embedded data
    nctools train configs/papyan2020/mnist-resnet18.yaml --set train.epochs=3
    nctools analyze runs/mnist-convnet && nctools plot runs/mnist-convnet
    nctools measure --arch resnet18 --checkpoint model.pt --dataset cifar10 --json

Every user error (an :class:`~nctools.errors.NctoolsError`) ends the command with one
line ``nctools: error: MESSAGE`` on stderr and exit status 2; Ctrl-C exits with 130.
Heavy imports (torch, pandas, matplotlib) happen inside the subcommands so that
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from nctools.errors import NctoolsError, RunError
from nctools.runs.layout import CONFIG_FILE, FIGURES_DIR, METRICS_FILE

# The rows of the short table `nctools analyze` prints (METRICS.md keys).
SUMMARY_METRICS = (
    "accuracy", "nc1", "equinorm_means", "equiangular_means", "maxangle_means",
    "self_duality", "ncc_mismatch", "etf_means",
)  # fmt: skip


class _UsageError(NctoolsError):
    """Arguments argparse refuses (missing, unknown, badly typed)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line like every other nctools error (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _epilog(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per job, each with an example in its help."""
    from nctools._version import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="nctools",
        description="Measure neural collapse (Papyan, Han & Donoho, PNAS 2020).",
        epilog=_epilog("nctools demo", "nctools train CONFIG && nctools analyze RUN"),
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"nctools {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a network past zero training error, saving snapshots",
        formatter_class=fmt,
        epilog=_epilog(
            "nctools train configs/papyan2020/mnist-resnet18.yaml --out runs/mnist "
            "--set train.epochs=30 --set snapshot.epochs=all",
            "nctools train --resume --out runs/mnist   # continue from runs/mnist/config.yaml",
        ),
    )
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="YAML config (optional with --resume: RUN/config.yaml is used)")
    p.add_argument("--out", metavar="RUN", help="run directory (default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN from its checkpoint")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: a bar on a terminal, else a line per epoch)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "analyze", help="compute the NC metrics of every snapshot -> RUN/metrics.csv",
        formatter_class=fmt,
        epilog=_epilog("nctools analyze runs/mnist runs/cifar10 --strict"),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--global-mean", choices=("samples", "classes"), default="samples",
                   help="mu_G: the mean of all samples (the paper's) or of the class means")
    p.add_argument("--classes", metavar="C,C,...",
                   help="measure only these classes, e.g. 5,6,7 (minority collapse)")
    p.add_argument("--strict", action="store_true",
                   help="stop at a snapshot that fails its checksum (default: skip it)")
    p.add_argument("--export", choices=["tensorboard"],
                   help="also write the history and metrics as event files under RUN/logs/export")
    p.add_argument("--quiet", action="store_true", help="no progress bar over the snapshots")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "plot", help="draw the collapse curves of one or several runs",
        formatter_class=fmt,
        epilog=_epilog("nctools plot runs/mnist runs/cifar10 --out collapse.pdf"),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories or sweep folders")
    p.add_argument("--metrics", metavar="KEY,KEY",
                   help="one panel per metric key, e.g. gnc2_means,unc3 (instead of --panels)")
    p.add_argument("--panels", choices=("paper", "generalised"), default="paper",
                   help="the paper's panels, or GNC2, UNC3 and separation fuzziness")
    p.add_argument("--out", metavar="FILE", help=(
        "figure file, .png/.pdf/.svg (default: RUN/figures/collapse.png for one run, "
        "./collapse.png for several)"))
    p.add_argument("--by", choices=("epoch", "layer"), default="epoch",
                   help="x axis: epochs (collapse curves) or layers (depth, one run trained "
                        "with snapshot.layers; default figure RUN/figures/layers.png)")
    p.add_argument("--epochs", metavar="E,E,...",
                   help="with --by layer: the epochs to draw (default: up to four)")
    p.add_argument("--hue", metavar="KEY", help=(
        "one colour per value of this config key (e.g. train.lr); several runs of a value "
        "(seeds) are drawn as their mean with a band"))
    p.set_defaults(func=cmd_plot)
    _add_sweep_parsers(sub, fmt)

    p = sub.add_parser(
        "demo", help="train, analyze and plot the packaged demo (embedded data, CPU minutes)",
        formatter_class=fmt,
        epilog=_epilog("nctools demo --out runs/demo"),
    )
    p.add_argument("--out", metavar="DIR", default="runs/demo",
                   help="run directory (default: runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo config, e.g. train.epochs=5")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "measure", help="NC metrics of a saved classifier on a data set split",
        formatter_class=fmt,
        epilog=_epilog(
            "nctools measure --arch resnet18 --checkpoint runs/c10/checkpoint.pt "
            "--dataset cifar10 --split test --json",
            "nctools measure --arch convnet --checkpoint model.pt --dataset mnist5k "
            "--set model.width=16 --set data.samples_per_class=50",
            "nctools measure --model timm:resnet18 --weights ft.safetensors "
            "--dataset folder:~/imgs --num-classes 10 --layers blocks --csv",
            "nctools measure --model timm:resnet18 --weights ft.safetensors --dataset cifar10 "
            "--split test --ood-dataset svhn",
        ),
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--arch", help="an nctools network architecture, e.g. resnet18")
    which.add_argument("--model", metavar="SPEC",
                       help="timm:NAME, torchvision:NAME, hf:PATH or package.module:factory")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="with --arch: nctools checkpoint.pt or a plain state_dict")
    p.add_argument("--weights", metavar="FILE",
                   help="with --model: state_dict .pt, .safetensors or Lightning checkpoint")
    p.add_argument("--layers", metavar="A,B,C",
                   help="with --model: module names, or 'blocks' (every top-level block); "
                        "default: the input of the last nn.Linear")  # fmt: skip
    p.add_argument("--csv", action="store_true", help="with --model: print one CSV row per layer")
    p.add_argument("--dataset", required=True,
                   help="data set name, e.g. cifar10, or folder:PATH (an ImageFolder)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--ood-dataset", metavar="NAME",
                   help="adds nc5: the test split of this data set (a name or folder:PATH), "
                        "prepared as --dataset is, as out-of-distribution data")  # fmt: skip
    p.add_argument("--layer", metavar="NAME",
                   help="the nn.Linear whose input are the features (default: the last one)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--num-classes", type=int, metavar="C",
                   help="classes of the network (default: the data set's)")
    p.add_argument("--data-root", metavar="DIR", help="where torchvision data sets live")
    p.add_argument("--batch-size", type=int, default=256, metavar="B")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a data.*, model.* or seed setting (repeatable), e.g. "
                        "data.samples_per_class=50 or model.width=16; with --model, "
                        "data.preprocess=model|nctools: the network's own evaluation "
                        "transform (default for timm/torchvision/hf) or nctools' "
                        "standardisation")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar over the batches")
    p.set_defaults(func=cmd_measure)
    return parser


# ---------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from nctools.config.schema import load_config
    from nctools.runs.resume import check_resume_changes
    from nctools.training.distributed import dist_from_env
    from nctools.training.loop import train

    say = print if dist_from_env().is_main else _silent  # under torchrun rank 0 alone speaks

    _check_out(args.out)
    if not args.resume:
        if args.config is None:
            raise NctoolsError("train: give a CONFIG file (or --resume --out RUN)")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        progress = "none" if args.quiet else "auto"  # a line per epoch without a terminal
        say(f"run saved in {train(cfg, out, progress=progress)}")
        return 0
    # --resume: `nctools train --resume --out RUN` or `nctools train RUN --resume`.
    config = Path(args.config) if args.config else None
    run: Path | None = (Path(args.out) if args.out
                        else config if config and config.is_dir() else None)
    if run is None:
        raise NctoolsError("train --resume: give the run directory with --out RUN")
    if not (run / CONFIG_FILE).is_file():
        raise RunError(f"train --resume: no run to resume at {run} (no config.yaml there)")
    if config is None or config.is_dir():
        config = run / CONFIG_FILE
    cfg = load_config(config, args.overrides)
    # Without changes the run's own config.yaml is authoritative; with a CONFIG or --set,
    # they must describe the same run (run_state's rule: train.device may differ, and
    # train.epochs may grow, extending the run).
    if config != run / CONFIG_FILE or args.overrides:
        check_resume_changes(run, cfg)
    progress = "none" if args.quiet else "auto"
    say(f"run saved in {train(cfg, run, resume=True, progress=progress)}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from nctools.analysis.tables import analyze, run_is_writable

    for run in args.runs:
        try:
            table = analyze(run, strict=args.strict, global_mean=args.global_mean,
                            classes=_class_list(args.classes), quiet=args.quiet)
        except ValueError as exc:  # e.g. --classes naming a class the run does not have
            raise NctoolsError(f"analyze {run}: {exc}") from None
        if Path(run).is_dir() and run_is_writable(Path(run)):
            print(f"wrote {Path(run) / METRICS_FILE} ({len(table)} rows)")
        else:
            print(f"{run} is read-only: {len(table)} rows measured in memory, not saved")
        if args.export == "tensorboard":
            from nctools.training.loggers import export_tensorboard

            print(f"wrote TensorBoard events to {export_tensorboard(run, table)}")
        print(summary(table))
    return 0


def _class_list(text: str | None) -> list[int] | None:
    """``--classes 5,6,7`` as [5, 6, 7]; a one-line error for anything else."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise NctoolsError(f"--classes {text!r}: expected class ids like 5,6,7") from None


def summary(table) -> str:
    """The main metrics of the last analysed epoch as a small text table (metric x split)."""
    if table.empty:
        return "(no epochs analysed)"
    last = table[table["epoch"] == table["epoch"].max()]
    last = last[last["metric"].isin(SUMMARY_METRICS)]
    wide = last.pivot_table(index="metric", columns="split", values="value", aggfunc="first")
    wide = wide.reindex([m for m in SUMMARY_METRICS if m in wide.index])
    wide = wide[sorted(wide.columns, key=lambda s: (s != "train", s != "test", s))]
    wide.columns.name = wide.index.name = None
    return f"epoch {int(table['epoch'].max())}:\n" + wide.to_string(float_format="{:.4g}".format)


def cmd_plot(args: argparse.Namespace) -> int:
    from nctools.analysis.plots import figure_format, plot_runs, select_panels
    from nctools.analysis.tables import current_table, run_is_writable
    from nctools.runs.sweeps import is_sweep

    _check_out(args.out, "FILE")
    runs = [Path(r) for r in args.runs]
    if args.by == "layer":
        return _plot_by_layer(args, runs)
    if args.epochs:
        raise NctoolsError("--epochs goes with --by layer")
    if args.out:
        out = Path(args.out)
    else:
        single = len(runs) == 1 and not is_sweep(runs[0])
        out = runs[0] / FIGURES_DIR / "collapse.png" if single else Path("collapse.png")
        if single and runs[0].is_dir() and not run_is_writable(runs[0]):
            raise RunError(f"{runs[0]} is read-only: give the figure a place elsewhere with "
                           "--out FILE")
    figure_format(out)  # a bad extension fails before any analysis runs
    if args.hue or any(is_sweep(r) for r in runs):
        from nctools.analysis.collect import collect

        print(f"wrote {plot_runs(collect(runs), out, hue=args.hue)}")
        return 0
    # Every table is brought up to date first (incremental: only new snapshots are
    # measured), so a run that went on training is drawn whole.
    tables = [current_table(run) for run in runs]
    names = [run.resolve().name for run in runs]
    for i, run in enumerate(runs):  # runs/a/exp and runs/b/exp: told apart by their paths
        if names.count(names[i]) > 1 and "run" in tables[i]:
            tables[i] = tables[i].assign(run=str(run))
    chosen = None
    if args.metrics or args.panels != "paper":
        keys = [k for k in args.metrics.split(",") if k] if args.metrics else None
        chosen = select_panels(keys, args.panels)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        written = plot_runs(tables, out, panels=chosen)
    for note in notes:
        print(f"nctools: note: {note.message}", file=sys.stderr)
    print(f"wrote {written}")
    return 0


def _plot_by_layer(args: argparse.Namespace, runs: list[Path]) -> int:
    from nctools.analysis.layer_plots import plot_layers
    from nctools.analysis.plots import figure_format
    from nctools.analysis.tables import analyze, read_table

    if len(runs) != 1:
        raise NctoolsError("plot --by layer: give one run")
    out = Path(args.out) if args.out else runs[0] / FIGURES_DIR / "layers.png"
    figure_format(out)
    epochs = None
    if args.epochs:
        try:
            epochs = [int(e) for e in args.epochs.split(",") if e.strip()]
        except ValueError:
            raise NctoolsError(f"--epochs {args.epochs!r}: give epochs as 1,10,30") from None
    csv = runs[0] / METRICS_FILE
    table = read_table(csv) if csv.is_file() else analyze(runs[0])
    print(f"wrote {plot_layers(table, out, epochs)}")
    return 0


def _add_sweep_parsers(sub, fmt) -> None:
    """``nctools sweep`` and ``nctools collect`` (:mod:`nctools.training.sweep`,
    :mod:`nctools.analysis.sweep`)."""
    p = sub.add_parser(
        "sweep", help="train a config over a grid of settings and seeds (Slurm or here)",
        formatter_class=fmt,
        epilog=_epilog(
            "nctools sweep papyan2020/mnist-resnet18 --grid train.lr=logspace:1e-4:0.25:25 "
            "--seeds 3 --out sweeps/mnist --executor slurm --partition gpu --gpus-per-node 1",
            "nctools sweep demo --grid train.lr=0.01,0.02 --set train.epochs=5 "
            "--out sweeps/demo --executor local",
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config (or a shipped config's name)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=SPEC", required=True,
                   help="a swept key: logspace:A:B:N, linspace:A:B:N or V1,V2,... (repeatable)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="K seeds per point: seed, seed + 1, ... (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every point (repeatable)")
    p.add_argument("--out", required=True, metavar="SWEEP", help="sweep folder")
    p.add_argument("--executor", choices=("local", "slurm", "debug"), default="local",
                   help="slurm: one job array; local: jobs on this machine (default)")
    p.add_argument("--parallel", type=int, default=1, metavar="K",
                   help="local: runs at once (default 1); slurm: array tasks at once")
    p.add_argument("--partition", help="slurm partition")
    p.add_argument("--timeout-min", type=int, metavar="MIN",
                   help="time limit of a job; a job that reaches it is requeued and resumes")
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="slurm: GPUs per job")
    p.add_argument("--cpus-per-task", type=int, metavar="N", help="slurm: CPUs per job")
    p.add_argument("--mem-gb", type=int, metavar="GB", help="slurm: memory per job")
    p.add_argument("--slurm", dest="slurm_extra", action="append", default=[],
                   metavar="KEY=VALUE", help="any other sbatch option, e.g. account=abc")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "collect", help="join the metrics of every run of sweeps with their configs",
        formatter_class=fmt,
        epilog=_epilog("nctools collect sweeps/mnist sweeps/cifar10 --out table.parquet "
                       "--best test_acc"),
    )
    p.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep folders (or runs)")
    p.add_argument("--out", metavar="FILE", help="write the table (.parquet or .csv)")
    p.add_argument("--best", metavar="COLUMN", help=(
        "print, per cell, the --over value with the best final COLUMN (seed mean), e.g. "
        "test_acc as the paper"))
    p.add_argument("--over", default="train.lr", metavar="KEY",
                   help="the key --best chooses (default train.lr)")
    p.set_defaults(func=cmd_collect)


def cmd_sweep(args: argparse.Namespace) -> int:
    from nctools.training.launch import parse_grid, plan_sweep, submit

    sweep = plan_sweep(args.config, parse_grid(args.grid), args.out, args.seeds,
                       args.overrides)
    slurm = {k: v for k, v in (("partition", args.partition), ("timeout_min", args.timeout_min),
                               ("gpus_per_node", args.gpus_per_node),
                               ("cpus_per_task", args.cpus_per_task), ("mem_gb", args.mem_gb))
             if v is not None}
    if args.executor == "slurm":
        slurm["array_parallelism"] = args.parallel
        extra = dict(item.partition("=")[::2] for item in args.slurm_extra)
        if extra:
            slurm["additional_parameters"] = extra
    jobs = submit(sweep, args.executor, slurm, parallel=args.parallel)
    done = len(sweep.points) - len(jobs)
    if args.executor == "slurm" and jobs:
        print(f"submitted {len(jobs)} runs as Slurm job array {jobs[0].job_id.split('_')[0]} "
              f"({done} already complete); logs in {sweep.root / 'submitit'}")
    else:
        print(f"{len(sweep.points)} runs complete in {sweep.root / 'runs'}")
    print(f"gather them with: nctools collect {sweep.root} --out table.parquet --best test_acc")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from nctools.analysis.collect import best, collect, write_table

    table = collect(args.sweeps)
    if args.out:
        print(f"wrote {write_table(table, args.out)} ({len(table)} rows, "
              f"{table['run'].nunique()} runs)")
    if args.best:
        print(best(table, args.best, args.over).to_string(index=False))
    elif not args.out:
        print(f"{table['run'].nunique()} runs, {len(table)} rows; give --out FILE to save them")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nctools.analysis.plots import plot_runs
    from nctools.analysis.tables import analyze
    from nctools.config.schema import load_config
    from nctools.training.loop import train

    _check_out(args.out, "DIR")
    cfg = load_config("demo", args.overrides)
    # train() continues a run of the same config, so a second `nctools demo` picks up
    # where an interrupted one stopped (and a finished one is not trained again).
    run = train(cfg, Path(args.out))
    table = analyze(run)
    figure = plot_runs(table, run / FIGURES_DIR / "collapse.png")
    print(summary(table))
    print(f"metrics table: {run / METRICS_FILE}")
    print(f"figure:        {figure}")
    return 0


def _check_out(out: str | None, meta: str = "RUN") -> None:
    """An empty ``--out`` is a mistake (an unset shell variable), not the default."""
    if out is not None and not out.strip():
        raise NctoolsError(f"--out: empty path; give a {meta}, or leave --out out for the "
                           "default")


def _silent(*args, **kwargs) -> None:
    """``print`` for ranks other than 0 of a torchrun launch."""


def cmd_measure(args: argparse.Namespace) -> int:
    from nctools.analysis.saved_model import measure_checkpoint
    from nctools.training.distributed import dist_from_env

    if args.model is not None:
        return _measure_network(args)
    for flag in ("weights", "layers", "csv"):
        if getattr(args, flag):
            raise NctoolsError(f"--{flag} goes with --model, not --arch")
    if args.checkpoint is None:
        raise NctoolsError("--arch needs --checkpoint FILE")
    result = measure_checkpoint(
        arch=args.arch, checkpoint=args.checkpoint, dataset=args.dataset, split=args.split,
        layer=args.layer, num_classes=args.num_classes, data_root=args.data_root,
        batch_size=args.batch_size, device=args.device, overrides=args.overrides,
        quiet=args.quiet, ood_dataset=args.ood_dataset,
    )
    if not dist_from_env().is_main:  # every rank holds the result; rank 0 prints it
        return 0
    if args.json:
        # strict JSON has no NaN: an undefined metric is null
        plain = {k: (v if math.isfinite(v) else None) for k, v in result.items()}
        print(json.dumps(plain, indent=2, allow_nan=False))
    else:
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in result.items()))
    return 0


def _measure_network(args: argparse.Namespace) -> int:
    """``measure --model``: one row per layer (text table, ``--json`` or ``--csv``)."""
    from nctools.analysis.saved_model import measure_network, parse_layers
    from nctools.training.distributed import dist_from_env

    if args.checkpoint is not None:
        raise NctoolsError("--checkpoint goes with --arch; give --model's weights as --weights")
    if args.json and args.csv:
        raise NctoolsError("--json and --csv: choose one")
    result = measure_network(
        args.model, args.dataset, weights=args.weights, split=args.split,
        layers=parse_layers(args.layers), num_classes=args.num_classes,
        data_root=args.data_root, batch_size=args.batch_size, device=args.device,
        overrides=args.overrides, ood_dataset=args.ood_dataset,
    )
    if not dist_from_env().is_main:
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = sorted(result.values(), key=len, reverse=True)  # the full suite's order first
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if args.csv:
        print(",".join(["layer", *columns]))
        for layer, row in result.items():
            print(",".join([layer, *(repr(row[k]) if k in row else "" for k in columns)]))
        return 0
    width = max(len("layer"), *(len(layer) for layer in result))
    cells = [[f"{row[k]:.4g}" if k in row else "-" for k in columns] for row in result.values()]
    sizes = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(columns)]
    for name, line in [("layer", columns), *zip(result, cells, strict=True)]:
        padded = (f"{c:>{n}}" for c, n in zip(line, sizes, strict=True))
        print("  ".join([f"{name:<{width}}", *padded]))
    return 0


# ---------------------------------------------------------------------------- entry point


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One readable line per warning (e.g. a skipped snapshot), not a source excerpt.
    print(f"nctools: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    # The training loop's progress messages (TPT onset, resume, completion) go to stderr.
    logging.basicConfig(level=logging.INFO, format="nctools: %(message)s")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            args = parser.parse_args(argv)
            return args.func(args)
        except BrokenPipeError:
            # `nctools analyze RUN | head -1`: the reader left; stop quietly, as Unix tools
            # do, and keep Python from complaining when it flushes stdout at exit
            _quiet_stdout()
            return 141  # 128 + SIGPIPE, the status of a tool the pipe ended
        except (NctoolsError, OSError) as exc:
            # An OSError (a full disk, a folder where a file should be) is the machine's
            # answer, not a bug in nctools: named in one line like the user errors.
            text = str(exc)
            if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
                text = f"{exc.filename}: {exc.strerror}"
            # One line, whatever the message holds.
            message = " ".join(part.strip() for part in text.splitlines() if part.strip())
            print(f"nctools: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("nctools: interrupted", file=sys.stderr)
            return 130


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a descriptor (captured in tests)
        pass
