"""What ``train.py`` trains: a trial (one run of the config at one learning rate and seed) and the methods.

``WRAPPERS`` is the method registry: ``method: <name>`` in a config wraps the freshly loaded base model with
``WRAPPERS[name]``. A new comparison arm also needs its name in ``config.METHODS`` (with its settings block),
its parameter count in ``budget.plan_runs`` and, if it starts as the base model, a case in
:func:`starts_as_identity`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .budget import RunPlan
from .config import RunConfig, TrainingConfig


@dataclass
class Trial:
    """One training job: a run of the config at one learning rate and seed."""

    run: RunConfig
    plan: RunPlan
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.run.name}__lr{self.lr:g}__seed{self.seed}"


def trials(cfg: TrainingConfig, plans: dict[str, RunPlan]) -> list[Trial]:
    """Every run x learning rate x seed, in config order."""
    return [Trial(run, plans[run.name], lr, seed) for run in cfg.runs for lr in cfg.learning_rates_for(run) for seed in cfg.seeds]


def load_base_model(cfg: TrainingConfig, model_path: str) -> torch.nn.Module:
    """The pretrained causal LM, freshly loaded (every trial starts from identical weights)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def _wrap_gin(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    from gin_adapter import GinConfig, get_gin_model

    return get_gin_model(model, GinConfig(**plan.gin))


def _wrap_lora(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha, target_modules=plan.lora_target_modules,
                      lora_dropout=plan.lora_dropout, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


WRAPPERS: dict[str, Callable[[torch.nn.Module, RunPlan], torch.nn.Module]] = {"gin": _wrap_gin, "lora": _wrap_lora}


def wrap_model(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    """Add the run's adapter; only adapter parameters stay trainable."""
    wrap = WRAPPERS.get(plan.method)
    if wrap is None:
        raise ValueError(f"method={plan.method!r} is not supported; use 'gin' or 'lora'.")
    return wrap(model, plan)


def starts_as_identity(plan: RunPlan) -> bool:
    """Whether the adapter leaves the base model unchanged at initialisation (LoRA's B = 0, GIN ``scale_init: zero``)."""
    return plan.method == "lora" or (plan.method == "gin" and plan.gin.get("scale_init", "zero") == "zero")


def gin_scales(model: torch.nn.Module) -> list[float] | None:
    """Per-layer learnable GIN scales of a (possibly wrapped) model, or None for other adapters."""
    from gin_adapter import gin_layers, layer_scales

    return layer_scales(model) if gin_layers(model) else None
