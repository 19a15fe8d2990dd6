"""Whether a folder takes a new run, continues the run it holds, or refuses: the one
decision, for ``nctools train`` (:func:`open_run`) and for runs written from another
library's loop (:func:`open_external_run`).

Usage::

    config, checkpoint = open_run(run_dir, config, resume=False)   # nctools train
    open_external_run(run_dir, "lightning", done=trainer.current_epoch)

Both start from :func:`saved_config`: a new path or an empty folder is a new run; a file,
a link that leads nowhere, or a folder of other files is refused; a folder with a
``config.yaml`` holds a run, whose saved config decides. A run of ``nctools train``
continues with its saved config, of which only ``RESUME_MAY_CHANGE`` may differ silently
and ``train.epochs`` may grow (the run is extended); a run that stopped before finishing
its first epoch is started anew with a changed config.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path

from nctools.config.schema import Config, diff_configs, load_config
from nctools.errors import RunError
from nctools.runs import files, manifest, store
from nctools.runs.layout import CHECKPOINT_FILE, CONFIG_FILE, SNAPSHOTS_DIR

log = logging.getLogger("nctools.training.loop")

# where a run continues, and how often it looks at the test split, do not change what it is
# where a run computes and where it reports, never what it computes
RESUME_MAY_CHANGE = ("train.device", "train.eval_every", "train.wandb_project",
                     "train.wandb_entity")


def check_run_folder(run_dir: Path, flag: str = "--out") -> None:
    """RunError unless ``run_dir`` is a folder or a new path (not a file, not a link that
    leads nowhere: mkdir would answer "File exists" for both); ``flag`` names the
    argument that gave it."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunError(f"{run_dir}: is a symbolic link to {run_dir.readlink()}, which does not "
                       f"exist; give a folder as {flag}")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: is a file, not a run folder; give a folder as {flag}")


def saved_config(run_dir: Path, flag: str = "--out") -> Config | None:
    """The config of the run ``run_dir`` holds; None where it may take a new run (a new
    path, or a folder holding nothing but temporary files). RunError for anything else."""
    check_run_folder(run_dir, flag)
    if (run_dir / CONFIG_FILE).is_file():
        return load_config(run_dir / CONFIG_FILE)
    if run_dir.is_dir() and any(not files.is_temp_name(p.name) for p in run_dir.iterdir()):
        raise RunError(f"{run_dir} holds files but no nctools run (no {CONFIG_FILE}); use "
                       f"another {flag}, or an empty or new folder")
    return None


