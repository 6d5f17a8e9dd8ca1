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

from .budget import RunPlan, gin_config, peft_config
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
    """The sweep: every run x learning rate x seed of ``seeds``, in config order (see :func:`next_trial` for the rest)."""
    return [Trial(run, plans[run.name], lr, seed) for run in cfg.runs for lr in cfg.learning_rates_for(run) for seed in cfg.seeds]


def sweep_grid(cfg: TrainingConfig, run: RunConfig, results: list[dict[str, Any]]) -> list[float]:
    """The run's learning rates so far: its configured grid plus the rates :func:`next_trial` added beyond an edge."""
    grid = cfg.learning_rates_for(run)
    added = {r["learning_rate"] for r in results if r["run"] == run.name and r["seed"] in cfg.seeds} - set(grid)
    return sorted(set(grid) | added)


def best_sweep_rate(cfg: TrainingConfig, run: RunConfig, results: list[dict[str, Any]]) -> float | None:
    """The rate with the lowest mean final validation perplexity over the sweep seeds (``None`` until all are done)."""
    mean: dict[float, float] = {}
    for lr in sweep_grid(cfg, run, results):
        ppls = [r["final_val_ppl"] for r in results if r["run"] == run.name and r["learning_rate"] == lr and r["seed"] in cfg.seeds]
        if len(ppls) < len(cfg.seeds):
            return None
        mean[lr] = sum(ppls) / len(ppls)
    return min(mean, key=mean.get)


def next_trial(cfg: TrainingConfig, plans: dict[str, RunPlan], results: list[dict[str, Any]]) -> Trial | None:
    """The next trial the study needs, given the finished ``results``; ``None`` when it is complete.

    In order: (1) the sweep (:func:`trials`); (2) for a run whose best rate sits at an edge of its grid, one more rate
    beyond that edge (by the grid's ratio), at most ``extend_grid`` times per run; (3) ``extra_seeds`` at each run's
    best rate. The plan depends only on finished trials, so a study stopped anywhere resumes where it stopped.
    """
    done = {r["trial"] for r in results}
    for trial in trials(cfg, plans):
        if trial.id not in done:
            return trial
    for run in cfg.runs:
        grid, best = sweep_grid(cfg, run, results), best_sweep_rate(cfg, run, results)
        added = len(grid) - len(cfg.learning_rates_for(run))
        if best is None or added >= cfg.extend_grid or best not in (grid[0], grid[-1]):
            continue
        ratio = grid[1] / grid[0] if len(grid) > 1 else 3.0
        lr = float(f"{(best * ratio if best == grid[-1] else best / ratio):.3g}")
        for seed in cfg.seeds:
            trial = Trial(run, plans[run.name], lr, seed)
            if trial.id not in done:
                return trial
    for run in cfg.runs:
        best = best_sweep_rate(cfg, run, results)
        for seed in cfg.extra_seeds:
            trial = Trial(run, plans[run.name], best, seed)
            if best is not None and trial.id not in done:
                return trial
    return None


def trial_from_id(cfg: TrainingConfig, plans: dict[str, RunPlan], trial_id: str) -> Trial:
    """The trial ``<run>__lr<rate>__seed<seed>`` of the config (any rate and seed, not only the schedule's)."""
    name, _, rest = trial_id.partition("__lr")
    rate, _, seed = rest.partition("__seed")
    runs = {run.name: run for run in cfg.runs}
    try:
        trial = Trial(runs[name], plans[name], float(rate), int(seed))
    except (KeyError, ValueError):
        raise ValueError(f"{trial_id!r} is not a trial of this config: expected <run>__lr<rate>__seed<seed> with run one of "
                         f"{sorted(runs)}, e.g. {Trial(cfg.runs[0], plans[cfg.runs[0].name], cfg.learning_rates_for(cfg.runs[0])[0], cfg.seeds[0]).id}") from None
    if trial.id != trial_id:
        raise ValueError(f"{trial_id!r} is not written as train.py writes trial ids; did you mean {trial.id!r}?")
    return trial


def load_base_model(cfg: TrainingConfig, model_path: str) -> torch.nn.Module:
    """The pretrained causal LM, freshly loaded (every trial starts from identical weights)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)


def _wrap_gin(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    from gin_adapter import get_gin_model

    return get_gin_model(model, gin_config(plan.gin))


def _wrap_lora(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha, target_modules=plan.lora_target_modules,
                      lora_dropout=plan.lora_dropout, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _wrap_peft(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config(plan.peft))


WRAPPERS: dict[str, Callable[[torch.nn.Module, RunPlan], torch.nn.Module]] = {"gin": _wrap_gin, "lora": _wrap_lora, "peft": _wrap_peft}


def wrap_model(model: torch.nn.Module, plan: RunPlan) -> torch.nn.Module:
    """Add the run's adapter; only adapter parameters stay trainable."""
    wrap = WRAPPERS.get(plan.method)
    if wrap is None:
        raise ValueError(f"method={plan.method!r} is not supported; use one of {sorted(WRAPPERS)}.")
    return wrap(model, plan)


IDENTITY_PEFT_TYPES = ("LORA", "IA3", "ADALORA", "LOHA", "LOKR", "LN_TUNING")
"""PEFT methods whose default initialisation leaves the model unchanged (LoRA-style zero B, IA3's unit vectors)."""


def starts_as_identity(plan: RunPlan) -> bool:
    """Whether the adapter leaves the base model unchanged at initialisation (LoRA's B = 0, IA3's ones, GIN
    ``scale_init: zero``; the published preset starts from its linear schedule, so not)."""
    if plan.method == "peft":
        return str(plan.peft.get("peft_type", "")).upper() in IDENTITY_PEFT_TYPES
    return plan.method == "lora" or (plan.method == "gin" and gin_config(plan.gin).scale_init == "zero")


def gin_scales(model: torch.nn.Module) -> list[float] | None:
    """Per-layer learnable GIN scales of a (possibly wrapped) model, or None for other adapters."""
    from gin_adapter import gin_layers, layer_scales

    return layer_scales(model) if gin_layers(model) else None
