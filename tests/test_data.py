"""gin_adapter.compare.data: document split by hash, packing into blocks, templates, and clear errors on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from gin_adapter.compare.data import (
    build_datasets,
    check_block_size,
    collate_blocks,
    hash_fraction,
    load_documents,
    split_documents,
    tokenize_and_pack,
    train_order,
)
from gin_adapter.compare.config import DataConfig, TrainingConfig

WORDS = "the a cat dog sat ran on under mat rug and then . ### User: Assistant: what is two plus three five".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built offline; eos is '<eos>'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<eos>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def docs_dataset(n: int = 200) -> Dataset:
    texts = [" ".join(WORDS[(i + j) % 13] for j in range(3 + i % 17)) for i in range(n)]
    return Dataset.from_dict({"text": texts, "key": [f"article {i}" for i in range(n)]})


# ----------------------------------------------------------------------------- split
def test_split_is_deterministic_and_no_key_is_on_both_sides() -> None:
    docs = docs_dataset(400)
    train1, val1 = split_documents(docs, 0.2)
    train2, val2 = split_documents(docs, 0.2)
    assert train1["key"] == train2["key"] and val1["key"] == val2["key"]
    assert not set(train1["key"]) & set(val1["key"])
    assert len(train1) + len(val1) == 400
    assert 0.12 < len(val1) / 400 < 0.28
    # a key decides its side alone: the same title in another corpus lands on the same side
    assert hash_fraction("article 7") == hash_fraction("article 7")
    assert all((hash_fraction(k) < 0.2) for k in val1["key"])


def test_hash_fraction_is_a_fixed_value_in_unit_interval() -> None:
    # sha256-based, independent of PYTHONHASHSEED; pinned so a change of the split rule cannot go unnoticed
    assert hash_fraction("Albert Einstein") == pytest.approx(int("0x" + __import__("hashlib").sha256(b"Albert Einstein").hexdigest()[:16], 16) / 2**64)
    assert all(0.0 <= hash_fraction(str(i)) < 1.0 for i in range(1000))


@pytest.mark.integration
def test_wiki_split_by_title_has_no_article_in_both_splits(tmp_path: Path) -> None:
    cfg = DataConfig(source="wiki", val_fraction=0.05)
    docs = load_documents(cfg)
    train, val = split_documents(docs, cfg.val_fraction)
    assert len(docs) > 9000
    assert not set(train["key"]) & set(val["key"])
    assert 0.03 < len(val) / len(docs) < 0.07
    assert val["key"] == split_documents(load_documents(cfg), cfg.val_fraction)[1]["key"]


# ----------------------------------------------------------------------------- packing
def test_packed_blocks_have_the_right_length_and_eos_between_documents(tokenizer) -> None:
    docs = Dataset.from_dict({"text": ["the cat sat", "a dog ran on mat", "then"], "key": ["1", "2", "3"]})
    blocks = tokenize_and_pack(docs, tokenizer, block_size=4)
    eos = tokenizer.eos_token_id
    ids = [tokenizer.convert_tokens_to_ids(w) for w in "the cat sat".split()] + [eos]
    ids += [tokenizer.convert_tokens_to_ids(w) for w in "a dog ran on mat".split()] + [eos]
    ids += [tokenizer.convert_tokens_to_ids("then"), eos]
    assert len(ids) == 12
    assert blocks["input_ids"] == [ids[0:4], ids[4:8], ids[8:12]]
    assert all(len(b) == 4 for b in blocks["input_ids"])


def test_packing_drops_only_the_tail(tokenizer) -> None:
    docs = docs_dataset(100)
    total = sum(len(t.split()) + 1 for t in docs["text"])
    blocks = tokenize_and_pack(docs, tokenizer, block_size=16)
    assert {len(b) for b in blocks["input_ids"]} == {16}
    assert total // 16 == len(blocks)


def test_collate_blocks_makes_labels_equal_inputs() -> None:
    batch = collate_blocks([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert batch["input_ids"].tolist() == batch["labels"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]


def test_train_order_is_seeded_and_covers_every_block_each_epoch() -> None:
    order = train_order(10, 25, seed=3)
    assert order == train_order(10, 25, seed=3) and order != train_order(10, 25, seed=4)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert len(order) == 25


# ----------------------------------------------------------------------------- files, templates, limits
def test_files_with_template_build_instruction_text(tmp_path: Path, tokenizer) -> None:
    rows = [{"question": f"what is two plus three {i}", "answer": "five"} for i in range(60)]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source="files", files=[str(path)], template="### User: {question} ### Assistant: {answer}", block_size=8, val_fraction=0.25)
    docs = load_documents(cfg)
    assert docs[0]["text"] == "### User: what is two plus three 0 ### Assistant: five"
    train, val = build_datasets(cfg, tokenizer)
    assert len(train) > 0 and len(val) > 0 and {len(b) for b in train["input_ids"]} == {8}


def test_max_blocks_give_a_fixed_subset(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs_dataset(300)["text"]))
    cfg = DataConfig(source="files", files=[str(path)], block_size=8, val_fraction=0.2, max_train_blocks=50, max_val_blocks=10)
    train, val = build_datasets(cfg, tokenizer)
    again_train, again_val = build_datasets(cfg, tokenizer)
    assert len(train) == 50 and len(val) == 10
    assert train["input_ids"] == again_train["input_ids"] and val["input_ids"] == again_val["input_ids"]


def test_missing_text_column_names_the_field_and_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nwhat,five\n")
    with pytest.raises(ValueError, match=r"data.text_column='text' is not a column of the dataset; available columns: \['question', 'answer'\]"):
        load_documents(DataConfig(source="files", files=[str(path)]))


def test_missing_template_field_names_it(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("question,answer\nwhat,five\n")
    with pytest.raises(ValueError, match=r"uses column\(s\) \['solution'\] that the dataset lacks"):
        load_documents(DataConfig(source="files", files=[str(path)], template="{question} {solution}"))


def test_unsupported_or_missing_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "nope.txt")]))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unsupported type '.xml'"):
        load_documents(DataConfig(source="files", files=[str(tmp_path / "x.xml")]))


def test_empty_validation_split_is_a_clear_error(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(docs_dataset(5)["text"]))
    with pytest.raises(ValueError, match=r"the (validation|training) split is empty: .*data.block_size=8"):
        build_datasets(DataConfig(source="files", files=[str(path)], block_size=8, val_fraction=0.01), tokenizer)


def test_block_size_above_max_position_embeddings_is_a_clear_error() -> None:
    from transformers import GPT2Config, LlamaConfig

    check_block_size(64, LlamaConfig(max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"data.block_size=65 exceeds the model's max_position_embeddings=64"):
        check_block_size(65, LlamaConfig(max_position_embeddings=64))
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        check_block_size(64, GPT2Config(n_positions=32))


def test_hub_source_reads_a_local_dataset_folder(tmp_path: Path, tokenizer) -> None:
    """source: hub goes through datasets.load_dataset(name); a local folder of files exercises that path offline."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"body": t, "title": f"t{i}"}) for i, t in enumerate(docs_dataset(80)["text"])))
    cfg = DataConfig(source="hub", name=str(folder), text_column="body", split_key="title", block_size=8, val_fraction=0.2)
    train, val = build_datasets(cfg, tokenizer)
    assert len(train) > 0 and len(val) > 0


