"""``nctools demo``: train, analyze and plot the packaged demo (embedded data, CPU minutes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nctools.cli.analyze import summary
from nctools.cli.common import add_command, add_overrides, check_out
from nctools.runs.layout import FIGURES_DIR, METRICS_FILE


def add_parser(sub) -> None:
    p = add_command(sub, "demo",
                    "train, analyze and plot the packaged demo (embedded data, CPU minutes)",
                    "nctools demo --out runs/demo")
    p.add_argument("--out", metavar="DIR", default="runs/demo",
                   help="run directory (default: runs/demo)")
    add_overrides(p, "override a key of the demo config, e.g. train.epochs=5")


def run(args: argparse.Namespace) -> int:
    from nctools.analysis.plots import plot_runs
    from nctools.analysis.tables import analyze
    from nctools.config.schema import load_config
    from nctools.training.loop import train

    check_out(args.out, "DIR")
    cfg = load_config("demo", args.overrides)
    # train() continues a run of the same config, so a second `nctools demo` picks up
    # where an interrupted one stopped (and a finished one is not trained again).
    run_dir = train(cfg, Path(args.out))
    table = analyze(run_dir)
    figure = plot_runs(table, run_dir / FIGURES_DIR / "collapse.png")
    print(summary(table))
    print(f"metrics table: {run_dir / METRICS_FILE}")
    print(f"figure:        {figure}")
    return 0
