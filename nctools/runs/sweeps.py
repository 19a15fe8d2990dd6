"""The sweep folder: its record (``sweep.json``), where each point's run lives, and which
points are done. Planning and submitting a sweep is :mod:`nctools.training.launch`,
gathering its runs into one table :mod:`nctools.analysis.collect`.

The sweep folder::

    SWEEP/sweep.json       the config, grid, seeds and points (written once)
    SWEEP/runs/NAME/       one ordinary run directory per point (nctools analyze/plot work)
    SWEEP/submitit/        submitit's job files and logs

Usage::

    record_sweep(root, {"config": ..., "points": [{"name": "000-lr=0.1", ...}]})
    sweep_runs(root)        # the run directories that exist, in point order
    sweep_points(root)      # every point's run directory, existing or not
"""

from __future__ import annotations

import json
from pathlib import Path

from nctools.errors import RunError
from nctools.runs import files
from nctools.runs.layout import CONFIG_FILE, SWEEP_FILE, SWEEP_RUNS_DIR


def point_dir(root: Path, name: str) -> Path:
    """The run directory of the point ``name`` of the sweep in ``root``."""
    return root / SWEEP_RUNS_DIR / name


def is_sweep(path: str | Path) -> bool:
    """Whether ``path`` is a sweep folder (holds ``sweep.json``)."""
    return (Path(path) / SWEEP_FILE).is_file()


def check_sweep_folder(out: str | Path) -> Path:
    """The sweep folder ``out`` names (``~`` expanded); RunError naming ``--out`` for an
    empty name, a file, or a link that leads nowhere."""
    if not str(out).strip():
        raise RunError("--out: empty; give the sweep folder")
    root = Path(out).expanduser()
    if root.is_symlink() and not root.exists():
        raise RunError(f"--out {root}: is a symbolic link to {root.readlink()}, which does "
                       "not exist")
    if root.exists() and not root.is_dir():
        raise RunError(f"--out {root}: is a file, not a sweep folder")
    return root


def record_sweep(root: Path, record: dict) -> None:
    """Write ``record`` as ``root/sweep.json``, or, where the folder holds a sweep already,
    check that it is this very sweep (it is then continued). RunError naming the folder
    for another sweep or a folder of other files."""
    check_sweep_folder(root)
    path = root / SWEEP_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunError(f"{path}: not a sweep record ({exc}); use another --out") from None
        if old != json.loads(json.dumps(record)):
            raise RunError(f"{root} holds another sweep (its {SWEEP_FILE} differs: config, "
                           "grid, seeds or --set); use another --out")
    elif root.is_dir() and any(root.iterdir()):
        raise RunError(f"{root} holds files but no sweep; use another --out")
    else:
        root.mkdir(parents=True, exist_ok=True)
        files.write_json(path, record)


def sweep_runs(path: str | Path) -> list[Path]:
    """The run directories of the sweep in ``path`` that exist, in point order."""
    return [r for r in sweep_points(path) if (r / CONFIG_FILE).is_file()]


def sweep_points(path: str | Path) -> list[Path]:
    """The run directories of every point of the sweep in ``path``, existing or not, in
    point order."""
    root = Path(path)
    try:
        record = json.loads((root / SWEEP_FILE).read_text())
    except FileNotFoundError:
        raise RunError(f"{root}: not a sweep (no {SWEEP_FILE}; make one with "
                       f"`nctools sweep CONFIG --grid KEY=SPEC --out {root}`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{root / SWEEP_FILE}: not a sweep record ({exc})") from None
    return [point_dir(root, p["name"]) for p in record["points"]]

