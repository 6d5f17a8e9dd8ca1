"""Matched parameter budgets: choose the LoRA rank (or the GIN hidden size) so both train as many parameters.

* GIN parameters are counted by actually wrapping a weightless copy of the model (built on the ``meta``
  device from its config, so a 3B model costs nothing): :func:`count_gin_parameters`.
* LoRA parameters are counted analytically: a rank-``r`` LoRA on a ``Linear(in, out)`` trains
  ``r * (in + out)`` parameters, so :func:`lora_parameters_per_rank` sums ``in + out`` over the targeted
  Linear modules (matched the way PEFT matches ``target_modules``).
* :func:`match_budget` picks the integer rank closest to the GIN count; if even the best rank misses the
  tolerance (e.g. the GIN budget is below one rank), it searches the GIN ``hidden_dim`` instead, and raises a
  ``ValueError`` explaining both counts when no pair fits.

The relative difference is ``|lora - gin| / gin`` (the GIN run is the reference).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "BudgetMatch",
    "RunPlan",
    "plan_runs",
    "relative_difference",
    "count_gin_parameters",
    "lora_parameters_per_rank",
    "match_budget",
    "skeleton_model",
]


@dataclass(frozen=True)
class BudgetMatch:
    """The outcome of :func:`match_budget`."""

    rank: int
    hidden_dim: int
    gin_params: int
    lora_params: int
    lora_params_per_rank: int
    relative_difference: float
    hidden_dim_adjusted: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"GIN hidden_dim={self.hidden_dim}: {self.gin_params:,} trainable params | LoRA r={self.rank}: "
            f"{self.lora_params:,} trainable params | difference {100 * self.relative_difference:.2f} %"
            + (" (GIN hidden_dim adjusted to fit)" if self.hidden_dim_adjusted else "")
        )


def relative_difference(lora_params: int, gin_params: int) -> float:
    """``|lora - gin| / gin``."""
    return abs(lora_params - gin_params) / max(gin_params, 1)


# ----------------------------------------------------------------------------- counting
def skeleton_model(model_config: Any) -> nn.Module:
    """A weightless (``meta`` device) causal LM built from ``model_config``: cheap to wrap and count."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def gin_config(fields: dict[str, Any]) -> Any:
    """A run's ``gin:`` block as a :class:`~gin_adapter.GinConfig`; ``preset: published`` starts from
    :meth:`GinConfig.published <gin_adapter.GinConfig.published>` and the other fields override it."""
    from gin_adapter import GinConfig

    rest = {k: v for k, v in fields.items() if k != "preset"}
    return GinConfig.published(**rest) if fields.get("preset") == "published" else GinConfig(**rest)


def peft_config(fields: dict[str, Any]) -> Any:
    """A run's ``peft:`` block as a PEFT config (``peft.get_peft_config``), causal-LM task unless it says otherwise."""
    from peft import get_peft_config

    return get_peft_config({"task_type": "CAUSAL_LM", **fields})


def count_gin_parameters(model_config: Any, gin_kwargs: dict[str, Any]) -> int:
    """Trainable parameters of a GIN adapter with the ``gin:`` fields ``gin_kwargs`` on the model ``model_config``
    describes.

    Counted by wrapping a ``meta``-device skeleton with :func:`gin_adapter.get_gin_model`, so the count is exactly
    what training will see.
    """
    from gin_adapter import count_trainable_parameters, get_gin_model

    return count_trainable_parameters(get_gin_model(skeleton_model(model_config), gin_config(gin_kwargs)))


def count_peft_parameters(model_config: Any, peft_fields: dict[str, Any]) -> int:
    """Trainable parameters of any PEFT method (a ``peft:`` block) on a ``meta``-device skeleton of the model."""
    from peft import get_peft_model

    from gin_adapter import count_trainable_parameters

    return count_trainable_parameters(get_peft_model(skeleton_model(model_config), peft_config(peft_fields)))


