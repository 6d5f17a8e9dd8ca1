"""Corpus loading, the train/validation split, tokenisation and packing for ``train.py``.

The pipeline, all through :mod:`datasets`:

1. :func:`load_documents` reads documents into a ``Dataset`` with two columns,
   ``text`` and ``key``: the embedded Wikipedia intros (``source: wiki``), any
   ``datasets.load_dataset`` name or local dataset folder (``source: hub``), or
   local ``.txt``/``.json(l)``/``.csv`` files (``source: files``). A ``template``
   such as ``"### User: {question} ### Assistant: {answer}"`` builds the text
   from several columns (instruction data).
2. :func:`split_documents` puts each document in train or validation by a
   deterministic hash of its ``key`` (the article title for Wikipedia): the
   split is the same on every machine, process and run, and no document (or
   article) is on both sides.
3. :func:`tokenize_and_pack` tokenises, appends ``eos`` after each document and
   cuts the token stream into fixed ``block_size`` blocks (the remainder is
   dropped), so there is no padding at all.
4. :func:`collate_blocks` turns blocks into ``input_ids``/``attention_mask``/
   ``labels`` tensors (labels are the inputs; the model shifts them).

``train.py`` wraps steps 1-3 in ``accelerator.main_process_first()``. Local sources (``files``, or a local
dataset folder as ``hub``) load without the Hub download-counter ping that ``datasets`` sends for its packaged
builders (``text``, ``json``, ``csv``) unless ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from .config import DataConfig

__all__ = [
    "load_documents",
    "split_documents",
    "hash_fraction",
    "tokenize_and_pack",
    "build_datasets",
    "check_block_size",
    "model_max_length",
    "train_order",
    "collate_blocks",
]

IGNORE_INDEX = -100
_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# ----------------------------------------------------------------------------- loading
def load_documents(cfg: DataConfig, split: str | None = None) -> Dataset:
    """Read the documents of ``cfg`` as a ``Dataset`` with columns ``text`` and ``key``.

    Args:
        cfg: the ``data:`` block of the config.
        split: which split to read for hub/files sources (default ``cfg.split``).

    Raises:
        ValueError: missing text column or template field, unreadable file type, no documents.
    """
    if cfg.source == "wiki":
        from gin_adapter.embedded import wiki_corpus_path

        path = wiki_corpus_path()
        stat = path.stat()
        # from_generator writes an Arrow file in the datasets cache, so every later map is cached on disk too
        # (other processes and later runs reuse the tokenised blocks). The file's size and mtime key the cache.
        raw = Dataset.from_generator(_wiki_rows, gen_kwargs={"path": str(path), "size": stat.st_size, "mtime": stat.st_mtime_ns})
        key_column = cfg.split_key or "title"
    elif cfg.source == "jargon":  # the out-of-domain corpus (gin_adapter.embedded.jargon), one entry a document
        from gin_adapter.embedded.jargon import load_jargon_entries

        entries = load_jargon_entries()
        raw = Dataset.from_dict({"title": [head for head, _ in entries], "text": [text for _, text in entries]})
        key_column = cfg.split_key or "title"
    elif cfg.source == "hub":
        import datasets

        local = Path(cfg.name).exists()
        with _no_download_count() if local else contextlib.nullcontext():
            raw = datasets.load_dataset(cfg.name, cfg.subset, split=split or cfg.split)
        key_column = cfg.split_key
    elif cfg.source == "files":
        import datasets

        with _no_download_count():
            raw = datasets.load_dataset(_file_builder(cfg.files), data_files=[str(f) for f in cfg.files], split=split or cfg.split)
        key_column = cfg.split_key
    else:  # validated earlier; kept so a new source cannot fall through silently
        raise ValueError(f"data.source={cfg.source!r} is not supported; use 'wiki', 'jargon', 'hub' or 'files'.")
    return _to_text_and_key(raw, cfg, key_column)


@contextlib.contextmanager
def _no_download_count() -> Iterator[None]:
    """Switch off ``datasets``' download-counter request (a HEAD to the Hub) while local data loads."""
    import datasets

    before = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = before


