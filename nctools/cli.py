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
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

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

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _epilog(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per job, each with an example in its help."""
    from nctools import __version__

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
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", metavar="FILE", help=(
        "figure file, .png/.pdf/.svg (default: RUN/figures/collapse.png for one run, "
        "./collapse.png for several)"))
    p.set_defaults(func=cmd_plot)

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
        ),
    )
    p.add_argument("--arch", required=True, help="network architecture, e.g. resnet18")
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="nctools checkpoint.pt or a plain state_dict (torchvision names too)")
    p.add_argument("--dataset", required=True, help="data set name, e.g. cifar10")
    p.add_argument("--split", choices=("train", "test"), default="train")
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
                        "data.samples_per_class=50 or model.width=16")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar over the batches")
    p.set_defaults(func=cmd_measure)
    return parser


# ---------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from nctools.config.schema import load_config
    from nctools.training.distributed import dist_from_env
    from nctools.training.loop import train

    say = print if dist_from_env().is_main else _silent  # under torchrun rank 0 alone speaks

    if not args.resume:
        if args.config is None:
            raise NctoolsError("train: give a CONFIG file (or --resume --out RUN)")
        cfg = load_config(args.config, args.overrides)
        run = Path(args.out) if args.out else Path("runs") / cfg.name
        progress = "none" if args.quiet else "auto"  # a line per epoch without a terminal
        say(f"run saved in {train(cfg, run, progress=progress)}")
        return 0
    # --resume: `nctools train --resume --out RUN` or `nctools train RUN --resume`.
    config = Path(args.config) if args.config else None
    run = Path(args.out) if args.out else config if config and config.is_dir() else None
    if run is None:
        raise NctoolsError("train --resume: give the run directory with --out RUN")
    if not (run / CONFIG_FILE).is_file():
        raise RunError(f"train --resume: no run to resume at {run} (no config.yaml there)")
    if config is None or config.is_dir():
        config = run / CONFIG_FILE
    cfg = load_config(config, args.overrides)
    # Without changes the run's own config.yaml is authoritative; with a CONFIG or --set,
    # they must describe the same run (only keys like train.device may differ).
    same = config == run / CONFIG_FILE and not args.overrides
    if not same:
        _check_resume_changes(run, cfg)
    progress = "none" if args.quiet else "auto"
    say(f"run saved in {train(cfg, run, resume=same, progress=progress)}")
    return 0


def _check_resume_changes(run: Path, cfg) -> None:
    """Refuse a CONFIG or --set that would change the run being resumed (never ignore it)."""
    from nctools.config.schema import diff_configs, load_config
    from nctools.training.run_state import RESUME_MAY_CHANGE

    diffs = diff_configs(load_config(run / CONFIG_FILE), cfg, ignore=RESUME_MAY_CHANGE)
    if diffs:
        raise RunError(
            f"train --resume: the given CONFIG/--set would change the run in {run} "
            f"({'; '.join(diffs)}); resume without them to continue with "
            f"{run / CONFIG_FILE}, or use another --out for a new run"
        )


def cmd_analyze(args: argparse.Namespace) -> int:
    from nctools.analysis.tables import analyze

    for run in args.runs:
        table = analyze(run, strict=args.strict, quiet=args.quiet)
        print(f"wrote {Path(run) / 'metrics.csv'} ({len(table)} rows)")
        if args.export == "tensorboard":
            from nctools.training.loggers import export_tensorboard

            print(f"wrote TensorBoard events to {export_tensorboard(run, table)}")
        print(summary(table))
    return 0


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
    from nctools.analysis.plots import figure_format, plot_runs
    from nctools.analysis.tables import analyze, read_table

    runs = [Path(r) for r in args.runs]
    if args.out:
        out = Path(args.out)
    else:
        out = runs[0] / FIGURES_DIR / "collapse.png" if len(runs) == 1 else Path("collapse.png")
    figure_format(out)  # a bad extension fails before any analysis runs
    tables = []
    for run in runs:
        csv = run / METRICS_FILE
        tables.append(read_table(csv) if csv.is_file() else analyze(run))
    print(f"wrote {plot_runs(tables, out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nctools.analysis.plots import plot_runs
    from nctools.analysis.tables import analyze
    from nctools.config.schema import load_config
    from nctools.training.loop import train

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


def _silent(*args, **kwargs) -> None:
    """``print`` for ranks other than 0 of a torchrun launch."""


def cmd_measure(args: argparse.Namespace) -> int:
    from nctools.analysis.saved_model import measure_checkpoint
    from nctools.training.distributed import dist_from_env

    result = measure_checkpoint(
        arch=args.arch, checkpoint=args.checkpoint, dataset=args.dataset, split=args.split,
        layer=args.layer, num_classes=args.num_classes, data_root=args.data_root,
        batch_size=args.batch_size, device=args.device, overrides=args.overrides,
        quiet=args.quiet,
    )
    if not dist_from_env().is_main:  # every rank holds the result; rank 0 prints it
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v:.6g}" for k, v in result.items()))
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
