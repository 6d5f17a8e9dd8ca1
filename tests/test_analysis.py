"""Tests for gin_adapter.analysis: attention as message passing, the GAT sparsity sweep, the CLI.

Tiny random Llama / Qwen2 / GPT-2 models built from configs (seconds each). The
initializer range is raised to 0.2 so that attention is far from uniform and
the sparsification rules actually bite.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AttentionInterface,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface

from gin_adapter import analysis
from gin_adapter.analysis import (
    CAPTURE_IMPL,
    GAT_IMPL,
    attention_as_message_passing,
    layer_attention_probabilities,
    build_attention_graph,
    evaluate_perplexity,
    gat_sparsity_sweep,
    sparsify_attention,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VOCAB, T, HEADS = 128, 12, 4


def _tiny(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=2, initializer_range=0.2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attn))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation=attn))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=HEADS, n_positions=64,
                                           initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                                           attn_implementation=attn))
    else:  # pragma: no cover
        raise ValueError(arch)
    return model.eval()


def _batch(left_pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :5] = 0
        ids[1, :5] = 1  # pad id
    return ids, mask


def _reference_perplexity(model: torch.nn.Module, batches: list[dict]) -> float:
    """exp(total NLL / label tokens) from a plain forward, written independently of the library."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = b["input_ids"][:, 1:].clone()
            labels[(b["attention_mask"][:, 1:] == 0) | (b["attention_mask"][:, :-1] == 0)] = -100
            total += F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    return math.exp(total / count)


def _eval_batches() -> list[dict]:
    ids0, m0 = _batch(left_pad=False)
    ids1, m1 = _batch(left_pad=True)
    return [{"input_ids": ids0, "attention_mask": m0}, {"input_ids": ids1, "attention_mask": m1}]


# --------------------------------------------------------------------------- building blocks


def test_sparsify_attention_hand_numbers() -> None:
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.5, 0.3, 0.2]]]])
    allowed = torch.ones(3, 3).tril().bool()[None, None]
    top1, keep1 = sparsify_attention(probs, allowed, "topk", 1)
    assert torch.equal(top1[0, 0], torch.eye(3)[[0, 0, 0]])
    assert int(keep1.sum()) == 3
    top2, keep2 = sparsify_attention(probs, allowed, "topk", 2)
    assert torch.allclose(top2[0, 0, 2], torch.tensor([0.625, 0.375, 0.0]))
    assert int(keep2.sum()) == 5  # rows keep 1, 2, 2 edges
    thr, keep_t = sparsify_attention(probs, allowed, "threshold", 0.25)
    assert torch.allclose(thr[0, 0, 2], torch.tensor([0.625, 0.375, 0.0]))
    assert torch.allclose(thr[0, 0, 1], torch.tensor([0.6, 0.4, 0.0]))
    only_max, keep_m = sparsify_attention(probs, allowed, "threshold", 0.99)
    assert torch.equal(keep_m.sum(-1)[0, 0], torch.tensor([1, 1, 1]))  # the max always survives
    dense, keep_d = sparsify_attention(probs, allowed, "dense", None)
    assert torch.allclose(dense, probs) and int(keep_d.sum()) == 6
    with pytest.raises(ValueError, match="rule"):
        sparsify_attention(probs, allowed, "random", 1)
    with pytest.raises(ValueError, match="k >= 1"):
        sparsify_attention(probs, allowed, "topk", 0)


def test_attention_probabilities_padding_and_causality() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)  # GQA: 2 query heads share 1 KV head
    probs, allowed = layer_attention_probabilities(q, k, None, 0.5)
    assert torch.equal(allowed[0, 0], torch.ones(4, 4).tril().bool())
    assert torch.allclose(probs.sum(-1), torch.ones(1, 2, 4))
    assert float(probs.triu(1).abs().max()) == 0.0
    expected = torch.softmax((q[0, 1] @ k[0, 0].T * 0.5).masked_fill(~allowed[0, 0], float("-inf")), -1)
    assert torch.allclose(probs[0, 1], expected, atol=1e-6)
    pad = torch.ones(1, 1, 4, 4).tril().bool()
    pad[..., 0] = False  # token 0 is padding: query 0 has no key left
    probs_p, _ = layer_attention_probabilities(q, k, pad, 0.5)
    assert float(probs_p[0, :, 0].abs().sum()) == 0.0
    assert torch.allclose(probs_p[0, :, 1:].sum(-1), torch.ones(2, 3))


def test_build_attention_graph_direction() -> None:
    probs = torch.ones(1, 1, 3, 3).tril()
    probs = probs / probs.sum(-1, keepdim=True)
    edge_index, weight = build_attention_graph(probs, probs > 0)
    assert edge_index.shape == (2, 6)
    assert bool((edge_index[0] <= edge_index[1]).all())  # source = key j <= target = query i
    assert sorted(edge_index.t().tolist()) == [[0, 0], [0, 1], [0, 2], [1, 1], [1, 2], [2, 2]]
    assert torch.allclose(weight.sum(), torch.tensor(3.0))