def _wiki_rows(path: str, size: int, mtime: int) -> Iterator[dict[str, str]]:
    """Rows ``{"title", "text"}`` of the embedded Wikipedia intros (``path``/``size``/``mtime`` only key the cache)."""
    from gin_adapter.embedded import load_wiki_articles

    for title, extract in load_wiki_articles():
        yield {"title": title, "text": extract}


def _file_builder(files: Sequence[str]) -> str:
    suffixes = set()
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ValueError(f"data.files lists {str(f)!r}, which does not exist; fix the path.")
        suffix = path.suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise ValueError(f"data.files: {str(f)!r} has an unsupported type {suffix!r}; use one of {sorted(_FILE_BUILDERS)}.")
        suffixes.add(_FILE_BUILDERS[suffix])
    if len(suffixes) != 1:
        raise ValueError(f"data.files mixes file types {sorted(suffixes)}; list files of one type per run.")
    return suffixes.pop()


def _to_text_and_key(raw: Dataset, cfg: DataConfig, key_column: str | None) -> Dataset:
    columns = list(raw.column_names)
    if cfg.template is not None:
        fields = _template_fields(cfg.template)
        missing = [f for f in fields if f not in columns]
        if missing:
            raise ValueError(
                f"data.template={cfg.template!r} uses column(s) {missing} that the dataset lacks; available columns: {columns}. "
                "Fix the template or pick another dataset."
            )
    elif cfg.text_column not in columns:
        raise ValueError(
            f"data.text_column={cfg.text_column!r} is not a column of the dataset; available columns: {columns}. "
            "Set data.text_column to one of them, or give a data.template."
        )
    if key_column is not None and key_column not in columns:
        raise ValueError(f"data.split_key={key_column!r} is not a column of the dataset; available columns: {columns}.")
    template, text_column = cfg.template, cfg.text_column

    def to_text(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
        n = len(next(iter(batch.values())))
        rows = [{c: batch[c][i] for c in columns} for i in range(n)]
        texts = [template.format(**row) if template is not None else ("" if row[text_column] is None else str(row[text_column])) for row in rows]
        keys = [str(row[key_column]) if key_column is not None else text for row, text in zip(rows, texts, strict=True)]
        return {"text": texts, "key": keys}

    docs = raw.map(to_text, batched=True, remove_columns=columns, desc="formatting documents")
    docs = docs.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True, desc="dropping empty documents")
    if len(docs) == 0:
        raise ValueError(f"no non-empty documents in data (source={cfg.source!r}, name={cfg.name!r}, files={cfg.files}); check the source.")
    return docs


def _template_fields(template: str) -> list[str]:
    import string

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise ValueError(f"data.template={template!r} is not a valid str.format template: {exc}.") from exc
    return [name.split(".")[0].split("[")[0] for name in names]


# ----------------------------------------------------------------------------- splitting
def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (SHA-256; stable across runs, unlike ``hash()``)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(docs: Dataset, val_fraction: float) -> tuple[Dataset, Dataset]:
    """Split by ``hash_fraction(key) < val_fraction``: deterministic, and every key lands on one side only."""
    is_val = [hash_fraction(k) < val_fraction for k in docs["key"]]
    val_idx = [i for i, v in enumerate(is_val) if v]
    train_idx = [i for i, v in enumerate(is_val) if not v]
    return docs.select(train_idx), docs.select(val_idx)


