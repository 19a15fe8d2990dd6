"""``nctools sweep CONFIG --grid KEY=VALUES``: train a config over a grid, on Slurm or here."""

from __future__ import annotations

import argparse

from nctools.cli.common import add_command, add_overrides

# --flag (args attribute) -> submitit's Slurm parameter of the same name
SLURM_FLAGS = ("partition", "timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb")


def add_parser(sub) -> None:
    p = add_command(
        sub, "sweep", "train a config over a grid of settings and seeds (Slurm or here)",
        "nctools sweep papyan2020/mnist-resnet18 --grid train.lr=logspace:1e-4:0.25:25 "
        "--seeds 3 --out sweeps/mnist --executor slurm --partition gpu --gpus-per-node 1",
        "nctools sweep demo --grid train.lr=0.01,0.02 --set train.epochs=5 "
        "--out sweeps/demo --executor local",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config (or a shipped config's name)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=SPEC", required=True,
                   help="a swept key: logspace:A:B:N, linspace:A:B:N or V1,V2,... (repeatable)")
    p.add_argument("--seeds", type=int, default=1, metavar="K",
                   help="K seeds per point: seed, seed + 1, ... (default 1)")
    add_overrides(p, "override a config key for every point (repeatable)")
    p.add_argument("--out", required=True, metavar="SWEEP", help="sweep folder")
    p.add_argument("--executor", choices=("local", "slurm", "debug"), default="local",
                   help="slurm: one job array; local: one process per job on this machine "
                        "(default); debug: the jobs one after the other in this process")
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


def run(args: argparse.Namespace) -> int:
    """Exit status 0, or 1 when runs failed (each named on one line, the others done)."""
    import sys

    from nctools.runs.layout import SUBMITIT_DIR, SWEEP_RUNS_DIR
    from nctools.training.launch import SweepError, parse_grid, plan_sweep, submit

    sweep = plan_sweep(args.config, parse_grid(args.grid), args.out, args.seeds,
                       args.overrides)
    try:
        jobs = submit(sweep, args.executor, _slurm_parameters(args), parallel=args.parallel)
    except SweepError as exc:
        for name, why in exc.failures.items():
            print(f"nctools: error: run {name} failed: {why}", file=sys.stderr)
        print(f"nctools: {len(sweep.points) - len(exc.failures)} of {len(sweep.points)} runs "
              f"complete in {sweep.root / SWEEP_RUNS_DIR}; logs in {sweep.root / SUBMITIT_DIR}",
              file=sys.stderr)
        return 1
    done = len(sweep.points) - len(jobs)
    if args.executor == "slurm" and jobs:
        print(f"submitted {len(jobs)} runs as Slurm job array {jobs[0].job_id.split('_')[0]} "
              f"({done} already complete); logs in {sweep.root / SUBMITIT_DIR}")
    else:
        print(f"{len(sweep.points)} runs complete in {sweep.root / SWEEP_RUNS_DIR}")
    print(f"gather them with: nctools collect {sweep.root} --out table.parquet --best test_acc")
    return 0


def _slurm_parameters(args: argparse.Namespace) -> dict:
    """submitit's parameters from the Slurm flags given (the local executor reads a few)."""
    slurm = {k: getattr(args, k) for k in SLURM_FLAGS if getattr(args, k) is not None}
    if args.executor == "slurm":
        slurm["array_parallelism"] = args.parallel
        extra = dict(item.partition("=")[::2] for item in args.slurm_extra)
        if extra:
            slurm["additional_parameters"] = extra
    return slurm
