"""Does compiling each GIN block with ``torch.compile`` (inductor) shorten one decoded token on a CPU?

    python benchmarks/compiled_blocks.py --threads 1 --out docs/benchmarks/epyc_1thread_decode_compiled_blocks.json

The decode suite's timed call (one cached forward of the whole model on one new token, the cache cropped back
after it) for ``base``, ``lora``, ``gin`` and ``gin`` with every block's ``forward`` replaced by
``torch.compile(forward, fullgraph=True, dynamic=False)`` (one graph per block: the input, the MLP, the output
projection and the norm fused by inductor into C++ kernels and extern matmuls). Rounds interleave the four;
the JSON holds every call's time, the medians, the ratios to LoRA and the overhead per layer above ``base``.
Needs a C++ compiler (inductor's CPU backend). Not run by the test suite.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode_suite import _decode_call, _set_scales, time_decode_calls  # noqa: E402
from benchmarks.measure import machine_info  # noqa: E402
from benchmarks.variants import build_gin, build_variants, corpus_ids, load_base  # noqa: E402
from gin_adapter import gin_layers  # noqa: E402
from gin_adapter.compare.outputs import write_json  # noqa: E402

logger = logging.getLogger("benchmarks")


def compile_blocks(model: torch.nn.Module) -> int:
    """Replace every GIN block's ``forward`` by its compiled version; returns how many were compiled."""
    import torch._dynamo

    blocks = [block for layer in gin_layers(model) for block in layer.gin_blocks.values()]
    # one cached graph per block instance: raise the recompile limit above the number of layers
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(blocks))
    for block in blocks:
        block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False)
    return len(blocks)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="tokens in the cache before the decoded one")
    p.add_argument("--rounds", type=int, default=120)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base, tokenizer = load_base("embedded", torch.float32, device)
    prompt = corpus_ids(tokenizer, args.prompt + 1)[None, :]
    models = {name: variant.model.eval() for name, variant in build_variants(base, ["base", "lora", "gin"]).items()}
    models["gin_compiled_blocks"] = build_gin(base, "gin").eval()
    compiled = compile_blocks(models["gin_compiled_blocks"])
    fns = {}
    for name, model in models.items():
        _set_scales(model, 0.5)
        fns[name] = _decode_call(model, prompt[:, :-1], prompt[:, -1:])
    start = time.perf_counter()
    for fn in fns.values():  # compiles here, outside the timing
        fn()
        fn()
    logger.info("first calls (with compilation): %.1f s", time.perf_counter() - start)
    times, per_token = time_decode_calls(fns, warmup=args.warmup, rounds=args.rounds, device=device, layers=base.config.num_hidden_layers)
    lora_s = per_token["lora"][0]
    rows = [dict(variant=name, token_s=per_token[name][0], tokens_per_s_vs_lora=lora_s / per_token[name][0],
                 overhead_us_per_layer=per_token[name][1], token_s_all=t) for name, t in times.items()]
    for row in rows:
        logger.info("%-20s %7.2f ms  vs lora %.3f  overhead per layer %5.0f us", row["variant"], row["token_s"] * 1e3,
                    row["tokens_per_s_vs_lora"], row["overhead_us_per_layer"])
    results = dict(command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                   machine=machine_info(device), compiled_blocks=compiled, timer=times.primary, rows=rows)
    write_json(args.out, results)  # atomically
    return results


if __name__ == "__main__":
    main()
