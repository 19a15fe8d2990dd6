"""nctools: measure neural collapse (Papyan, Han & Donoho, PNAS 2020).

Public API (stable names)::

    nctools.measure(features, labels, weight, bias=None, num_classes=None) -> dict
    nctools.ClassStats(num_classes, dim)
    nctools.analyze(run_dir) -> pandas.DataFrame
    nctools.load_config(path, overrides=()) -> Config
    nctools.train(config, out_dir) -> Path
"""

# Imported eagerly: ``nctools.measure`` and ``nctools.train`` are both a module and a
# function, and only an eager ``from ... import`` makes the function win reliably.
from nctools.analysis import analyze
from nctools.config import load_config
from nctools.measure import measure
from nctools.stats import ClassStats
from nctools.train import train

__version__ = "0.1.0"

__all__ = ["ClassStats", "__version__", "analyze", "load_config", "measure", "train"]
