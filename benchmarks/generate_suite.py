"""The ``generate`` suite: cached greedy ``generate()`` tokens/s, and whether the GIN variants produce the same tokens.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch

from benchmarks.measure import interleaved_times, median, synchronizer
from benchmarks.variants import LABELS, build_variants, reset_switches

logger = logging.getLogger("benchmarks")


def run_generate(base, tokenizer, prompt: torch.Tensor, names: list[str], *, new_tokens: int, warmup: int, steps: int, device: torch.device,
                 collect: bool = True) -> dict[str, Any]:
    variants = build_variants(base, names)
    outputs: dict[str, torch.Tensor] = {}
    fns = {}
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    for name, variant in variants.items():
        variant.model.eval()

        def generate(name=name, model=variant.model, variant=variant) -> None:
            variant.use_switches()  # the *_separate variants: sdpa, then the separate decode step
            with torch.inference_mode():
                outputs[name] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False, use_cache=True, pad_token_id=pad)

        fns[name] = generate
    times = interleaved_times(fns, warmup, steps, synchronizer(device), what=f"generate {tuple(prompt.shape)}+{new_tokens}", collect=collect)
    produced = prompt.shape[0] * new_tokens
    rows = [dict(variant=n, label=LABELS[n], batch=prompt.shape[0], prompt=prompt.shape[1], new_tokens=new_tokens, generate_s=median(t),
                 tokens_per_s=produced / median(t), generate_s_all=t, tokens_per_wall_s=produced / median(times.wall[n]),
                 tokens_per_cpu_s=produced / median(times.cpu[n]), timer=times.primary) for n, t in times.items()]
    same = {n: bool(torch.equal(outputs[n], outputs["gin"])) for n in outputs if "gin" in outputs and n.startswith("gin")}
    reset_switches()
    del variants, fns
    gc.collect()
    return dict(rows=rows, same_tokens_as_gin=same)
