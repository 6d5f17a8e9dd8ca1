"""The per-architecture checks, shared by tests/test_architectures.py and scripts/architecture_report.py.

For one model type: build it tiny (:mod:`tiny_models`), wrap it with the default ``GinConfig()`` (discovery, no
``target_modules``) and check

* identity at init: logits equal the base model's within ``ATOL``;
* the adapter acts: with every block's ``scale`` at 0.5 the logits move by more than ``MOVES``;
* causality: changing the later tokens leaves the earlier logits unchanged within ``ATOL``;
* training step: train mode, a loss with labels and its backward: finite, every block's scale gets a gradient;
* cached == uncached: each greedy step's logits with the KV cache equal a full uncached forward over the same
  tokens within ``ATOL_GENERATE``, and the cached tokens are that forward's argmax wherever the top two logits are
  further apart than the tolerance (a tiny random model has near-ties; tolerances, never exact float equality).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tiny_models import SPECIAL_IDS, _quiet, build

from gin_adapter import GinConfig, get_gin_model, gin_layers
from gin_adapter.discovery import NoAttentionError, find_attention_modules, text_config

ATOL = 1e-5
ATOL_GENERATE = 1e-4
MOVES = 1e-4
PROMPT, CHANGED_FROM, NEW_TOKENS = 10, 6, 6


@dataclass
class Case:
    """One model type, built and wrapped once (the test module caches it)."""

    model_type: str
    base_logits: torch.Tensor | None = None
    model: torch.nn.Module | None = None
    skip: str = ""  # cannot be built tiny: why
    refused: str = ""  # discovery refused it: its message
    wrapped: list[str] = field(default_factory=list)
    layer_indices: list[int] = field(default_factory=list)
    num_layers: int = 0
    seconds: float = 0.0


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def prepare(model_type: str) -> Case:
    """Build, run the base model once, wrap with discovery."""
    start = time.perf_counter()
    case = Case(model_type)
    base, why = build(model_type)
    if base is None:
        case.skip = why
        return case
    try:
        with torch.no_grad(), _quiet():
            case.base_logits = base(prompt()).logits.float()
    except Exception as error:  # noqa: BLE001 - the base model itself does not run tiny on a CPU
        case.skip = f"the tiny base model does not run: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        return case
    try:
        find_attention_modules(base)
    except NoAttentionError as error:
        case.refused = str(error)
        return case
    try:
        problem = generation_difference(base)
    except Exception as error:  # noqa: BLE001
        problem = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    if problem:  # a transformers limitation on this tiny model, not the adapter's
        case.skip = f"the base model's own cached generation fails here: {problem}"
        return case
    try:
        with _quiet():
            case.model = get_gin_model(base, GinConfig(hidden_dim=8)).eval()
    except NoAttentionError as error:
        case.refused = str(error)
        return case
    layers = gin_layers(case.model)
    case.wrapped = [name.removeprefix("base_model.model.") for name, m in case.model.named_modules() if m in layers]
    case.layer_indices = [layer.layer_index for layer in layers]
    case.num_layers = int(text_config(case.model.config).num_hidden_layers)
    case.seconds = time.perf_counter() - start
    return case


def set_scale(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for layer in gin_layers(model):
            for block in layer.gin_blocks.values():
                block.scale.fill_(value)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _quiet():
        return model(ids, use_cache=False).logits.float()


def check_identity(case: Case) -> None:
    set_scale(case.model, 0.0)
    difference = (logits(case.model, prompt()) - case.base_logits).abs().max().item()
    assert difference <= ATOL, f"{case.model_type}: wrapped model at scale 0 differs from the base by {difference:.2e}"


def check_adapter_acts(case: Case) -> None:
    set_scale(case.model, 0.5)
    moved = (logits(case.model, prompt()) - case.base_logits).abs().max().item()
    assert moved > MOVES, f"{case.model_type}: a non-zero adapter moved the logits by only {moved:.2e}"


def check_causality(case: Case) -> None:
    set_scale(case.model, 0.5)
    ids = prompt()
    changed = ids.clone()
    changed[:, CHANGED_FROM:] = torch.randint(3, 100, (1, PROMPT - CHANGED_FROM), generator=torch.Generator().manual_seed(9))
    early = (logits(case.model, ids)[:, :CHANGED_FROM] - logits(case.model, changed)[:, :CHANGED_FROM]).abs().max().item()
    assert early <= ATOL, f"{case.model_type}: changing tokens {CHANGED_FROM}+ moved earlier logits by {early:.2e}"


def _generate(model: torch.nn.Module, use_cache: bool):
    ids = prompt()
    pad = getattr(text_config(model.config), "pad_token_id", None)
    pad = pad[0] if isinstance(pad, list) else pad
    # models that derive positions from padding (RoBERTa) read a generated pad token as padding, and multimodal
    # models replace a placeholder token (Gemma 4's image/video/audio ids) by their media: never emit either
    suppress = sorted(set(SPECIAL_IDS) | ({pad} if pad is not None else set()))
    with torch.no_grad(), _quiet():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, use_cache=use_cache, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0 if pad is None else pad, suppress_tokens=suppress,
        )


def generation_difference(model: torch.nn.Module) -> str:
    """What differs between cached and uncached greedy generation ('' when nothing beyond the tolerance)."""
    cached, uncached = _generate(model, True), _generate(model, False)
    steps = torch.stack([step.float() for step in cached.logits], dim=1)  # (1, new, V): cached decoding
    full = logits(model, cached.sequences)[:, PROMPT - 1 : -1]  # (1, new, V): one uncached forward, same tokens
    difference = (steps - full).abs().max().item()
    if difference > ATOL_GENERATE:
        return f"cached step logits differ from an uncached forward by {difference:.2e}"
    a, b = cached.sequences[0, PROMPT:], uncached.sequences[0, PROMPT:]
    if not torch.equal(a, b):
        step = int((a != b).nonzero()[0])
        raw = uncached.logits[step][0].float()
        gap = (raw[a[step]] - raw[b[step]]).abs().item()
        if gap > 2 * ATOL_GENERATE:  # not a near-tie between the two choices: a real difference
            return f"cached and uncached greedy tokens differ at step {step} (logit gap {gap:.2e})"
    return ""


class BaseCannotTrain(Exception):
    """The tiny base model's own training step fails (a transformers limitation, not the adapter's)."""


def _training_loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.cat([prompt(0), prompt(1)])  # a batch of two, the model's own cache setting (as a Trainer calls it)
    with _quiet():
        loss = model(input_ids=ids, labels=ids).loss
    if loss.requires_grad:  # the base alone (adapter disabled) has nothing to train
        loss.backward()
    return loss


def check_training_step(case: Case) -> None:
    """A training step in train mode (where sdpa's call allows, the graph built with the attention, on the CPU in
    the compiled kernel): a finite loss and a finite gradient for every block's scale. Skipped (``BaseCannotTrain``)
    where the base model's own step fails with the adapter disabled."""
    model = case.model
    set_scale(model, 0.5)
    model.train()
    try:
        with model.disable_adapter():
            try:
                _training_loss(model)
            except Exception as error:  # noqa: BLE001
                raise BaseCannotTrain(f"the tiny base model's own training step fails: {type(error).__name__}: {' '.join(str(error).split())[:150]}") from error
        model.zero_grad(set_to_none=True)
        loss = _training_loss(model)
        scales = [block.scale for layer in gin_layers(model) for block in layer.gin_blocks.values() if block.scale.requires_grad]
        assert torch.isfinite(loss), f"{case.model_type}: training loss {loss.item()}"
        assert scales and all(s.grad is not None and torch.isfinite(s.grad).all() for s in scales), (
            f"{case.model_type}: a GIN block's scale got no finite gradient")
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def check_cached_generation(case: Case) -> None:
    set_scale(case.model, 0.5)
    problem = generation_difference(case.model)
    assert not problem, f"{case.model_type}: {problem}"


def check_hidden_features(case: Case) -> None:
    """A second adapter with ``node_features="hidden"`` (the decoder layer's input captured by a sub-module
    pre-hook, projected features kept beside the KV cache): identity at scale 0, causal, cached == uncached."""
    if "hidden" not in case.model.peft_config:
        with _quiet():
            case.model.add_adapter("hidden", GinConfig(hidden_dim=8, node_features="hidden"))
    case.model.set_adapter("hidden")
    try:
        check_identity(case)
        check_causality(case)
        check_cached_generation(case)
    finally:
        case.model.set_adapter("default")


CHECKS = {
    "identity at init": check_identity,
    "adapter changes the output": check_adapter_acts,
    "causal": check_causality,
    "cached == uncached generation": check_cached_generation,
    "training step": check_training_step,
    "hidden-state features": check_hidden_features,
}
