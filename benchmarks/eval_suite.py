"""The ``eval`` suite: forward-only tokens/s (``torch.inference_mode``, loss computed as in perplexity evaluation).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from benchmarks.measure import autocast, interleaved_times, median, synchronizer
from benchmarks.variants import LABELS, build_variants, reset_switches

logger = logging.getLogger("benchmarks")


def run_eval(base, ids: torch.Tensor, names: list[str], *, warmup: int, steps: int, device: torch.device, compile_: bool = False,
             collect: bool = True) -> list[dict[str, Any]]:
    variants = build_variants(base, names, compile_=compile_)
    fns = {}
    for name, variant in variants.items():
        variant.model.eval()

        def forward(variant=variant) -> None:
            variant.use_switches()
            with torch.inference_mode(), autocast(ids.device):
                variant.forward(input_ids=ids, labels=ids)

        fns[name] = forward
    times = interleaved_times(fns, warmup, steps, synchronizer(device), what=f"eval {tuple(ids.shape)}", collect=collect)
    tokens = ids.numel()
    rows = [dict(variant=n, label=LABELS[n], batch=ids.shape[0], seq_len=ids.shape[1], forward_s=median(t), tokens_per_s=tokens / median(t), forward_s_all=t,
                 tokens_per_wall_s=tokens / median(times.wall[n]), tokens_per_cpu_s=tokens / median(times.cpu[n]), timer=times.primary) for n, t in times.items()]
    reset_switches()
    del variants, fns
    gc.collect()
    return rows
