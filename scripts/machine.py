"""What the benchmarks ran on, in one line: the scripts' one hardware description.

Usage (from another script in this folder)::

    from machine import cpu_model, hardware
    print(f"hardware: {hardware()}")   # CPU, cores, torch threads, torch, Python, date
"""

from __future__ import annotations

import datetime
import os
import platform

import torch


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(r.split(":", 1)[1].strip() for r in info if r.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def hardware() -> str:
    """CPU, visible cores, torch threads, torch and Python versions, today's date."""
    return (f"{cpu_model()}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")