# ----------------------------------------------------------------------------- config schema
def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"runs\[0\]\.method='prefix' is not supported"):
        TrainingConfig.from_dict({"runs": [{"name": "p", "method": "prefix"}]})
    with pytest.raises(ValueError, match=r"config has unknown field\(s\) \['learning_rate'\]"):
        TrainingConfig.from_dict({"method": "gin", "learning_rate": 1e-3})
    with pytest.raises(ValueError, match=r"data.source='web' is not supported"):
        TrainingConfig.from_dict({"method": "gin", "data": {"source": "web"}})
    with pytest.raises(ValueError, match="data.name is required"):
        TrainingConfig.from_dict({"method": "gin", "data": {"source": "hub"}})
    with pytest.raises(ValueError, match="run names must be unique"):
        TrainingConfig.from_dict({"runs": [{"name": "a", "method": "gin"}, {"name": "a", "method": "gin"}]})
    with pytest.raises(ValueError, match="learning rates must be finite positive numbers"):
        TrainingConfig.from_dict({"method": "gin", "learning_rates": [-1.0]})


def test_config_yaml_reads_exponent_floats_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nlora: {r: 4}\nlearning_rates: [2e-4, 1e-3]\n")
    cfg = TrainingConfig.from_yaml(path, overrides=["max_steps=7", "lora.r=8", "data.block_size=64"])
    assert cfg.learning_rates == [2e-4, 1e-3]
    assert cfg.max_steps == 7 and cfg.runs[0].lora.r == 8 and cfg.data.block_size == 64
    assert cfg.runs[0].name == "lora"


@pytest.mark.parametrize("name", ["smoke", "quick", "compare", "compare_gpu"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = TrainingConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    assert {run.method for run in cfg.runs} == {"gin", "lora"}
