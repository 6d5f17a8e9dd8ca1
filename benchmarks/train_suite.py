"""The ``train`` suite: one optimiser step per variant, timed in interleaved rounds, plus one instrumented
step for peak memory and what autograd keeps for backward; and the equal-output checks that the variants compute
the same (published-style vs ``gin_thr``; fused kernel vs generic chain vs pyg).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from benchmarks.measure import MiB, autocast, interleaved_times, live_bytes, median, peak_step_bytes, record_saved_tensors, synchronizer
from benchmarks.published import build_published_model, published_blocks
from benchmarks.variants import LABELS, Variant, build_gin, build_variants, gin_config, share_copy
from gin_adapter import get_gin_model, gin_layers

logger = logging.getLogger("benchmarks")


def train_step_fn(variant: Variant, ids: torch.Tensor, input_grad: bool = False) -> Callable[[], float]:
    """One training step: forward with labels, backward, AdamW step, zero grads (``base``: no optimiser).

    ``base`` always, and every variant when ``input_grad``, feeds the input embeddings as a leaf that requires
    grad, so backward runs through every layer's attention. With ``input_grad`` a truncated model's layers
    stand for middle layers of the full model (otherwise layer 0's attention needs no backward under GIN).
    """
    model, forward = variant.model, variant.forward
    model.train()
    embed = model.get_input_embeddings()
    optimizer = variant.optimizer

    def step() -> float:
        variant.use_switches()
        with autocast(ids.device):  # --autocast: the forward in bf16 where it is safe, backward as autograd recorded it
            if variant.name == "base" or input_grad:
                loss = forward(inputs_embeds=embed(ids).detach().requires_grad_(True), labels=ids).loss
            else:
                loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_train(base, ids: torch.Tensor, names: list[str], *, warmup: int, steps: int, device: torch.device, memory: bool = True, compile_: bool = False,
              collect: bool = True, input_grad: bool = False) -> dict[str, Any]:
    """Interleaved training steps of ``names`` on ``ids`` ``(B, L)``; returns rows and the LoRA rank used.

    ``collect``: run the garbage collector before every step (untimed; ~0.5 s each with transformers loaded).
    """
    batch, length = ids.shape
    variants = build_variants(base, names, compile_=compile_)
    fns = {name: train_step_fn(v, ids, input_grad) for name, v in variants.items()}
    heads = base.config.num_attention_heads
    memory_rows: dict[str, dict[str, Any]] = {}
    if memory:  # the instrumented step is also the first warm-up round
        for name, variant in variants.items():
            if collect:
                gc.collect()
            static = live_bytes(variant.model, variant.optimizer)
            start = time.perf_counter()
            with record_saved_tensors(variant.model, length, batch * heads * length * length) as saved:
                peak = peak_step_bytes(fns[name], device)
            static = max(static, live_bytes(variant.model, variant.optimizer))  # AdamW state appears at the first step
            memory_rows[name] = dict(static_mib=static / MiB, step_peak_mib=peak / MiB, total_peak_mib=(static + peak) / MiB,
                                     saved_mib=saved.bytes / MiB, saved_tensors=saved.count, saved_attention_maps=saved.attention_maps,
                                     saved_square_shapes=saved.square_shapes, largest_saved=saved.largest)
            logger.info("memory %-12s step peak %8.1f MiB, saved %7.1f MiB, (B,H,L,L) saved: %d  (instrumented warm-up step %.1f s)",
                        name, peak / MiB, saved.bytes / MiB, saved.attention_maps, time.perf_counter() - start)
        warmup = max(0, warmup - 1)
    times = interleaved_times(fns, warmup, steps, synchronizer(device), what=f"train {batch}x{length}", collect=collect)
    rows = []
    for name, variant in variants.items():
        row: dict[str, Any] = dict(variant=name, label=LABELS[name], batch=batch, seq_len=length, layers=base.config.num_hidden_layers,
                                   trainable_params=variant.trainable, step_s=median(times[name]), step_s_all=times[name],
                                   step_wall_s=median(times.wall[name]), step_cpu_s=median(times.cpu[name]), step_wall_s_all=times.wall[name],
                                   step_cpu_s_all=times.cpu[name], step_system_s=median(times.system[name]),
                                   step_minor_faults=median(times.minor_faults[name]), timer=times.primary)
        row.update(memory_rows.get(name, {}))
        rows.append(row)
    lora = next((v for v in variants.values() if v.name == "lora"), None)
    result = dict(rows=rows, input_grad=input_grad)
    if lora is not None:
        result["lora_rank"] = lora.model.peft_config["default"].r
    del variants, fns
    gc.collect()
    return result


def perturb(blocks: Iterable[torch.nn.Module], seed: int = 1, scale: float = 0.05) -> None:
    """Non-zero scale, random eps: the adapter is no longer the identity, so equal outputs mean equal GINs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks:
            block.scale.fill_(scale)
            block.eps.copy_(torch.rand(1, generator=generator))


def _outputs_and_grads(model: torch.nn.Module, blocks: list[torch.nn.Module], ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.train()
    for block in blocks:
        block.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad.detach().clone() for block in blocks for p in block.parameters()]
    return out.logits.detach(), grads


def _compare(name: str, ref: tuple, other: tuple, rel: float) -> dict[str, Any]:
    """``torch.allclose(other, ref, rtol=rel, atol=rel * max|ref|)`` on the logits and on all adapter gradients
    concatenated (a per-tensor scale would judge near-cancelling scalar gradients such as ``eps`` by their noise)."""
    (ref_logits, ref_grads), (logits, grads) = ref, other
    ref_grad, grad = torch.cat([g.flatten() for g in ref_grads]), torch.cat([g.flatten() for g in grads])

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(b, a, rtol=rel, atol=rel * a.abs().max().item())

    ok = close(ref_logits, logits) and close(ref_grad, grad)
    result = dict(comparison=name, allclose=bool(ok), rel_tolerance=rel,
                  max_abs_logit_diff=(ref_logits - logits).abs().max().item(), max_abs_logit=ref_logits.abs().max().item(),
                  max_abs_grad_diff=(ref_grad - grad).abs().max().item(), max_abs_grad=ref_grad.abs().max().item())
    logger.info("check %-32s allclose=%s (rel %.0e)  max|dlogits|=%.2e of %.1f  max|dgrad|=%.2e of %.2e", name, ok, rel,
                result["max_abs_logit_diff"], result["max_abs_logit"], result["max_abs_grad_diff"], result["max_abs_grad"])
    return result


def equivalence_checks(base, ids: torch.Tensor, rel: float = 1e-4) -> list[dict[str, Any]]:
    """Same logits and adapter gradients (all 30 layers' GIN blocks): published-style vs gin_thr; gin vs gin_generic, gin_pyg.

    Tolerance: ``rel`` times the largest reference value (fp32 summation order differs between the backends and the
    adapter-perturbed 30-layer model amplifies it).
    """
    checks = []
    torch.manual_seed(0)
    thr = get_gin_model(share_copy(base), gin_config("gin_thr"))
    thr_blocks = [layer.gin_blocks["default"] for layer in gin_layers(thr)]
    perturb(thr_blocks)
    published = build_published_model(base, thr_blocks)
    ref = _outputs_and_grads(thr, thr_blocks, ids)
    checks.append(_compare("published-style vs gin_thr", ref, _outputs_and_grads(published, published_blocks(published), ids), rel))
    del thr, published

    models = {}
    for name in ("gin", "gin_generic", "gin_pyg"):
        torch.manual_seed(0)  # same initial adapter weights in the three
        model = build_gin(base, name)
        blocks = [layer.gin_blocks["default"] for layer in gin_layers(model)]
        perturb(blocks)
        models[name] = _outputs_and_grads(model, blocks, ids)
    checks.append(_compare("gin (fused kernel) vs gin_generic (generic chain)", models["gin_generic"], models["gin"], rel))
    checks.append(_compare("gin_pyg vs gin_generic (dense)", models["gin_generic"], models["gin_pyg"], rel))
    # the adapter really acts: the GIN output differs from the base model's
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    checks.append(dict(comparison="gin (perturbed) vs base", max_abs_logit_diff=(base_logits - models["gin"][0]).abs().max().item()))
    gc.collect()
    return checks
