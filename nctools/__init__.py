"""nctools: measure neural collapse (Papyan, Han & Donoho, PNAS 2020).

Public API (stable names)::

    nctools.measure(features, labels, weight, bias=None, num_classes=None) -> dict
    nctools.ClassStats(num_classes, dim)
    nctools.measure_model(model, data, layers=None) -> {layer: dict}   # as_frame=True: a table
    nctools.NCMetric(num_classes, classifier=None, keep_features=False)   # torchmetrics
    nctools.analyze(run_dir) -> pandas.DataFrame
    nctools.plot(run_dir_or_table, metrics=None) -> matplotlib.figure.Figure
    nctools.load_config(path, overrides=()) -> Config
    nctools.train(config, out_dir) -> Path
    nctools.track(model, layer=None, num_classes=None) -> Tracker   # plain-loop NCMetric

``import nctools`` imports neither torch nor pandas: each name is loaded on first use
(PEP 562 module ``__getattr__``), so the command line answers ``--help`` at once.
The package's layout, bottom to top (a stage imports only from stages below it):
``config`` -> ``data`` -> ``models`` -> ``metrics`` -> ``runs`` -> ``training`` ->
``analysis`` -> ``integrations`` -> ``cli``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nctools._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "measure": "nctools.metrics.measure",
    "measure_chunks": "nctools.metrics.measure",
    "measure_model": "nctools.analysis.model_measure",
    "ClassStats": "nctools.metrics.stats",
    "NCMetric": "nctools.metrics.ncmetric",
    "analyze": "nctools.analysis.tables",
    "plot": "nctools.analysis.figures",
    "load_config": "nctools.config.schema",
    "train": "nctools.training.loop",
    "track": "nctools.integrations.track",
}

__all__ = [
    "ClassStats", "NCMetric", "__version__", "analyze", "load_config", "measure",
    "measure_chunks", "measure_model", "plot", "track", "train",
]  # fmt: skip

if TYPE_CHECKING:
    from nctools.analysis.figures import plot
    from nctools.analysis.model_measure import measure_model
    from nctools.analysis.tables import analyze
    from nctools.config.schema import load_config
    from nctools.integrations.track import track
    from nctools.metrics.measure import measure, measure_chunks
    from nctools.metrics.ncmetric import NCMetric
    from nctools.metrics.stats import ClassStats
    from nctools.training.loop import train


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'nctools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
