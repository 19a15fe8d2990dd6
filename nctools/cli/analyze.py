"""``nctools analyze RUN``: the NC metrics of every snapshot -> RUN/metrics.csv."""

from __future__ import annotations

import argparse
from pathlib import Path

from nctools.cli.common import add_command
from nctools.errors import NctoolsError
from nctools.runs.layout import METRICS_FILE

# The rows of the short table `nctools analyze` prints (keys of nctools.metrics.measure).
SUMMARY_METRICS = (
    "accuracy", "nc1", "equinorm_means", "equiangular_means", "maxangle_means",
    "self_duality", "ncc_mismatch", "etf_means",
)  # fmt: skip


def add_parser(sub) -> None:
    p = add_command(sub, "analyze", "compute the NC metrics of every snapshot -> RUN/metrics.csv",
                    "nctools analyze runs/mnist runs/cifar10 --strict")
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


def run(args: argparse.Namespace) -> int:
    from nctools.analysis.tables import analyze, run_is_writable

    for run_dir in args.runs:
        try:
            table = analyze(run_dir, strict=args.strict, global_mean=args.global_mean,
                            classes=_class_list(args.classes), quiet=args.quiet)
        except ValueError as exc:  # e.g. --classes naming a class the run does not have
            raise NctoolsError(f"analyze {run_dir}: {exc}") from None
        if Path(run_dir).is_dir() and run_is_writable(Path(run_dir)):
            print(f"wrote {Path(run_dir) / METRICS_FILE} ({len(table)} rows)")
        else:
            print(f"{run_dir} is read-only: {len(table)} rows measured in memory, not saved")
        if args.export == "tensorboard":
            from nctools.training.loggers import export_tensorboard

            print(f"wrote TensorBoard events to {export_tensorboard(run_dir, table)}")
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
