"""Launching sweeps: a config times a grid of settings (and seeds), one ordinary run per
point, trained through submitit on a Slurm cluster (job arrays) or on this machine.

Usage::

    grid = parse_grid(["train.lr=logspace:1e-4:0.25:25", "train.loss=ce,mse"])
    sweep = plan_sweep("papyan2020/mnist-resnet18", grid, seeds=3, out="sweeps/mnist")
    jobs = submit(sweep, executor="slurm", slurm={"partition": "gpu", "timeout_min": 600})

(also ``nctools sweep CONFIG --grid KEY=SPEC ... --out SWEEP --executor slurm``). The
paper (Papyan, Han & Donoho, PNAS 2020) swept 25 learning rates log-spaced in
[1e-4, 0.25] per cell and kept the one with the best final test error
(:func:`nctools.analysis.collect.best`).

The sweep folder (``sweep.json``, ``runs/NAME/``, ``submitit/``) is
:mod:`nctools.runs.sweeps`'.

Every point is resumable: a job that is preempted or reaches its time limit receives
submitit's signal (USR2), asks to be requeued (:meth:`SweepJob.checkpoint`) and continues
from the run's last checkpoint (one per epoch), bit for bit on a CPU. Submitting the same
sweep again submits only the points not completed yet, each resuming where it stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nctools.config.schema import Config, config_to_dict, load_config
from nctools.config.typed_yaml import AliasBudgetError, StrictLoader
from nctools.errors import ConfigError, NctoolsError, RunError
from nctools.runs.layout import SUBMITIT_DIR, SWEEP_FILE
from nctools.runs.manifest import is_complete
from nctools.runs.sweeps import check_sweep_folder, point_dir, record_sweep

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "debug")
SLURM_COMMANDS = ("sbatch", "srun")  # what submitit calls to submit and run a job array
# A bound against a slip of the keyboard (--seeds 1000000): planning validates every
# point's config, about 40 s for a million; the paper's largest grid is 25 learning rates.
MAX_RUNS = 10_000
_RANGE = re.compile(r"^(logspace|linspace):([^:]+):([^:]+):(\d+)$")


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``KEY=SPEC`` strings -> ``{key: values}`` in the given order.

    SPEC is ``logspace:A:B:N`` (N values spaced evenly in log between A and B, both
    included: the paper's ``logspace:1e-4:0.25:25``), ``linspace:A:B:N``, or
    ``V1,V2,...`` (YAML values: ``ce,mse``, ``0.1,0.05``, ``null``). Raises ConfigError
    naming the ``--grid`` item at fault.
    """
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key or not raw:
            raise ConfigError(f"--grid {spec!r}: expected KEY=SPEC, e.g. "
                              "train.lr=logspace:1e-4:0.25:25 or train.loss=ce,mse")
        if key in grid:
            raise ConfigError(f"--grid {spec!r}: {key} is already swept")
        match = _RANGE.match(raw)
        if match:
            grid[key] = _spaced(spec, *match.groups())
        else:
            try:  # StrictLoader: the alias budget and duplicate keys of config files
                grid[key] = [yaml.load(item, Loader=StrictLoader) for item in raw.split(",")]
            except AliasBudgetError as exc:
                raise ConfigError(f"--grid {spec!r}: {exc}; refused (nested aliases can take "
                                  "gigabytes of memory)") from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"--grid {spec!r}: cannot parse a value ({exc})") from None
            if len(set(map(repr, grid[key]))) != len(grid[key]):
                raise ConfigError(f"--grid {spec!r}: a value is given twice")
    return grid


def _spaced(spec: str, kind: str, start: str, stop: str, count: str) -> list[float]:
    try:
        a, b, n = float(start), float(stop), int(count)
    except ValueError:
        raise ConfigError(f"--grid {spec!r}: {kind}:A:B:N needs numbers A, B and an "
                          "integer N") from None
    if n < 1 or not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"--grid {spec!r}: {kind} needs finite A, B and N >= 1")
    if kind == "logspace" and (a <= 0 or b <= 0):
        raise ConfigError(f"--grid {spec!r}: logspace needs A > 0 and B > 0")
    if n == 1:
        return [a]
    if kind == "linspace":
        return [a + i * (b - a) / (n - 1) for i in range(n)]
    la, lb = math.log10(a), math.log10(b)
    values = [10 ** (la + i * (lb - la) / (n - 1)) for i in range(n)]
    values[0], values[-1] = a, b  # the ends exactly as given
    return values


@dataclass
class SweepPoint:
    """One run of a sweep: its folder name, the swept values and the full config."""

    name: str
    values: dict[str, Any]
    config: Config


