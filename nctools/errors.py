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