def _peft_target_match(module_name: str, targets: list[str]) -> bool:
    # PEFT's rule for a list of target names: the full name, or its last dotted components, equals a target.
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def lora_parameters_per_rank(model: nn.Module, target_modules: list[str]) -> int:
    """Sum of ``in_features + out_features`` over the Linear modules LoRA would adapt (trainable params per rank).

    Raises:
        ValueError: if no Linear module matches ``target_modules`` (lists the Linear module names that exist).
    """
    total = 0
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear_names.add(name.rsplit(".", 1)[-1])
            if _peft_target_match(name, list(target_modules)):
                total += module.in_features + module.out_features
    if total == 0:
        raise ValueError(
            f"lora.target_modules={list(target_modules)} match no Linear module of the model; "
            f"Linear module names present: {sorted(linear_names)}."
        )
    return total


# ----------------------------------------------------------------------------- matching
def match_budget(
    gin_params_for: Callable[[int], int],
    hidden_dim: int,
    lora_per_rank: int,
    tolerance: float = 0.05,
    rank: int | None = None,
    max_hidden_dim: int = 8192,
    adjust_hidden_dim: bool = True,
) -> BudgetMatch:
    """Choose ``(rank, hidden_dim)`` with ``|lora - gin| / gin <= tolerance``.

    Args:
        gin_params_for: trainable GIN parameters as a function of ``hidden_dim`` (non-decreasing).
        hidden_dim: the configured GIN hidden size (kept whenever a rank fits it).
        lora_per_rank: LoRA trainable parameters per unit of rank.
        tolerance: largest allowed relative difference.
        rank: a fixed LoRA rank (then only ``hidden_dim`` may move).
        max_hidden_dim: upper end of the hidden-size search.
        adjust_hidden_dim: if False, only the rank may move (step 2 is skipped).

    Raises:
        ValueError: if no rank / hidden size pair is within ``tolerance``.
    """
    if lora_per_rank <= 0:
        raise ValueError(f"LoRA parameters per rank must be positive, got {lora_per_rank}.")
    cache: dict[int, int] = {}

    def gin(h: int) -> int:
        if h not in cache:
            cache[h] = int(gin_params_for(h))
        return cache[h]

    def result(r: int, h: int, adjusted: bool) -> BudgetMatch:
        return BudgetMatch(r, h, gin(h), r * lora_per_rank, lora_per_rank, relative_difference(r * lora_per_rank, gin(h)), adjusted)

    # 1. Keep the GIN size; pick the closest integer rank.
    base = gin(hidden_dim)
    ranks = [rank] if rank is not None else sorted({max(1, math.floor(base / lora_per_rank)), max(1, math.ceil(base / lora_per_rank))})
    best = min((result(r, hidden_dim, False) for r in ranks), key=lambda m: m.relative_difference)
    if best.relative_difference <= tolerance:
        return best
    if not adjust_hidden_dim:
        raise ValueError(
            f"no LoRA rank matches GIN hidden_dim={hidden_dim} ({base:,} parameters) within budget.tolerance={tolerance:.0%}: "
            f"LoRA trains {lora_per_rank:,} per rank, the closest (r={best.rank}) differs by {best.relative_difference:.1%}."
        )

    # 2. Keep each candidate rank; search the GIN hidden size whose count is closest to the LoRA count.
    candidates = []
    for r in ranks:
        h = _closest_hidden_dim(gin, r * lora_per_rank, max_hidden_dim)
        candidates.append(result(r, h, h != hidden_dim))
    fitting = [m for m in candidates if m.relative_difference <= tolerance]
    if fitting:
        return min(fitting, key=lambda m: (abs(m.hidden_dim - hidden_dim), m.relative_difference))
    closest = min(candidates, key=lambda m: m.relative_difference)
    raise ValueError(
        f"no LoRA rank / GIN hidden_dim pair matches within budget.tolerance={tolerance:.0%}: GIN hidden_dim={hidden_dim} trains "
        f"{base:,} parameters and LoRA trains {lora_per_rank:,} per rank; the closest pair (r={closest.rank}, "
        f"hidden_dim={closest.hidden_dim}: {closest.lora_params:,} vs {closest.gin_params:,}) differs by "
        f"{closest.relative_difference:.1%}. Raise budget.tolerance, change lora.target_modules, or set lora.r explicitly "
        "with budget.match: false."
    )


