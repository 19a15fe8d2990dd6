"""Peak resident memory of this process, resettable: the benchmarks' one memory probe.

Usage (from another script in this folder)::

    from memory import peak_rss, reset_peak
    before = reset_peak()      # bytes resident now (freed heap returned first); peak restarts
    ...                        # the measured call
    grown = peak_rss() - before

Linux only (/proc): VmHWM, reset through /proc/self/clear_refs. ``ru_maxrss`` cannot be
reset and would even start at the parent's peak (it survives fork and exec).
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM) since :func:`reset_peak`."""
    return _status("VmHWM")


def reset_peak() -> int:
    """Restart the peak at the current resident memory (returned, in bytes).

    Memory freed earlier but still held by the C allocator (glibc keeps freed heap pages
    resident) is handed back to the system first: otherwise a call that only reuses such
    pages would show no growth, however much it allocates.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # Linux >= 4.0: reset the peak RSS
    except OSError:
        pass  # the peak then includes what came before; the table shows "RSS before"
    return _status("VmRSS")