# --------------------------------------------------------------------------- experiment 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_message_passing_matches_model_attention(arch: str, left_pad: bool) -> None:
    model = _tiny(arch)
    ids, mask = _batch(left_pad)
    report = attention_as_message_passing(model, ids, mask)
    assert [r["layer"] for r in report] == [0, 1]
    for r in report:
        assert r["max_abs_diff"] < 1e-5, r
        assert r["max_abs_output"] > 0.1  # the comparison is not between zeros
        real = mask.sum(1).tolist()
        assert r["num_edges"] == HEADS * sum(n * (n + 1) // 2 for n in real)
        assert r["num_nodes"] == 2 * HEADS * T
    assert model.config._attn_implementation == "sdpa"
    assert CAPTURE_IMPL not in AttentionInterface._global_mapping
    assert CAPTURE_IMPL not in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("arch,attn", [("llama", "eager"), ("gpt2", "sdpa"), ("gpt2", "eager")])
def test_message_passing_other_implementations(arch: str, attn: str) -> None:
    model = _tiny(arch, attn)
    ids, mask = _batch(left_pad=True)
    report = attention_as_message_passing(model, ids, mask)
    assert len(report) == 2
    assert max(r["max_abs_diff"] for r in report) < 1e-5
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("arch,attn", [("qwen3", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager"), ("gemma3", "sdpa")])
def test_message_passing_more_families(make_model, arch: str, attn: str) -> None:
    """Families from conftest: q/k norms (Qwen3), logit soft-capping + sliding windows (Gemma 2/3)."""
    model = make_model(arch, attn)
    ids, mask = _batch(left_pad=True)  # T = 12 > sliding window 8 of the Gemma configs
    report = attention_as_message_passing(model, ids, mask)
    assert len(report) == model.config.num_hidden_layers
    assert max(r["max_abs_diff"] for r in report) < 1e-5
    assert model.config._attn_implementation == attn


# --------------------------------------------------------------------------- experiment 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_sweep_equals_plain_forward(arch: str) -> None:
    model = _tiny(arch)
    batches = _eval_batches()
    reference = _reference_perplexity(model, batches)
    (dense,) = gat_sparsity_sweep(model, batches, [])
    assert dense["rule"] == "dense" and dense["param"] is None
    assert dense["tokens"] == 3 * (T - 1) + (T - 5 - 1)  # two full rows, one full + one left-padded
    assert dense["perplexity"] == pytest.approx(reference, rel=1e-5)
    assert dense["edge_fraction"] == 1.0
    assert evaluate_perplexity(model, batches)["perplexity"] == pytest.approx(reference, rel=1e-6)
    assert model.config._attn_implementation == "sdpa"


def test_topk_sweep() -> None:
    model = _tiny("llama")
    batches = _eval_batches()
    ks = [T, 8, 4, 2, 1]
    results = gat_sparsity_sweep(model, batches, [("topk", k) for k in ks])
    dense, by_k = results[0], {r["param"]: r for r in results[1:]}
    assert by_k[T]["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-6)
    assert by_k[T]["edge_fraction"] == 1.0
    fractions = [by_k[k]["edge_fraction"] for k in ks]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] < fractions[1] < 1.0

    # top-k keeps min(k, #allowed) keys per row, so the fraction is known exactly:
    # per batch sum_rows sum_i min(k, i+1) / sum_rows sum_i (i+1), then the mean over batches
    real_lengths = [(T, T), (T, T - 5)]  # real tokens of each row, per batch

    def expected(k: int) -> float:
        ratios = [sum(min(k, i + 1) for n in rows for i in range(n)) / sum(i + 1 for n in rows for i in range(n))
                  for rows in real_lengths]
        return sum(ratios) / len(ratios)

    for k in ks:
        assert by_k[k]["edge_fraction"] == pytest.approx(expected(k), rel=1e-12)
        assert by_k[k]["edge_fraction_per_layer"] == pytest.approx([expected(k)] * 2, rel=1e-12)
    assert by_k[1]["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-3)


def test_threshold_sweep() -> None:
    model = _tiny("qwen2")
    batches = _eval_batches()
    ts = [0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
    results = gat_sparsity_sweep(model, batches, [("threshold", t) for t in ts], include_dense=False)
    assert [r["rule"] for r in results] == ["threshold"] * len(ts)
    by_t = {r["param"]: r for r in results}
    dense_ppl = _reference_perplexity(model, batches)
    assert by_t[0.0]["edge_fraction"] == 1.0
    assert by_t[0.0]["perplexity"] == pytest.approx(dense_ppl, rel=1e-5)
    fractions = [by_t[t]["edge_fraction"] for t in ts]
    assert all(a >= b for a, b in zip(fractions, fractions[1:]))
    layer0 = [by_t[t]["edge_fraction_per_layer"][0] for t in ts]  # same inputs for every t
    assert all(a >= b for a, b in zip(layer0, layer0[1:]))
    assert fractions[-1] < 0.5
    # every real query keeps at least its maximum: >= (real rows / allowed edges) per batch
    lower = ((2 * T) / (2 * T * (T + 1) / 2) + (2 * T - 5) / (T * (T + 1) / 2 + (T - 5) * (T - 4) / 2)) / 2
    assert min(by_t[0.8]["edge_fraction_per_layer"]) >= lower


def test_attention_implementation_restored_after_error() -> None:
    model = _tiny("llama")
    bad = [{"input_ids": torch.full((1, 4), VOCAB + 5), "attention_mask": torch.ones(1, 4, dtype=torch.long)}]
    with pytest.raises(IndexError):
        gat_sparsity_sweep(model, bad, [("topk", 1)])
    assert model.config._attn_implementation == "sdpa"
    assert GAT_IMPL not in AttentionInterface._global_mapping
    assert GAT_IMPL not in AttentionMaskInterface._global_mapping
    model.train()
    gat_sparsity_sweep(model, _eval_batches()[:1], [("topk", 2)])
    assert model.training  # training flag restored too


def test_sweep_rejects_bad_rules_before_running() -> None:
    model = _tiny("llama")
    with pytest.raises(ValueError, match="rule"):
        gat_sparsity_sweep(model, _eval_batches(), [("bottomk", 2)])
    with pytest.raises(ValueError, match="threshold"):
        gat_sparsity_sweep(model, _eval_batches(), [("threshold", 1.5)])


# --------------------------------------------------------------------------- plots and CLI


def _write_results(run_dir) -> None:
    results = {
        "curves": {
            "gin": {"train_loss": [(s, 3.0 - 0.1 * s) for s in range(10)], "val_ppl": [(0, 20.0), (9, 15.0)]},
            "lora": {"train_loss": [(s, 3.1 - 0.09 * s) for s in range(10)], "val_ppl": [(0, 20.0), (9, 16.0)]},
        },
        "scale_history": {"gin": [(s, [0.5 * k / 5 + 0.01 * s for k in range(6)]) for s in range(0, 10, 3)]},
    }
    (run_dir / "results.json").write_text(json.dumps(results))


def test_plot_run(tmp_path) -> None:
    _write_results(tmp_path)
    paths = analysis.plot_run(tmp_path)
    assert [p.name for p in paths] == ["curves.png", "scales.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    with pytest.raises(FileNotFoundError):
        analysis.plot_run(tmp_path / "empty")


@pytest.fixture()
def saved_tiny_model(tmp_path):
    """A tiny Llama and a byte-level BPE tokenizer trained here, saved as a local folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "the cat sat on the mat. graphs are everywhere, attention is message passing on a graph. "
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text] * 20, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<pad>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    assert len(tokenizer) <= VOCAB
    path = tmp_path / "tiny-llama"
    _tiny("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    (tmp_path / "eval.txt").write_text(text * 8)
    return path


def test_cli(saved_tiny_model, tmp_path, capsys) -> None:
    assert analysis.main(["message-passing", "--model", str(saved_tiny_model), "--text", "the cat sat on the mat"]) == 0
    out = capsys.readouterr().out
    assert "worst max |diff|" in out
    worst = float(out.strip().splitlines()[-1].split()[-1])
    assert worst < 1e-5

    out_dir = tmp_path / "sparsity"
    rc = analysis.main([
        "gat-sparsity", "--model", str(saved_tiny_model), "--out", str(out_dir), "--text-file",
        str(tmp_path / "eval.txt"), "--max-tokens", "64", "--block-size", "16", "--batch-size", "2",
        "--topk", "1,4", "--thresholds", "0.1",
    ])
    assert rc == 0
    data = json.loads((out_dir / "sparsity.json").read_text())
    assert data["tokens"] == 64
    assert [(r["rule"], r["param"]) for r in data["results"]] == [
        ("dense", None), ("topk", 1), ("topk", 4), ("threshold", 0.1)]
    assert data["results"][1]["edge_fraction"] < data["results"][2]["edge_fraction"] < 1.0
    assert (out_dir / "sparsity.png").read_bytes()[:8] == PNG_MAGIC

    _write_results(out_dir)
    assert analysis.main(["plots", str(out_dir)]) == 0
    assert {p.name for p in out_dir.glob("*.png")} == {"curves.png", "scales.png", "sparsity.png"}


# --------------------------------------------------------------------------- embedded model


@pytest.mark.integration
def test_message_passing_embedded_smollm2() -> None:
    try:
        from gin_adapter.embedded import resolve_model_path
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"gin_adapter.embedded not importable yet: {exc}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("embedded")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    enc = tokenizer(["Attention is message passing on a complete graph.", "Graphs."],
                    return_tensors="pt", padding=True)
    assert int(enc["attention_mask"].sum()) < enc["attention_mask"].numel()  # left padding present
    report = attention_as_message_passing(model, enc["input_ids"], enc["attention_mask"])
    assert len(report) == model.config.num_hidden_layers == 30
    assert max(r["max_abs_diff"] for r in report) < 1e-5
    assert min(r["max_abs_output"] for r in report) > 0.1
    assert model.config._attn_implementation == "sdpa"