# ----------------------------------------------------------------------------- tokenising and packing
def tokenize_and_pack(docs: Dataset, tokenizer: Any, block_size: int, desc: str = "") -> Dataset:
    """Tokenise ``docs["text"]``, append ``eos`` to each document, concatenate and cut into ``block_size`` blocks.

    Returns a ``Dataset`` with one column ``input_ids`` (lists of exactly ``block_size`` ids). The tail that does
    not fill a block is dropped. No special tokens other than ``eos`` are added.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; packing needs one to separate documents. Set tokenizer.eos_token.")

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [seq + [eos] for seq in ids]}

    def pack(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = (len(stream) // block_size) * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = docs.map(tokenize, batched=True, remove_columns=docs.column_names, desc=f"tokenizing {desc}".strip())
    # One packing batch sees many documents; only the last partial block of each batch is dropped.
    return tokens.map(pack, batched=True, batch_size=2000, desc=f"packing {desc} into blocks of {block_size}".strip())


def _subsample(blocks: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of at most ``limit`` rows (the same for every run and process)."""
    if limit is None or len(blocks) <= limit:
        return blocks
    return blocks.shuffle(seed=seed).select(range(limit)).flatten_indices()


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[Dataset, Dataset]:
    """Documents -> split -> packed, subsampled ``(train_blocks, val_blocks)``.

    Raises:
        ValueError: when either split ends up with no block (names the fields to change).
    """
    if cfg.val_split is not None:
        train_docs = _subsample(load_documents(cfg, cfg.split), cfg.max_documents)
        val_docs = load_documents(cfg, cfg.val_split)
    else:
        train_docs, val_docs = split_documents(_subsample(load_documents(cfg), cfg.max_documents), cfg.val_fraction)
    train = _subsample(tokenize_and_pack(train_docs, tokenizer, cfg.block_size, "train"), cfg.max_train_blocks)
    val = _subsample(tokenize_and_pack(val_docs, tokenizer, cfg.block_size, "validation"), cfg.max_val_blocks)
    for name, blocks, docs in (("training", train, train_docs), ("validation", val, val_docs)):
        if len(blocks) == 0:
            raise ValueError(
                f"the {name} split is empty: {len(docs)} document(s) gave no complete block of data.block_size={cfg.block_size} "
                f"tokens (data.val_fraction={cfg.val_fraction}). Raise data.val_fraction, lower data.block_size, or add data."
            )
    return train, val


def build_ood_blocks(cfg: DataConfig, tokenizer: Any) -> Dataset:
    """An out-of-domain evaluation set: every document of ``cfg`` (no split: training never sees this corpus),
    packed into blocks, subsampled to ``cfg.max_val_blocks``."""
    blocks = _subsample(tokenize_and_pack(_subsample(load_documents(cfg), cfg.max_documents), tokenizer, cfg.block_size, "out-of-domain"), cfg.max_val_blocks)
    if len(blocks) == 0:
        raise ValueError(f"the out-of-domain corpus (ood.source={cfg.source!r}) gave no complete block of {cfg.block_size} tokens.")
    return blocks


# ----------------------------------------------------------------------------- model limits
def model_max_length(model_config: Any) -> int | None:
    """The longest sequence the model's position encoding supports, if the config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    text = getattr(model_config, "get_text_config", None)
    if text is not None and text() is not model_config:
        return model_max_length(text())
    return None


def check_block_size(block_size: int, model_config: Any) -> None:
    """Raise ``ValueError`` if ``block_size`` exceeds the model's ``max_position_embeddings``."""
    limit = model_max_length(model_config)
    if limit is not None and block_size > limit:
        raise ValueError(
            f"data.block_size={block_size} exceeds the model's max_position_embeddings={limit}; "
            f"set data.block_size to at most {limit}."
        )


# ----------------------------------------------------------------------------- batching
def train_order(num_blocks: int, num_samples: int, seed: int) -> list[int]:
    """Indices of the training blocks in the order they are consumed, over as many epochs as needed.

    Each epoch is a fresh permutation drawn from ``seed``. The order depends only on ``(num_blocks, seed)``, not on
    the number of processes, so a global batch holds the same blocks whether it is split over 1 or 2 processes
    (Accelerate hands process ``p`` every ``P``-th per-device batch of a sequential loader).
    """
    if num_blocks <= 0:
        raise ValueError("the training split is empty; lower data.block_size or add data.")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < num_samples:
        order.extend(rng.permutation(num_blocks).tolist())
    return order[:num_samples]


def collate_blocks(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack equal-length blocks into ``input_ids``, ``attention_mask`` and ``labels`` (``= input_ids``)."""
    input_ids = torch.tensor([ex["input_ids"] for ex in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
