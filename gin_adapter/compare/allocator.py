"""Whether freed CPU tensors go back to the operating system after every step or stay for the next one.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every request above its mmap threshold
(dynamic, at most 32 MiB on 64-bit) with a fresh ``mmap`` and gives it back with ``munmap`` on free, and it trims
the heap's free top above its trim threshold. A training step allocates and frees the same activations every time
(a 4 x 256 step on SmolLM2-135M: about 1 GB), so with glibc's defaults each step faults that memory in again,
page by page: measured 200-270k minor page faults and about 1 s of system time in a 6-11 s step (1 thread, AMD
EPYC, for LoRA and GIN alike).

``configure_cpu_allocator("keep")`` raises both thresholds to their maximum (``mallopt``), so large blocks come
from the heap and stay mapped after ``free``: the next step reuses them without faults. The cost is that the
process's resident set stays at its peak between steps instead of dropping, and the peak itself can be a little
higher (freed blocks are reused less tightly). ``"system"`` leaves the C library's defaults. Numbers are
unchanged either way: only where the bytes live changes.

This is a process-wide setting for scripts (``train.py``, ``benchmarks/run_benchmarks.py``); the library never
calls it. With "keep", :func:`release_free_cpu_memory` hands the kept pages back between trials (the peak-memory
measurement does so). Where glibc is absent (macOS, Windows, musl) ``"keep"`` does nothing and :func:`cpu_allocator` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

CPU_ALLOCATORS: tuple[str, ...] = ("keep", "system")
CPU_ALLOCATOR_HINT = "'keep' reuses freed CPU memory across steps, 'system' leaves the C library's defaults."

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_LARGEST = 2**31 - 1  # mallopt takes an int; glibc >= 2.35 accepts this, older ones at most 32 MiB for the mmap threshold
_OLD_GLIBC_MMAP_MAX = 32 * 2**20

_in_effect: dict[str, str] = {"cpu_allocator": "system"}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or ``None`` where the C library is another one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def _mallopt(libc: ctypes.CDLL, parameter: int, value: int) -> bool:
    return bool(libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)))


def configure_cpu_allocator(choice: str) -> str:
    """Apply ``choice`` (``"keep"`` or ``"system"``) to this process and return the setting in effect.

    ``"keep"``: glibc's mmap and trim thresholds at their maximum (see the module docstring); on a C library
    without ``mallopt`` it stays ``"system (keep unsupported: ...)"``. ``"system"``: nothing is changed (a process
    that already chose ``"keep"`` keeps it: glibc's thresholds are not restored). Call it once, at start-up,
    before the large allocations."""
    if choice not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator={choice!r} is not supported; use one of {list(CPU_ALLOCATORS)}. {CPU_ALLOCATOR_HINT}")
    if choice == "system":
        return cpu_allocator()
    libc = _glibc()
    if libc is None:
        logger.debug("cpu_allocator='keep' needs glibc's mallopt; this C library has none, so its defaults stay")
        _in_effect["cpu_allocator"] = "system (keep unsupported: not glibc)"
        return cpu_allocator()
    mmap_threshold = next((value for value in (_LARGEST, _OLD_GLIBC_MMAP_MAX) if _mallopt(libc, _M_MMAP_THRESHOLD, value)), None)
    if mmap_threshold is None:
        _in_effect["cpu_allocator"] = "system (keep unsupported: mallopt refused)"
        return cpu_allocator()
    _mallopt(libc, _M_TRIM_THRESHOLD, _LARGEST)
    _in_effect["cpu_allocator"] = "keep" if mmap_threshold == _LARGEST else "keep (mmap threshold 32 MiB)"
    logger.debug("glibc malloc: mmap threshold %d, trim threshold %d bytes", mmap_threshold, _LARGEST)
    return cpu_allocator()


def release_free_cpu_memory() -> bool:
    """Give the heap's free pages back to the operating system now (glibc ``malloc_trim(0)``); ``True`` if any were.

    With ``"keep"`` a process's resident set stays at its highest point, so a trial measured after a larger one
    would report the larger one's peak: :class:`gin_adapter.compare.memory.PeakMemory` calls this when it starts,
    so that every trial's peak is its own. The next step faults its memory in once, then reuses it again."""
    libc = _glibc()
    return bool(libc.malloc_trim(ctypes.c_size_t(0))) if libc is not None else False


def cpu_allocator() -> str:
    """The setting in effect in this process: ``"keep"``, ``"system"``, or ``"system (keep unsupported: why)"``."""
    return _in_effect["cpu_allocator"]