@dataclass
class Sweep:
    """A planned sweep: its folder, points and ``sweep.json`` record (:func:`plan_sweep`;
    written by :func:`submit`)."""

    root: Path
    points: list[SweepPoint]
    record: dict[str, Any]

    def run_dir(self, point: SweepPoint) -> Path:
        return point_dir(self.root, point.name)


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _point_name(index: int, values: dict[str, Any]) -> str:
    """``003-lr=0.000192-seed=1``: the index keeps the order, the values tell the point."""
    short = {key: key.rsplit(".", 1)[-1] for key in values}
    clash = len(set(short.values())) < len(short)
    parts = [f"{key if clash else short[key]}={_format(v)}" for key, v in values.items()]
    name = "-".join([f"{index:03d}", *parts])
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def _override(key: str, value: Any) -> str:
    # repr keeps a float exact through YAML; other values as YAML writes them inline
    text = repr(value) if isinstance(value, float) else json.dumps(value)
    return f"{key}={text}"


def plan_sweep(
    config: str | Path, grid: dict[str, list[Any]], out: str | Path, seeds: int = 1,
    overrides: Sequence[str] = (),
) -> Sweep:
    """Expand ``config`` (with ``overrides``) times ``grid`` times ``seeds`` seeds
    (``seed``, ``seed + 1``, ...) into points; :func:`submit` records them in
    ``out/sweep.json``.

    A folder holding a sweep already must hold this very sweep (it is then continued);
    anything else is a RunError naming the folder. Every point's config is validated here,
    before any job starts; more than ``MAX_RUNS`` points is a ConfigError, before any.
    """
    check_sweep_size(grid, seeds)
    root = check_sweep_folder(out)
    base = load_config(config, overrides)
    axes = dict(grid)
    if "seed" not in axes:
        axes["seed"] = [base.seed + i for i in range(seeds)]
    points = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        values = dict(zip(axes, combo, strict=True))
        items = [*overrides, *(_override(k, v) for k, v in values.items())]
        cfg = load_config(config, items)  # each point validated, errors naming the item
        points.append(SweepPoint(_point_name(index, values), values, cfg))
    record = {
        "config": str(config), "overrides": list(overrides), "grid": grid,
        "seeds": axes["seed"], "base": config_to_dict(base),
        "points": [{"name": p.name, "values": p.values} for p in points],
    }
    if root.is_dir() and any(root.iterdir()):  # only checked here: another sweep is refused
        record_sweep(root, record)
    return Sweep(root, points, record)


def check_sweep_size(grid: dict[str, list[Any]], seeds: int) -> None:
    """ConfigError naming ``--seeds`` or ``--grid`` when the sweep has no run or more than
    ``MAX_RUNS``, before a single point is planned."""
    if seeds < 1:
        raise ConfigError(f"--seeds: must be >= 1, got {seeds}")
    if "seed" in grid and seeds > 1:
        raise ConfigError("--grid seed=... and --seeds both set the seeds; give one of them")
    points = math.prod(len(values) for values in grid.values())
    if points * seeds <= MAX_RUNS:
        return
    if points <= MAX_RUNS // seeds or seeds > MAX_RUNS:
        raise ConfigError(f"--seeds: {seeds} seeds make {points * seeds} runs, more than the "
                          f"{MAX_RUNS} one sweep may hold")
    sizes = " x ".join(str(len(values)) for values in grid.values())
    raise ConfigError(f"--grid: {sizes} points make {points * seeds} runs, more than the "
                      f"{MAX_RUNS} one sweep may hold")


class SweepJob:
    """What one submitit job runs: train one point (resuming its run directory).

    submitit calls :meth:`checkpoint` when the job is preempted or times out: the same
    call is requeued, and :func:`nctools.training.loop.train` continues from the run's
    last checkpoint.
    """

    def __call__(self, config: Config, run_dir: str) -> str:
        from nctools.training.loop import train

        if not logging.getLogger().handlers:  # a job process: the loop's messages to its log
            logging.basicConfig(level=logging.INFO, format="nctools: %(message)s")
        return str(train(config, run_dir))

    def checkpoint(self, config: Config, run_dir: str):  # submitit's requeue hook
        from submitit.helpers import DelayedSubmission

        log.warning("%s: preempted or timed out; requeued, it resumes from its checkpoint",
                    run_dir)
        return DelayedSubmission(SweepJob(), config, run_dir)


def make_executor(folder: Path, executor: str, slurm: dict[str, Any] | None = None):
    """A submitit executor: ``slurm`` (job arrays; ``slurm`` holds its parameters, e.g.
    ``partition``, ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``,
    ``array_parallelism``), ``local`` (one process per job on this machine, the same code
    path, requeue included) or ``debug`` (in this process, one job after the other: for
    tests and debuggers)."""
    import submitit

    params = dict(slurm or {})
    if executor == "slurm":
        check_slurm()
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        parallel = params.pop("array_parallelism", None)
        mapped = {f"slurm_{k}" if k in ("partition", "array_parallelism", "additional_parameters")
                  else k: v for k, v in params.items()}
        if parallel is not None:
            mapped["slurm_array_parallelism"] = parallel
        ex.update_parameters(name="nctools-sweep", **mapped)
        return ex
    if executor == "local":
        local = submitit.LocalExecutor(folder=folder)
        local.update_parameters(timeout_min=params.get("timeout_min", 7 * 24 * 60))
        return local
    if executor == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise ConfigError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")