def any_epoch_done(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished an epoch (``run.json``'s ``epochs_done``) or
    began writing a snapshot: a run that did neither (stopped by a logger library that
    would not open, say) holds nothing a changed config would contradict."""
    started = manifest.read_if_any(run_dir).get("epochs_done", 0) != 0
    snapshots = run_dir / SNAPSHOTS_DIR
    return started or (snapshots.is_dir() and any(snapshots.iterdir()))


def resume_changes(saved: Config, requested: Config) -> tuple[list[str], int]:
    """The one rule of what a resume may change: ``(refused, epochs)``.

    ``refused`` lists the differences (``"train.lr: 0.05 -> 0.1"``) that would make it
    another run; ``RESUME_MAY_CHANGE`` keys are never among them, nor ``train.epochs``
    when it grows: ``epochs`` is then the new count (a run extended by more epochs),
    else the saved one. Fewer epochs than saved is refused (a run is not shortened).
    """
    refused = diff_configs(saved, requested, ignore=(*RESUME_MAY_CHANGE, "train.epochs"))
    epochs = saved.train.epochs
    if requested.train.epochs > epochs:
        epochs = requested.train.epochs
    elif requested.train.epochs < epochs:
        refused.append(f"train.epochs: {epochs} -> {requested.train.epochs} (a run can be "
                       "extended, not shortened)")
    return refused, epochs


def check_resume_changes(run_dir: Path, requested: Config) -> None:
    """RunError when an explicitly given config (``nctools train --resume`` with CONFIG or
    ``--set``) would change the run in ``run_dir`` beyond :func:`resume_changes`' rule."""
    refused, _ = resume_changes(load_config(run_dir / CONFIG_FILE), requested)
    if refused:
        raise RunError(
            f"train --resume: the given CONFIG/--set would change the run in {run_dir} "
            f"({'; '.join(refused)}); resume without them to continue with "
            f"{run_dir / CONFIG_FILE} (--set train.epochs=N extends it), or use another "
            "--out for a new run"
        )


def open_run(run_dir: Path, config: Config, resume: bool) -> tuple[Config | None, Path | None]:
    """Decide between a new run, a resumed one, an extended one and a finished one.

    Returns the config to train with (None when the run is already complete) and the
    checkpoint to resume from (None for a fresh start). Resumed, the run keeps its saved
    config except the ``RESUME_MAY_CHANGE`` keys, and ``train.epochs`` when ``resume`` asks
    for more (the run is extended); other differences are warned about and ignored with
    ``resume``, refused without it, unless the run never finished an epoch
    (:func:`any_epoch_done`): it then starts anew with ``config``.
    """
    saved = saved_config(run_dir)
    if saved is None:
        if resume:
            raise RunError(f"{run_dir}: no run to resume (no {CONFIG_FILE} there)")
        return config, None
    refused, epochs = resume_changes(saved, config)
    if not resume and (refused or epochs != saved.train.epochs):
        if not any_epoch_done(run_dir):
            log.info("%s: its run stopped before finishing an epoch; starting it anew with "
                     "the given config", run_dir)
            return config, None
        diffs = diff_configs(saved, config, ignore=RESUME_MAY_CHANGE)
        raise RunError(
            f"{run_dir} holds a run of another config ({'; '.join(diffs)}); use another "
            f"--out, or continue it with its saved config: `nctools train --resume --out "
            f"{run_dir}` (add --set train.epochs=N to extend it)"
        )
    if refused:
        warnings.warn(f"{run_dir}: resuming with its saved {CONFIG_FILE}; ignored: "
                      f"{'; '.join(refused)}", stacklevel=3)
    if manifest.is_complete(run_dir, epochs):
        log.info("%s is complete (%d epochs); nothing to do", run_dir, epochs)
        return None, None
    checkpoint = run_dir / CHECKPOINT_FILE
    config = replace(saved, train=replace(saved.train, device=config.train.device,
                                          eval_every=config.train.eval_every, epochs=epochs))
    return config, checkpoint if checkpoint.exists() else None


def open_external_run(run_dir: Path, source: str, done: int, write: bool = True) -> None:
    """Make ``run_dir`` ready to receive a run of ``source`` after ``done`` epochs.

    A new or empty folder is a new run; a training resumed from a checkpoint at epoch
    ``done`` >= 1 continues the run of the same source there (later history rows are
    dropped and written again, as ``nctools train`` does). Raises RunError for a file, a
    folder holding other files, a run of ``nctools train`` or of another source, or a run
    when ``done`` is 0 (a new training would mix its snapshots with the old ones). Under DDP
    every process checks (all raise together, none waits for the others in a collective)
    and only rank 0 passes ``write=True``.
    """
    saved = saved_config(run_dir, flag="out")
    if saved is None:
        return
    written_by = manifest.read_if_any(run_dir).get("source")
    if written_by != source:  # the manifest says which loop wrote the run
        raise RunError(f"{run_dir} holds a run of {written_by or 'nctools train'}, not one "
                       f"written by {source}; give another folder as out")
    if done == 0:
        raise RunError(f"{run_dir} holds the run of an earlier training; give another folder "
                       "as out (a training resumed from its checkpoint continues it)")
    if write:
        store.remove_stale_temps(run_dir)
        store.truncate_history(run_dir, done)