def _closest_hidden_dim(gin: Callable[[int], int], target: int, max_hidden_dim: int) -> int:
    """The hidden size in ``[1, max_hidden_dim]`` whose GIN count is closest to ``target`` (binary search)."""
    lo, hi = 1, max_hidden_dim
    if gin(hi) <= target:
        return hi
    while lo < hi:  # smallest h with gin(h) >= target
        mid = (lo + hi) // 2
        if gin(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return min({lo, max(1, lo - 1)}, key=lambda h: (abs(gin(h) - target), h))


# ----------------------------------------------------------------------------- per-experiment plan
@dataclass
class RunPlan:
    """What one run of an experiment trains, after budget matching."""

    name: str
    method: str
    gin: dict[str, Any] | None
    lora_rank: int | None
    lora_alpha: float | None
    lora_target_modules: list[str] | None
    lora_dropout: float | None
    trainable_params: int
    peft: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_runs(cfg: Any, model_config: Any) -> tuple[dict[str, RunPlan], dict[str, Any]]:
    """Resolve every run of a :class:`~gin_adapter.compare.config.TrainingConfig` to concrete sizes.

    LoRA runs with ``lora.r: null`` get the rank that matches the reference GIN run (``budget.reference``, default
    the first GIN run). If no rank fits within ``budget.tolerance``, the reference run's ``hidden_dim`` is adjusted
    (and so is that of every GIN run that shared it). Returns the plans by run name and a JSON-able budget record.

    Raises:
        ValueError: a run's ``gin:`` block is not a valid ``GinConfig``, or no budget pair fits.
    """
    from gin_adapter import GinConfig

    gin_kwargs: dict[str, dict[str, Any]] = {}
    for i, run in enumerate(cfg.runs):
        if run.method == "gin":
            try:
                gin_kwargs[run.name] = _gin_fields(gin_config(run.gin), run.gin)
            except TypeError as exc:
                valid = sorted(f for f in GinConfig.__dataclass_fields__ if not f.startswith("_"))
                raise ValueError(f"runs[{i}].gin has a field GinConfig does not know ({exc}); valid fields include {valid}.") from exc
            except ValueError as exc:
                raise ValueError(f"runs[{i}].gin (run {run.name!r}): {exc}") from exc

    skeleton = skeleton_model(model_config)
    gin_runs = [run for run in cfg.runs if run.method == "gin"]
    reference = next((run for run in gin_runs if run.name == cfg.budget.reference), gin_runs[0] if gin_runs else None)
    ranks = {run.name: run.lora.r for run in cfg.runs if run.method == "lora"}
    record: dict[str, Any] = {"tolerance": cfg.budget.tolerance, "reference": reference.name if reference else None, "matches": {}}
    auto = [run for run in cfg.runs if run.method == "lora" and run.lora.r is None and cfg.budget.match]
    groups: dict[str, list[Any]] = {}  # GIN run name -> the LoRA runs whose rank matches its parameter count
    for run in auto:
        groups.setdefault(run.budget_reference or reference.name, []).append(run)
    for ref_name, group in groups.items():
        _match_group(cfg, model_config, skeleton, ref_name, group, gin_kwargs, ranks, record, fixed=set(groups) - {ref_name})

    plans: dict[str, RunPlan] = {}
    for run in cfg.runs:
        if run.method == "gin":
            kwargs = gin_kwargs[run.name]
            plans[run.name] = RunPlan(run.name, "gin", kwargs, None, None, None, None, count_gin_parameters(model_config, kwargs))
        elif run.method == "peft":
            try:
                count = count_peft_parameters(model_config, run.peft)
            except (TypeError, ValueError, KeyError) as exc:
                raise ValueError(f"run {run.name!r}: peft: {run.peft} is not a valid PEFT config for this model ({exc}).") from exc
            plans[run.name] = RunPlan(run.name, "peft", None, None, None, None, None, count, peft=dict(run.peft))
        else:
            rank = ranks[run.name]
            per_rank = lora_parameters_per_rank(skeleton, run.lora.target_modules)
            alpha = run.lora.alpha if run.lora.alpha is not None else 2 * rank
            plans[run.name] = RunPlan(run.name, "lora", None, rank, alpha, list(run.lora.target_modules), run.lora.dropout, rank * per_rank)
    record["trainable_params"] = {name: plan.trainable_params for name, plan in plans.items()}
    if reference is not None:
        ref_params = plans[reference.name].trainable_params
        record["relative_difference_to_reference"] = {
            name: relative_difference(plan.trainable_params, ref_params) for name, plan in plans.items()
        }
    return plans, record


def _match_group(cfg: Any, model_config: Any, skeleton: nn.Module, ref_name: str, group: list[Any], gin_kwargs: dict[str, dict[str, Any]],
                 ranks: dict[str, int | None], record: dict[str, Any], fixed: set[str] = frozenset()) -> None:
    """Ranks for the LoRA runs of ``group`` matching GIN run ``ref_name`` (written into ``ranks`` and ``record``).

    Keeps the configured hidden_dim if every LoRA run finds a fitting rank; otherwise tries the hidden sizes that make
    each LoRA run fit (match_budget's search) and keeps the one closest to the configured size that fits all; GIN
    runs that shared the reference's hidden_dim (and its preset) follow it, except the references of other groups
    (``fixed``), whose LoRA ranks were matched to their own size.
    """
    ref_kwargs = gin_kwargs[ref_name]
    per_rank = {run.name: lora_parameters_per_rank(skeleton, run.lora.target_modules) for run in group}

    @functools.cache
    def gin_count(h: int) -> int:
        return count_gin_parameters(model_config, {**ref_kwargs, "hidden_dim": h})

    def matches_at(h: int) -> dict[str, BudgetMatch]:
        return {run.name: match_budget(gin_count, h, per_rank[run.name], cfg.budget.tolerance, adjust_hidden_dim=False) for run in group}

    original = ref_kwargs["hidden_dim"]
    candidates = [original] + sorted({match_budget(gin_count, original, per_rank[r.name], cfg.budget.tolerance).hidden_dim
                                      for r in group} - {original}, key=lambda h: abs(h - original))
    chosen, errors = None, []
    for h in candidates:
        try:
            chosen = (h, matches_at(h))
            break
        except ValueError as exc:
            errors.append(str(exc))
    if chosen is None:
        raise ValueError(errors[-1])
    hidden, found = chosen
    for name, match in found.items():
        ranks[name] = match.rank
        record["matches"][name] = {"reference": ref_name, **match.to_dict(), "hidden_dim_adjusted": hidden != original}
    if hidden != original:
        if fixed & {name for name, kwargs in gin_kwargs.items() if kwargs["hidden_dim"] == original and name != ref_name}:
            raise ValueError(
                f"matching the LoRA run(s) {[run.name for run in group]} to {ref_name!r} needs hidden_dim {hidden} instead of "
                f"{original}, which would also move another budget's reference ({sorted(fixed)}); give {ref_name!r} its own "
                "hidden_dim, set lora.r explicitly, or raise budget.tolerance."
            )
        for kwargs in gin_kwargs.values():
            if kwargs["hidden_dim"] == original and kwargs.get("preset") == ref_kwargs.get("preset"):
                kwargs["hidden_dim"] = hidden


def _gin_fields(config: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The given GinConfig fields plus ``hidden_dim`` (always explicit so it can be matched and recorded)."""
    return {**given, "hidden_dim": int(config.hidden_dim)}
