"""``nctools train CONFIG``: train a network past zero training error, saving snapshots."""

from __future__ import annotations

import argparse
from pathlib import Path

from nctools.cli.common import add_command, add_overrides, check_out
from nctools.errors import NctoolsError, RunError
from nctools.runs.layout import CONFIG_FILE


def add_parser(sub) -> None:
    p = add_command(
        sub, "train", "train a network past zero training error, saving snapshots",
        "nctools train configs/papyan2020/mnist-resnet18.yaml --out runs/mnist "
        "--set train.epochs=30 --set snapshot.epochs=all",
        "nctools train --resume --out runs/mnist   # continue from runs/mnist/config.yaml",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="YAML config (optional with --resume: RUN/config.yaml is used)")
    p.add_argument("--out", metavar="RUN", help="run directory (default: runs/<config name>)")
    add_overrides(p, "override a config key, e.g. train.epochs=3 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in RUN from its checkpoint")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: a bar on a terminal, else a line per epoch)")


def run(args: argparse.Namespace) -> int:
    from nctools.config.schema import load_config
    from nctools.training.distributed import dist_from_env
    from nctools.training.loop import train

    say = print if dist_from_env().is_main else _silent  # under torchrun rank 0 alone speaks
    check_out(args.out)
    progress = "none" if args.quiet else "auto"  # a line per epoch without a terminal
    if not args.resume:
        if args.config is None:
            raise NctoolsError("train: give a CONFIG file (or --resume --out RUN)")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        say(f"run saved in {train(cfg, out, progress=progress)}")
        return 0
    run_dir, cfg = _resumed(args)
    say(f"run saved in {train(cfg, run_dir, resume=True, progress=progress)}")
    return 0


def _resumed(args: argparse.Namespace):
    """(RUN, its config) of ``train --resume --out RUN`` or ``train RUN --resume``."""
    from nctools.config.schema import load_config
    from nctools.runs.resume import check_resume_changes

    config = Path(args.config) if args.config else None
    run_dir: Path | None = (Path(args.out) if args.out
                            else config if config and config.is_dir() else None)
    if run_dir is None:
        raise NctoolsError("train --resume: give the run directory with --out RUN")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunError(f"train --resume: no run to resume at {run_dir} (no config.yaml there)")
    if config is None or config.is_dir():
        config = run_dir / CONFIG_FILE
    cfg = load_config(config, args.overrides)
    # Without changes the run's own config.yaml is authoritative; with a CONFIG or --set,
    # they must describe the same run (run_state's rule: train.device may differ, and
    # train.epochs may grow, extending the run).
    if config != run_dir / CONFIG_FILE or args.overrides:
        check_resume_changes(run_dir, cfg)
    return run_dir, cfg


def _silent(*args, **kwargs) -> None:
    """``print`` for ranks other than 0 of a torchrun launch."""
