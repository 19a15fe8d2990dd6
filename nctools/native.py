"""Fused kernels for `measure`'s two passes, compiled from C on first use.

Usage::

    from nctools import native
    native.available()        # True once kernels/passes.c is built (or found built)

`measure` calls them by itself on CPU tensors; they give the numbers of the torch route
(`ClassStats.update` + `DecisionTally`), rounding aside, in one sweep over each row
instead of a dozen (Papyan, Han & Donoho, PNAS 2020: the NC1 second moments along
Sigma_B's eigenvectors and both NC4 decisions, in float64; the classifier's scores in
float32 under `decisions.SureArgmax`'s rounding bound, re-scored in float64 where the
bound cannot decide). The source is compiled
with the system C compiler (``$CC``, else ``cc``; -O3, -march=native where accepted) into
a cache folder keyed by the source, the compiler and the CPU: ``$NCTOOLS_CACHE``, else
``$XDG_CACHE_HOME/nctools``, else ``~/.cache/nctools``. Without a compiler, or with
``NCTOOLS_NATIVE=0``, `measure` takes the torch route, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from nctools.decisions import DecisionTally
    from nctools.stats import ClassStats

SOURCE = Path(__file__).with_name("kernels") / "passes.c"
ABI = 4  # nct_abi() of the source this module speaks to
SWITCH = "NCTOOLS_NATIVE"  # "0" turns the kernels off
# -ffp-contract=fast: fused multiply-adds, which ISO C modes would otherwise forbid
FLAG_SETS = (
    ("-march=native", "-ffp-contract=fast", "-fopenmp-simd"),
    ("-ffp-contract=fast", "-fopenmp-simd"),
    (),
)
CALL_ROWS = 1 << 14  # rows per kernel call (Ctrl-C is seen between calls)
COPY_ELEMENTS = 1 << 18  # values per call when rows must be copied: 1 MiB of float32
CACHE_DOUBLES = 1 << 14  # a block of rows (and a slice of the matrix) in pass 2: 128 KiB
F64 = torch.float64
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


def available() -> bool:
    """Whether the kernels are built (building them now if needed) and switched on."""
    return library() is not None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (switched off, no compiler, or a failed build)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("NCTOOLS_CACHE"):
        return Path(os.environ["NCTOOLS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nctools"


def built_path(compiler: str | None = None) -> Path:
    """The file the kernels are built into: one per source, compiler and CPU."""
    compiler = compiler or os.environ.get("CC", "cc")
    key = hashlib.sha256(
        SOURCE.read_bytes() + repr((compiler, FLAG_SETS, _cpu_signature())).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"passes-{key}.so"


def _load() -> ctypes.CDLL | None:
    """Load the built kernels, building them first if absent (or unloadable)."""
    compiler = os.environ.get("CC", "cc")
    target = built_path(compiler)
    problem = ""
    for attempt in range(2):
        try:
            if attempt or not target.exists():
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
            if lib.nct_abi() != ABI:
                raise OSError(f"{target}: ABI {lib.nct_abi()}, expected {ABI}")
            _declare(lib)
            return lib
        except (OSError, subprocess.SubprocessError) as exc:
            problem = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    log.info("C kernels unavailable (%s); measure takes the torch route, 2-3x slower", problem)
    return None


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into ``target`` (written under a temporary name, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
    for flags in FLAG_SETS:
        command = [compiler, "-O3", "-std=c99", "-fPIC", "-shared", *flags, str(SOURCE)]
        done = subprocess.run(
            [*command, "-o", str(temporary), "-lm"], capture_output=True, timeout=300, check=False
        )
        if done.returncode == 0:
            os.replace(temporary, target)
            return
    temporary.unlink(missing_ok=True)
    raise OSError(f"cannot compile {SOURCE}: {done.stderr.decode(errors='replace')[-500:]}")


def _cpu_signature() -> str:
    """The CPU model and instruction-set flags (-march=native builds differ by CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        lines = [line for line in info.splitlines() if line.split(":")[0].strip() in
                 ("model name", "flags", "Features", "CPU part")]  # fmt: skip
        return "\n".join(lines)
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _declare(lib: ctypes.CDLL) -> None:
    for name in ("nct_class_sums_f32", "nct_class_sums_f64"):
        getattr(lib, name).argtypes = [_POINTER, _POINTER, _INT, _INT, _POINTER]
        getattr(lib, name).restype = None
    for name in ("nct_second_pass_f32", "nct_second_pass_f64"):
        getattr(lib, name).argtypes = [_POINTER, _POINTER, _INT, _INT, _INT, _POINTER,
                                       _POINTER, _INT, _INT, *[_POINTER] * 13, _INT]  # fmt: skip
        getattr(lib, name).restype = None


def _rows(features: Tensor, labels: Tensor):
    """(float32 or float64 contiguous rows, int64 contiguous labels, dtype suffix) in
    slices of CALL_ROWS rows; float16/bfloat16 (and non-contiguous) rows are copied to
    float32 (exactly) one slice of COPY_ELEMENTS at a time."""
    ready = features.dtype in (torch.float32, F64) and features.is_contiguous()
    step = CALL_ROWS if ready else max(1, COPY_ELEMENTS // max(1, features.shape[1]))
    for start in range(0, features.shape[0], step):
        h = features[start : start + step]
        if h.dtype not in (torch.float32, F64):
            h = h.float()
        y = labels[start : start + step].to(torch.int64).contiguous()
        yield h.contiguous(), y, "f64" if h.dtype == F64 else "f32"


def class_sums(lib: ctypes.CDLL, features: Tensor, labels: Tensor, sums: Tensor) -> None:
    """sums (C, D) float64 += the per-class sums of features (n, D) by labels (n,)."""
    dim = sums.shape[1]
    for h, y, suffix in _rows(features, labels):
        getattr(lib, f"nct_class_sums_{suffix}")(h.data_ptr(), y.data_ptr(), h.shape[0], dim,
                                                  sums.data_ptr())  # fmt: skip


class SecondPass:
    """Pass 2 of `measure` through the kernel: `ClassStats.update` with a `DecisionTally`.

    Built once per pass from the pass's statistics (shift = the class means, basis =
    Sigma_B's eigenvectors, ``diagonal=True``) and its tally, whose matrices it packs
    into the kernel's layout; each worker then calls :meth:`update` on its own pair.
    Use :meth:`for_pass`, which says None where the kernels do not apply.
    """

    def __init__(self, lib: ctypes.CDLL, stats: ClassStats, tally: DecisionTally) -> None:
        self.lib = lib
        self.num_classes, self.dim = stats.num_classes, stats.dim
        self.width = stats.basis.shape[1]
        rows = [stats.basis_t] + ([] if tally.in_basis else [tally.ncc.matrix.T])
        self.matrix = torch.cat(rows).to(F64).contiguous()  # (k [+ C], D): float64 products
        self.coords = tally.ncc.matrix.T.contiguous() if tally.in_basis else None  # (C, k)
        self.ncc_offset = tally.centre_offset.full().contiguous()  # (C, C): few classes
        self.shift = stats.shift.contiguous()
        # The classifier as SureArgmax scores it: float32 products, bound, float64 rescue,
        # where h.w_q + b_q = x.w_q + (s_y.w_q + b_q) (row y of the float64 offset).
        rule = tally.classifier
        self.w32, self.b32 = rule.matrix32.contiguous(), rule.offset32.contiguous()
        self.w64 = rule.matrix.T.contiguous()  # (C, D)
        self.cls_offset = (self.shift @ rule.matrix + rule.offset).contiguous()
        self.bound = torch.tensor([rule.unit, rule.max_norm, rule.max_offset], dtype=F64)

    @classmethod
    def for_pass(cls, stats: ClassStats, tally: DecisionTally | None) -> SecondPass | None:
        """The kernel route for this pass, or None (no kernels, not a CPU pass 2)."""
        lib = library()
        fits = (
            lib is not None and tally is not None and stats.device.type == "cpu"
            and stats.basis is not None and stats.diagonal and stats.basis.shape[1] > 0
            and all(t.dtype == F64 and t.is_contiguous()  # the kernel writes into them
                    for t in (stats.sums, stats.sq_norms, stats.scatter))
        )  # fmt: skip
        return cls(lib, stats, tally) if fits else None

    def update(
        self, stats: ClassStats, tally: DecisionTally, features: Tensor, labels: Tensor
    ) -> None:
        """Add features (n, D) with labels (n,) to ``stats`` and ``tally``: the state
        `ClassStats.update(features, labels, on_block=tally.add)` would reach."""
        h, y = stats.checked(features, labels)
        stats.counts += torch.bincount(y, minlength=self.num_classes).to(F64)
        events = torch.zeros(3, dtype=torch.int64)
        block = max(4, CACHE_DOUBLES // self.dim // 4 * 4)  # rows: a multiple of the tile
        work = torch.empty(block * (self.dim + self.matrix.shape[0] + self.num_classes + 1),
                           dtype=F64)  # fmt: skip
        work32 = torch.empty(block * (self.dim + self.num_classes), dtype=torch.float32)
        coords = None if self.coords is None else self.coords.data_ptr()
        for rows, y_rows, suffix in _rows(h, y):
            getattr(self.lib, f"nct_second_pass_{suffix}")(
                rows.data_ptr(), y_rows.data_ptr(), rows.shape[0], self.dim, self.num_classes,
                self.shift.data_ptr(), self.matrix.data_ptr(), self.matrix.shape[0],
                self.width, coords, self.ncc_offset.data_ptr(), self.w32.data_ptr(),
                self.b32.data_ptr(), self.w64.data_ptr(), self.cls_offset.data_ptr(),
                self.bound.data_ptr(), stats.sums.data_ptr(), stats.sq_norms.data_ptr(),
                stats.scatter.data_ptr(), events.data_ptr(), work.data_ptr(),
                work32.data_ptr(), block,
            )  # fmt: skip
        tally.tallied += events.to(tally.tallied.device)
