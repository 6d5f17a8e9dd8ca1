"""gin_adapter.compare.budget: LoRA counted analytically, GIN counted by wrapping, ranks/hidden sizes matched within 5 %."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gin_adapter.compare.budget import (
    count_gin_parameters,
    lora_parameters_per_rank,
    match_budget,
    plan_runs,
    relative_difference,
    skeleton_model,
)
from gin_adapter.compare.config import TrainingConfig


def tiny_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**{**kwargs, **overrides})


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- counting
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]])
@pytest.mark.parametrize("rank", [1, 4])
def test_lora_count_per_rank_matches_peft(targets: list[str], rank: int) -> None:
    from peft import LoraConfig, get_peft_model

    config = tiny_config()
    per_rank = lora_parameters_per_rank(skeleton_model(config), targets)
    torch.manual_seed(0)
    peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM"))
    assert rank * per_rank == trainable(peft_model)


def test_lora_per_rank_by_hand() -> None:
    # q: 48 -> 48, v: 48 -> 24 (2 KV heads x head_dim 12); 3 layers
    assert lora_parameters_per_rank(skeleton_model(tiny_config()), ["q_proj", "v_proj"]) == 3 * ((48 + 48) + (48 + 24))


def test_lora_targets_that_match_nothing_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"lora.target_modules=\['c_attn'\] match no Linear module.*'q_proj'"):
        lora_parameters_per_rank(skeleton_model(tiny_config()), ["c_attn"])


def test_gin_count_by_wrapping_a_meta_skeleton_matches_a_real_model() -> None:
    from gin_adapter import GinConfig, get_gin_model

    config = tiny_config()
    for hidden in (4, 16):
        real = get_gin_model(LlamaForCausalLM(config), GinConfig(hidden_dim=hidden))
        assert count_gin_parameters(config, {"hidden_dim": hidden}) == trainable(real)


# ----------------------------------------------------------------------------- matching
def test_rank_is_the_closest_integer_when_it_fits() -> None:
    m = match_budget(lambda h: 1000 * h + 37, hidden_dim=10, lora_per_rank=500, tolerance=0.05)
    assert (m.rank, m.hidden_dim, m.hidden_dim_adjusted) == (20, 10, False)
    assert m.gin_params == 10037 and m.lora_params == 10000
    assert m.relative_difference == pytest.approx(37 / 10037)


def test_hidden_dim_is_adjusted_when_no_rank_fits() -> None:
    # GIN budget 405 < one LoRA rank (1000): rank 1 misses by 147 %, so hidden_dim grows until GIN ~ 1000
    m = match_budget(lambda h: 100 * h + 5, hidden_dim=4, lora_per_rank=1000, tolerance=0.05)
    assert m.hidden_dim_adjusted and m.rank == 1 and m.hidden_dim == 10
    assert relative_difference(m.lora_params, m.gin_params) <= 0.05


def test_fixed_rank_moves_only_the_hidden_dim() -> None:
    m = match_budget(lambda h: 100 * h, hidden_dim=50, lora_per_rank=1000, tolerance=0.05, rank=3)
    assert m.rank == 3 and m.hidden_dim == 30 and m.relative_difference == 0


def test_no_fitting_pair_is_a_clear_error() -> None:
    # counts jump by 4x between neighbouring hidden sizes, and 1 % is asked for
    with pytest.raises(ValueError, match=r"no LoRA rank / GIN hidden_dim pair matches within budget.tolerance=1%"):
        match_budget(lambda h: 1000 * h * h, hidden_dim=1, lora_per_rank=2500, tolerance=0.01)


def test_plan_runs_matches_lora_to_gin_within_five_percent() -> None:
    cfg = TrainingConfig.from_dict({
        "runs": [{"name": "gin", "method": "gin", "gin": {"hidden_dim": 16}},
                 {"name": "lora", "method": "lora"},
                 {"name": "lora_all", "method": "lora", "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
                 {"name": "ref", "method": "gin", "gin": {"hidden_dim": 16, "graph": "reference"}}],
    })
    plans, record = plan_runs(cfg, tiny_config())
    gin = plans["gin"].trainable_params
    for name in ("lora", "lora_all", "ref"):
        assert relative_difference(plans[name].trainable_params, gin) <= 0.05, (name, plans[name])
    assert plans["lora"].lora_rank > plans["lora_all"].lora_rank >= 1
    assert plans["lora"].lora_alpha == 2 * plans["lora"].lora_rank
    assert record["trainable_params"]["gin"] == gin and record["reference"] == "gin"


def test_plan_runs_rejects_unknown_gin_fields() -> None:
    cfg = TrainingConfig.from_dict({"runs": [{"name": "gin", "method": "gin", "gin": {"hidden_size": 16}}]})
    with pytest.raises(ValueError, match=r"runs\[0\]\.gin has a field GinConfig does not know"):
        plan_runs(cfg, tiny_config())


@pytest.mark.integration
@pytest.mark.parametrize("name", ["smoke", "quick", "compare", "compare_gpu"])
def test_shipped_configs_have_matched_budgets_on_the_embedded_model(name: str) -> None:
    from pathlib import Path

    from transformers import AutoConfig

    from gin_adapter.embedded import resolve_model_path

    cfg = TrainingConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    plans, record = plan_runs(cfg, AutoConfig.from_pretrained(resolve_model_path(cfg.model)))
    assert all(diff <= 0.05 for diff in record["relative_difference_to_reference"].values()), record


def test_rank_only_matching_raises_instead_of_moving_the_hidden_dim() -> None:
    with pytest.raises(ValueError, match=r"no LoRA rank matches GIN hidden_dim=4 \(405 parameters\) within budget.tolerance=5%"):
        match_budget(lambda h: 100 * h + 5, hidden_dim=4, lora_per_rank=1000, tolerance=0.05, adjust_hidden_dim=False)


def test_matching_that_would_move_another_budgets_reference_is_a_clear_error() -> None:
    """Two GIN references share hidden_dim=1; one rank of LoRA on every linear layer is 5x gin_a's budget, so matching
    it would have to grow hidden_dim, which would move the second budget's reference too: refused, saying what to do."""
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = TrainingConfig.from_dict({
        "runs": [{"name": "gin_a", "method": "gin", "gin": {"hidden_dim": 1}},
                 {"name": "lora_a", "method": "lora", "budget_reference": "gin_a", "lora": {"target_modules": every_linear}},
                 {"name": "gin_b", "method": "gin", "gin": {"hidden_dim": 1, "graph": "reference"}},
                 {"name": "lora_b", "method": "lora", "budget_reference": "gin_b"}],
    })
    with pytest.raises(ValueError, match=r"needs hidden_dim \d+ instead of 1, which would also move another budget's reference "
                                         r"\(\['gin_b'\]\); give 'gin_a' its own hidden_dim, set lora.r explicitly"):
        plan_runs(cfg, tiny_config())
