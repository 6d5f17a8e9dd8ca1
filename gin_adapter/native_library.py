"""The compiled CPU kernels (``gin_adapter/native/*.c``, built by ``pip install -e .`` as ``gin_adapter._native``),
loaded once through ``ctypes``.

The library is optional: without a C compiler at install time the package installs without it, :func:`library`
returns ``None`` (logged once) and every caller uses ATen's operators instead. ``GIN_ADAPTER_NATIVE=0`` in the
environment switches every compiled kernel off (:data:`ENABLED_BY_ENVIRONMENT`).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENABLED_BY_ENVIRONMENT = os.environ.get("GIN_ADAPTER_NATIVE", "1") != "0"
"""``False`` when ``GIN_ADAPTER_NATIVE=0`` is set: the default of each kernel module's ``ENABLED`` switch."""


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` where it is missing or cannot be loaded (logged once)."""
    try:
        module = importlib.import_module("gin_adapter._native")
        return ctypes.CDLL(module.__file__)
    except (ImportError, OSError) as exc:
        logger.info("gin_adapter's compiled kernels are not available (%s); using ATen's operators. Reinstall with a C "
                    "compiler present (pip install -e .) to build them.", exc)
        return None


def function(name: str, argtypes: list, restype=ctypes.c_int):
    """The library's C function ``name`` with its argument types set, or ``None`` without the library or where the
    library was built before that kernel existed (logged: reinstall to rebuild it)."""
    loaded = library()
    if loaded is None:
        return None
    found = getattr(loaded, name, None)
    if found is None:
        logger.warning("gin_adapter's compiled library predates its kernel %s; reinstall (pip install -e .) to build it. Using ATen's "
                       "operators there.", name)
        return None
    found.argtypes, found.restype = argtypes, restype
    return found


_PROFILER_ON = getattr(torch.autograd, "_profiler_enabled", None)


def run(label: str, kernel, *args) -> int:
    """``kernel(*args)``, timed under ``label`` while ``torch.profiler`` records (every kernel module calls through
    this; ``record_function`` costs some microseconds a call, as much as a decoded token's kernel: left out when no
    profiler records)."""
    if _PROFILER_ON is not None and not _PROFILER_ON():
        return kernel(*args)
    with torch.profiler.record_function(label):
        return kernel(*args)
