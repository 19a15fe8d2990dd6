"""``nctools plot RUN``: the collapse curves of one or several runs (or, by layer, of one)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from nctools.cli.common import add_command, check_out
from nctools.errors import NctoolsError, RunError
from nctools.runs.layout import FIGURES_DIR, METRICS_FILE


def add_parser(sub) -> None:
    p = add_command(sub, "plot", "draw the collapse curves of one or several runs",
                    "nctools plot runs/mnist runs/cifar10 --out collapse.pdf")
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
        "(seeds) are drawn as their mean with a band; other swept keys get curves of "
        "their own (never averaged)"))
    p.add_argument("--epoch-axis", choices=("auto", "log", "linear"), default="auto",
                   help="the epoch axis: log (the paper's), linear, or auto (default): log "
                        "when a run is longer than 20 epochs, else linear")


def run(args: argparse.Namespace) -> int:
    from nctools.analysis.plots import figure_format, plot_runs
    from nctools.analysis.tables import current_table
    from nctools.runs.sweeps import is_sweep

    check_out(args.out, "FILE")
    runs = [Path(r) for r in args.runs]
    if args.by == "layer":
        return _plot_by_layer(args, runs)
    if args.epochs:
        raise NctoolsError("--epochs goes with --by layer")
    out = _figure_path(args.out, runs)
    figure_format(out)  # a bad extension fails before any analysis runs
    if args.hue or any(is_sweep(r) for r in runs):
        from nctools.analysis.collect import collect

        print(f"wrote {plot_runs(collect(runs), out, hue=args.hue, epoch_axis=args.epoch_axis)}")
        return 0
    # Every table is brought up to date first (incremental: only new snapshots are
    # measured), so a run that went on training is drawn whole.
    tables = [current_table(run_dir) for run_dir in runs]
    names = [run_dir.resolve().name for run_dir in runs]
    for i, run_dir in enumerate(runs):  # runs/a/exp and runs/b/exp: told apart by their paths
        if names.count(names[i]) > 1 and "run" in tables[i]:
            tables[i] = tables[i].assign(run=str(run_dir))
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        written = plot_runs(tables, out, panels=_panels(args), epoch_axis=args.epoch_axis)
    for note in notes:
        print(f"nctools: note: {note.message}", file=sys.stderr)
    print(f"wrote {written}")
    return 0


def _figure_path(out: str | None, runs: list[Path]) -> Path:
    """``--out``, else RUN/figures/collapse.png for one writable run, else ./collapse.png."""
    from nctools.analysis.tables import run_is_writable
    from nctools.runs.sweeps import is_sweep

    if out:
        return Path(out)
    single = len(runs) == 1 and not is_sweep(runs[0])
    if single and runs[0].is_dir() and not run_is_writable(runs[0]):
        raise RunError(f"{runs[0]} is read-only: give the figure a place elsewhere with "
                       "--out FILE")
    return runs[0] / FIGURES_DIR / "collapse.png" if single else Path("collapse.png")


def _panels(args: argparse.Namespace):
    """The panels ``--metrics`` or ``--panels`` choose; None: the paper's."""
    from nctools.analysis.plots import select_panels

    if not (args.metrics or args.panels != "paper"):
        return None
    keys = [k for k in args.metrics.split(",") if k] if args.metrics else None
    return select_panels(keys, args.panels)


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
