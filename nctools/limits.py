"""What this machine can hold: refuse a size before allocating it, not after.

Usage::

    check_fits("data.image_size", 4 * images * pixels, "synthetic images")  # ConfigError
"""

from __future__ import annotations

import os

from nctools.errors import ConfigError


def memory_bytes() -> int:
    """The machine's physical memory in bytes (2**63 where the platform cannot say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**63


def check_fits(key: str, nbytes: int, what: str) -> None:
    """ConfigError naming ``key`` when ``nbytes`` of ``what`` exceed the physical memory:
    an allocation that large would fail (or swap for hours) after minutes of work."""
    limit = memory_bytes()
    if nbytes > limit:
        raise ConfigError(f"{key}: {what} would need {_size(nbytes)}, more than this "
                          f"machine's {_size(limit)} of memory")


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"  # pragma: no cover