def check_slurm() -> None:
    """RunError naming the missing Slurm commands where this machine cannot submit jobs."""
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
    if missing:
        raise RunError(f"--executor slurm: no Slurm on this machine ({' and '.join(missing)} "
                       "not found); run the sweep here with --executor local")


class SweepError(RunError):
    """Runs of a sweep that failed while the others finished: ``failures`` maps each
    failed run's folder name to its cause (one line)."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"run {name} failed: {why}"
                                   for name, why in failures.items()))


def submit(sweep: Sweep, executor: str = "local", slurm: dict[str, Any] | None = None,
           parallel: int = 1) -> list:
    """Submit the points of ``sweep`` not completed yet; returns their submitit jobs.

    ``slurm`` submits one job array; ``local`` and ``debug`` run the jobs on this machine,
    ``parallel`` at a time (``debug``: one after the other, in this process), and return
    once all have finished. A run that fails does not stop the others: once they are done,
    :class:`SweepError` names each failed run and its cause. Ctrl-C stops the running
    jobs after their current step, each with a resumable checkpoint.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel: must be >= 1, got {parallel}")
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    import submitit  # noqa: F401  (a missing extra is named before anything is written)

    if executor == "slurm":
        check_slurm()  # before the sweep is recorded: no sweep.json for a sweep never sent
    recorded = (sweep.root / SWEEP_FILE).is_file()
    record_sweep(sweep.root, sweep.record)  # the arguments are sound: the sweep exists now
    todo = [p for p in sweep.points
            if not is_complete(sweep.run_dir(p), p.config.train.epochs)]
    if not todo:
        return []
    ex = make_executor(sweep.root / SUBMITIT_DIR, executor, slurm)
    configs = [p.config for p in todo]
    dirs = [str(sweep.run_dir(p)) for p in todo]
    if executor == "slurm":
        try:
            return ex.map_array(SweepJob(), configs, dirs)
        except (subprocess.CalledProcessError, OSError, RuntimeError) as exc:
            if not recorded:  # nothing was submitted: the sweep does not exist yet
                (sweep.root / SWEEP_FILE).unlink(missing_ok=True)
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise RunError(f"--executor slurm: submitting the job array failed: "
                           f"{lines[-1].strip() if lines else type(exc).__name__}") from None
    if executor == "debug":
        jobs = [ex.submit(SweepJob(), config, run) for config, run in zip(configs, dirs,
                                                                             strict=True)]
        # exception() runs a debug job without the debugger its result() opens on failure
        _raise_failures({Path(run).name: job.exception() for job, run in zip(jobs, dirs,
                                                                             strict=True)})
        return jobs
    return _run_here(ex, configs, dirs, parallel)


def _run_here(ex, configs: list[Config], dirs: list[str], parallel: int) -> list:
    """The local executor: at most ``parallel`` jobs at once, progress logged; the failed
    runs named once all are done (:class:`SweepError`)."""
    pending = list(zip(configs, dirs, strict=True))
    running: list = []
    done: list = []
    errors: dict[str, BaseException | None] = {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                config, run = pending.pop(0)
                with _terminal_sigint_ignored():
                    running.append((ex.submit(SweepJob(), config, run), run))
            finished = [(job, run) for job, run in running if job.done()]
            for job, run in finished:
                running.remove((job, run))
                done.append(job)
                errors[Path(run).name] = job.exception()
                log.info("sweep: %d of %d runs finished", len(done), len(configs))
            if not finished:
                time.sleep(0.2)
    except KeyboardInterrupt:
        _stop_jobs([job for job, _ in running])
        raise
    _raise_failures(errors)
    return done


@contextlib.contextmanager
def _terminal_sigint_ignored():
    """Start a job controller with SIGINT ignored: a Ctrl-C at the terminal reaches every
    process of its group, and submitit's controller would print a traceback of its own;
    the job under it installs its own handler and stops after its step."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_jobs(jobs: list) -> None:
    """SIGTERM to each running job's controller, which passes it on to its job (stop
    after the current step, resumable), then wait for them to end."""
    processes = [job._process for job in jobs if getattr(job, "_process", None) is not None]
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait()


def _raise_failures(errors: dict[str, BaseException | None]) -> None:
    failures = {name: job_error(exc) for name, exc in errors.items() if exc is not None}
    if failures:
        raise SweepError(failures)


def job_error(exc: BaseException) -> str:
    """The cause of a failed job in one line: an nctools error's message, otherwise the
    exception's type and message (the last line of the trace submitit records)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    if isinstance(exc, FailedJobError):
        trace = str(exc).split("-" * 22)
        lines = [line.strip() for line in (trace[1] if len(trace) > 2 else str(exc))
                 .splitlines() if line.strip()]
        kind, _, message = lines[-1].partition(": ") if lines else ("", "", "")
        if kind.startswith("nctools.errors."):
            return message
        return f"{kind.rsplit('.', 1)[-1]}: {message}" if message else kind.rsplit(".", 1)[-1]
    if isinstance(exc, UncompletedJobError):
        return ("stopped without a result (interrupted or killed); submit the sweep again "
                "to resume it")
    if isinstance(exc, NctoolsError):
        return " ".join(str(exc).split())
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
