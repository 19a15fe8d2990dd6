"""``nctools collect SWEEP``: the metrics of every run of sweeps, joined with their configs."""

from __future__ import annotations

import argparse

from nctools.cli.common import add_command


def add_parser(sub) -> None:
    p = add_command(sub, "collect", "join the metrics of every run of sweeps with their configs",
                    "nctools collect sweeps/mnist sweeps/cifar10 --out table.parquet "
                    "--best test_acc")
    p.add_argument("sweeps", nargs="+", metavar="SWEEP", help="sweep folders (or runs)")
    p.add_argument("--out", metavar="FILE", help="write the table (.parquet or .csv)")
    p.add_argument("--best", metavar="COLUMN", help=(
        "print, per cell, the --over value with the best final COLUMN (seed mean), e.g. "
        "test_acc as the paper"))
    p.add_argument("--over", default="train.lr", metavar="KEY",
                   help="the config key --best chooses (default train.lr); the table's "
                        "config columns are config.KEY (config.train.lr)")


def run(args: argparse.Namespace) -> int:
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
