"""The error types nctools raises on bad input.

Every error a user can cause derives from :class:`NctoolsError`; the command line
prints its message on one line and exits with status 2, with no traceback.
"""


class NctoolsError(Exception):
    """A user-facing error: the message names the file, key or argument at fault."""


class ConfigError(NctoolsError, ValueError):
    """A config file or ``--set`` override is invalid (unknown key, wrong type, bad value)."""


class DataError(NctoolsError):
    """A data set is missing or malformed; the message says where it was looked for."""


class SnapshotError(NctoolsError):
    """A snapshot file is missing, partial or fails its sha256 checksum."""


class CheckpointError(NctoolsError):
    """A checkpoint cannot be loaded safely or does not fit the network."""


class RunError(NctoolsError):
    """A run directory is missing, holds another config, or cannot be written."""


# The optional libraries nctools reaches for, each with the extra of the distribution
# (nctools._version.DISTRIBUTION) that installs it (pyproject.toml's
# [project.optional-dependencies]).
EXTRAS = {
    "timm": "timm",
    "transformers": "hf",
    "accelerate": "hf",
    "lightning": "lightning",
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "submitit": "slurm",
    "pyarrow": "parquet",
}


def missing_extra(exc: BaseException) -> str | None:
    """``NAME is not installed: pip install "nctools-collapse[EXTRA]"`` when ``exc``, or an
    exception it was raised from, is the failed import of an optional library; else None."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        name = (getattr(cause, "name", None) or "").partition(".")[0]
        if isinstance(cause, ImportError) and name in EXTRAS:
            return f'{name} is not installed: pip install "{install_hint(EXTRAS[name])}"'
        cause = cause.__cause__ or cause.__context__
    return None


def install_hint(extra: str) -> str:
    """What ``pip install`` takes for ``extra``: ``nctools-collapse[EXTRA]``."""
    from nctools._version import DISTRIBUTION

    return f"{DISTRIBUTION}[{extra}]"
