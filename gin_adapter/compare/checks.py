"""The checks ``train.py`` runs while training: non-finite values stop a run, a broken identity at step 0 warns.

The testing-only fields ``debug_non_finite_at_step`` / ``debug_non_finite`` make the loss or every gradient NaN
at one step (:func:`inject_non_finite`), so that the real checks in the loop are exercised deterministically.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .runs import Trial, starts_as_identity

INIT_PPL_RTOL = 1e-4  # far above float32 reduction-order noise in a perplexity (~1e-6), far below any real adapter effect


class NonFiniteLossError(ValueError):
    """The training loss or gradient norm became NaN/inf."""


def inject_non_finite(loss: torch.Tensor, what: str | None) -> torch.Tensor:
    """``debug_non_finite``: a NaN loss (``"loss"``) or NaN gradients (``"grad"``); ``None`` leaves ``loss`` alone."""
    if what == "loss":
        return loss * float("nan")
    if what == "grad":  # NaN enters backward at the loss, so every gradient (all-reduced under DDP) is NaN
        loss.register_hook(lambda grad: grad * float("nan"))
    return loss


def non_finite_message(what: str, value: float, step: int, trial: Trial, last_ckpt: Path | None, injected: str | None = None) -> str:
    kept = f"the last complete checkpoint {last_ckpt} is intact (--resume continues from it)" if last_ckpt else "no checkpoint was written for this run"
    debug = f" (injected by debug_non_finite={injected!r})" if injected else ""
    return (f"non-finite training {what} ({value}) at step {step} of run {trial.run.name!r} (method={trial.plan.method}, "
            f"learning_rate={trial.lr:g}, seed={trial.seed}){debug}. Lower the learning rate (learning_rates / "
            f"runs[].learning_rates) or set max_grad_norm; {kept}.")


def identity_at_init_warning(trial: Trial, step0_ppl: float, base_ppl: float | None) -> str | None:
    """A warning when an adapter that starts as the identity (LoRA's B = 0, GIN ``scale_init: zero``) does not
    reproduce the base model's validation perplexity at step 0; None when it does or when no identity is expected."""
    if base_ppl is None or not starts_as_identity(trial.plan) or math.isclose(step0_ppl, base_ppl, rel_tol=INIT_PPL_RTOL):
        return None
    return (f"WARNING: [{trial.id}] the {trial.plan.method} adapter should be the identity at initialisation, but its step-0 "
            f"validation perplexity {step0_ppl:.6g} differs from the base model's {base_ppl:.6g} by more than {INIT_PPL_RTOL:g} "
            "(relative); the curves record the measured value.")
