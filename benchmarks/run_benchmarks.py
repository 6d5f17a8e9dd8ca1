#!/usr/bin/env python
"""Speed and memory of the GIN adapter against LoRA, the frozen base, the published algorithm and the hardware.

Every comparison runs side by side in one process with the same shapes: the variants of a suite are built from
one base model (frozen weights shared between them), and their steps are interleaved round by round (the order
rotates each round), so a slow spell on a shared machine hits all of them alike. Reported times are medians of
the timed rounds after warm-up; ratios are taken between medians of the same run.

This file is the runner (arguments, the order of the suites, ``benchmark_results.json``); each suite is one
module: ``train_suite.py``, ``eval_suite.py``, ``generate_suite.py``, ``decode_suite.py``, ``crossover_suite.py``, ``kernel_suite.py``,
with the variants in ``variants.py``, the measuring in ``measure.py`` and the tables in ``report.py``.

Suites (``--suite``):

* ``train``: one optimiser step (forward, backward, AdamW) per variant, at each ``--seq-lens`` length, plus one
  instrumented step per variant for peak memory and what autograd keeps for backward. Also checks, on a small
  input, that the published-style re-creation computes the same as ``gin_thr``, and that the fused top-k kernel
  (the default), the generic chain and the pyg backend compute the same (``torch.allclose`` on logits and adapter
  gradients).
* ``eval``: forward-only tokens/s (``torch.inference_mode``, loss computed as in perplexity evaluation).
* ``generate``: cached greedy ``generate()`` tokens/s.
* ``decode`` (not in the default list): one decoded token's time and ATen operator calls per variant, the overhead
  per layer above the frozen base, and the GIN neighbour sum and block alone (``--decode-variants``).
* ``crossover``: the GIN neighbour sum, dense (masked matmul) vs torch_geometric message passing vs a gather
  over top-k indices, over sequence length and neighbours per token, and the whole per-head computation (scores,
  top-k, sum) of the generic chain vs the fused kernel's two sum modes; writes ``crossover.png``.
* ``kernel``: one layer's per-head top-k neighbour sum, forward + backward, every way the package can run it
  (generic chain, the fused kernel's sum modes and query chunk sizes) against sdpa itself.
* ``top_k`` (not in the default list): the per-row top-k of one query chunk's probabilities, ``torch.topk`` vs
  the ATen two-stage one vs the compiled one (``top_k_suite.py``).

Variants: ``base`` (frozen floor: no trainable parameter; the input embeddings require grad so backward runs
through every layer, which any adapter in every layer must pay), ``lora`` (peft LoRA on q_proj, v_proj, rank
chosen to match the GIN's trainable-parameter count), ``gin`` (package default: per-head top-8; in training the graph is
built with the attention itself, ``gin_adapter/joint.py``), ``gin_separate`` (the same through sdpa and the separate fused
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

GPU: ``--device cuda --dtype bfloat16 [--compile]``. CPU with bf16 instructions (AVX-512-BF16, AMX): ``--autocast bfloat16``
(fp32 weights, the forward's matmuls in bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.crossover_suite import plot_crossover, run_crossover  # noqa: E402
from benchmarks.decode_suite import run_decode  # noqa: E402
from benchmarks.eval_suite import run_eval  # noqa: E402
from benchmarks.generate_suite import run_generate  # noqa: E402
from benchmarks.kernel_suite import run_kernel  # noqa: E402
from benchmarks.top_k_suite import run_top_k  # noqa: E402
from benchmarks.measure import AUTOCAST, TIMER, _loadavg, machine_info  # noqa: E402
from benchmarks.report import markdown_tables, summarize  # noqa: E402
from benchmarks.train_suite import equivalence_checks, run_train  # noqa: E402
from benchmarks.variants import ALL_VARIANTS, corpus_ids, load_base, truncate_layers  # noqa: E402
from gin_adapter.compare.allocator import CPU_ALLOCATORS, configure_cpu_allocator  # noqa: E402

logger = logging.getLogger("benchmarks")


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
    p.add_argument("--suite", type=csv(), default=["train", "eval", "generate", "crossover", "kernel"], help="comma list of train,eval,generate,decode,crossover,kernel,top_k")
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
    p.add_argument("--decode-variants", type=csv(), default=["base", "lora", "gin", "gin_hidden"], help="decode suite variants (base is always added)")
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
    p.add_argument("--top-k-keys", type=csv(int), default=[64, 128, 256, 1024, 2048], help="top_k suite: keys per row")
    p.add_argument("--top-k-picks", type=csv(int), default=[8], help="top_k suite: k, the picks per row")
    p.add_argument("--top-k-reps", type=int, default=20, help="top_k suite: timed rounds")
    p.add_argument("--mem-budget-gb", type=float, default=8.0, help="skip crossover cells whose estimated memory exceeds this")
    p.add_argument("--time-budget-s", type=float, default=1.5, help="a crossover backend slower than this per call at some (L, k) is skipped at longer L with the same k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--autocast", default=None, choices=["bfloat16", "float16"],
                   help="run the train and eval forwards under torch.autocast with this dtype (weights stay --dtype)")
    p.add_argument("--compile", action="store_true", help="torch.compile the train/eval forward of base, lora and the GIN variants except gin_pyg, and not published (host syncs)")
    p.add_argument("--cpu-allocator", default="keep", choices=list(CPU_ALLOCATORS),
                   help="keep: freed CPU tensors stay mapped between steps (as train.py does by default); system: glibc's defaults (gin_adapter/compare/allocator.py)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--timer", choices=["auto", "wall", "cpu"], default="auto",
                   help="time that medians and ratios use; auto: process CPU time when on CPU with one thread (robust on a shared machine), else wall")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/", help="folder for benchmark_results.json and crossover.png")
    p.add_argument("--report", default=None, help="only re-render the summary and tables of an existing benchmark_results.json (runs nothing)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


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
    logger.info("CPU allocator: %s", configure_cpu_allocator(args.cpu_allocator))  # recorded in machine_info
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    AUTOCAST["dtype"] = getattr(torch, args.autocast) if args.autocast else None
    TIMER["primary"] = args.timer if args.timer != "auto" else ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall")
    logger.info("timer: %s (threads %d)", TIMER["primary"], torch.get_num_threads())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = dict(command="python " + " ".join([str(Path(sys.argv[0]).as_posix())] + (sys.argv[1:] if argv is None else argv)),
                                   args={k: v for k, v in vars(args).items()}, machine=machine_info(device))
    logger.info("machine: %s", results["machine"])

    needs_model = any(s in args.suite for s in ("train", "eval", "generate", "decode"))
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

    if "decode" in args.suite:
        suite_start = time.time()
        prompt = corpus_ids(tokenizer, args.gen_prompt + 1, offset_articles=100).view(1, args.gen_prompt + 1).to(device)
        results["decode"] = run_decode(base, prompt, args.decode_variants, warmup=args.warmup, steps=args.gen_steps, device=device)
        results["suite_wall_s"]["decode"] = time.time() - suite_start
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

    if "top_k" in args.suite:
        suite_start = time.time()
        results["top_k"] = run_top_k(args)
        results["suite_wall_s"]["top_k"] = time.time() - suite_start

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
