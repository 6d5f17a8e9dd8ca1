"""The summary of a benchmark run: headline ratios, the targets they are held to, and the Markdown tables of
docs/benchmarks.md (``run_benchmarks.py --report`` re-renders them from a saved ``benchmark_results.json``).
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

from gin_adapter import native_top_k
from gin_adapter.topk_sum import GATHER_MIN_KEYS_PER_NEIGHBOUR, QUERY_CHUNK_ROWS

logger = logging.getLogger("benchmarks")


def _row(rows: list[dict], variant: str) -> dict | None:
    return next((r for r in rows if r["variant"] == variant), None)


def its_lora(rows: list[dict], row: dict) -> dict:
    """The LoRA a row is compared with: ``lora_b`` (matched to the published preset) for the ``gin_published*``
    rows when the run has it, ``lora`` otherwise (``{}`` when neither ran)."""
    if row["variant"].startswith("gin_published"):
        return _row(rows, "lora_b") or _row(rows, "lora") or {}
    return _row(rows, "lora") or {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def round_ratios(row: dict | None, ref: dict | None, key: str) -> list[float] | None:
    """``row[key][r] / ref[key][r]`` for every interleaved round ``r`` (``None`` when either is missing)."""
    if not row or not ref or not row.get(key) or not ref.get(key) or len(row[key]) != len(ref[key]):
        return None
    return [a / b for a, b in zip(row[key], ref[key])]


def round_ratio(row: dict | None, ref: dict | None, key: str) -> float | None:
    """Median over rounds of ``row[key][r] / ref[key][r]`` (times of the same interleaved round).

    Both variants ran within the same round, so a slow spell of the shared machine that spans a round cancels
    out; the ratio of medians would mix rounds. ``key`` is a list-valued field such as ``step_s_all``.
    """
    ratios = round_ratios(row, ref, key)
    return None if ratios is None else statistics.median(ratios)


def show_ratio(ratios: list[float] | None) -> str:
    """``"median (lowest-highest)"`` of per-round ratios for the tables, e.g. ``"1.06 (0.97-1.19)"``: the spread
    says how far one run's median can be trusted on a shared machine. One round: the ratio alone."""
    if not ratios:
        return ""
    median = f"{statistics.median(ratios):.2f}"
    return median if len(ratios) == 1 else f"{median} ({min(ratios):.2f}-{max(ratios):.2f})"


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
        out["train_gin_hidden_over_lora"] = step("gin_hidden", "lora")
        out["train_gin_published_over_lora_b"] = step("gin_published", "lora_b")  # each at its own budget
        out["memory_total_gin_hidden_over_lora"] = _ratio(get("gin_hidden", "total_peak_mib"), get("lora", "total_peak_mib"))
        out["memory_total_gin_published_over_lora_b"] = _ratio(get("gin_published", "total_peak_mib"), get("lora_b", "total_peak_mib"))
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
    long = next((block["rows"] for block in train if block["rows"][0]["seq_len"] >= 2048), None)
    if long:
        out["train_long_shape"] = f"{long[0]['batch']}x{long[0]['seq_len']}, {long[0]['layers']} layers"
        for variant, ref in (("gin", "lora"), ("gin_hidden", "lora"), ("gin_published", "lora_b")):
            out[f"train_long_{variant}_over_{ref}"] = round_ratio(_row(long, variant), _row(long, ref), "step_s_all")
    if train:  # the published-style computation's adapter overhead (its step minus LoRA's) over GIN's
        lora_s, gin_s, published_s = (get(v, "step_s") for v in ("lora", "gin", "published"))
        if None not in (lora_s, gin_s, published_s) and gin_s > lora_s:
            out["published_overhead_over_gin_overhead"] = (published_s - lora_s) / (gin_s - lora_s)
    shape = out.get("shape", "first training shape")
    short = bool(train) and train[0]["rows"][0]["seq_len"] < 2048  # the 1.10 targets are for the short shape (4 x 256)
    long_shape = out.get("train_long_shape", "1x2048")
    targets = {  # the speed issue's targets (docs/benchmarks.md)
        f"train GIN/LoRA <= 1.10 ({shape})": (out.get("train_gin_over_lora") if short else None, lambda r: r <= 1.10),
        f"train GIN hidden/LoRA <= 1.10 ({shape})": (out.get("train_gin_hidden_over_lora") if short else None, lambda r: r <= 1.10),
        f"train GIN published preset/its LoRA <= 1.10 ({shape})": (out.get("train_gin_published_over_lora_b") if short else None, lambda r: r <= 1.10),
        f"train GIN/LoRA <= 1.15 ({long_shape})": (out.get("train_long_gin_over_lora"), lambda r: r <= 1.15),
        f"train GIN hidden/LoRA <= 1.15 ({long_shape})": (out.get("train_long_gin_hidden_over_lora"), lambda r: r <= 1.15),
        f"train GIN published preset/its LoRA <= 1.15 ({long_shape})": (out.get("train_long_gin_published_over_lora_b"), lambda r: r <= 1.15),
        "eval tokens/s GIN/LoRA >= 0.85": (out.get("eval_gin_over_lora_tokens_per_s"), lambda r: r >= 0.85),
        "generate tokens/s GIN/LoRA >= 0.90": (out.get("generate_gin_over_lora_tokens_per_s"), lambda r: r >= 0.90),
        "peak memory GIN/LoRA <= 1.10 (total)": (out.get("memory_total_gin_over_lora"), lambda r: r <= 1.10),
        "published-style adapter overhead >= 3x GIN's": (out.get("published_overhead_over_gin_overhead"), lambda r: r >= 3),
        "no (B,H,L,L) saved for backward (GIN, sdpa)": (out.get("saved_attention_maps_gin"), lambda n: n == 0),
    }
    out["targets"] = {name: dict(value=value, met=None if value is None else bool(test(value))) for name, (value, test) in targets.items()}
    return out


def _throughput_table(title: str, rows: list[dict], time_key: str, unit: str, spec: str, qualifier: str = "") -> list[str]:
    """Markdown lines of a tokens-per-second table; 'vs its LoRA' is the median per-round throughput ratio (range)
    against :func:`its_lora`."""
    lines = [f"### {title} ({qualifier}'vs its LoRA' uses {rows[0].get('timer', 'wall')} time; `lora_b` for the published preset)", "",
             f"| variant | {unit} per CPU s | {unit} per wall s | vs its LoRA |", "|---|---:|---:|---:|"]
    for r in rows:
        ratios = round_ratios(its_lora(rows, r), r, time_key)
        lines.append(f"| {r['label']} | {r.get('tokens_per_cpu_s', 0):{spec}} | {r.get('tokens_per_wall_s', 0):{spec}} | {show_ratio(ratios)} |")
    return lines


IN_MODEL_PARTS = ("attention_module", "base_attention", "node_features", "neighbour_sum", "block", "decode_update", "rest")


def _in_model_table(in_model: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: each variant's attention-module parts timed inside whole-model decode calls (us per layer)."""
    if not in_model:
        return []
    lines = ["", "Inside the model (us per layer and decoded token, wall time, benchmarks/in_model_parts.py):", "",
             "| variant | " + " | ".join(IN_MODEL_PARTS) + " |", "|---|" + "---:|" * len(IN_MODEL_PARTS)]
    for name, parts in in_model.items():
        lines.append(f"| {name} | " + " | ".join("" if key not in parts else f"{parts[key]:.0f}" for key in IN_MODEL_PARTS) + " |")
    return lines


def markdown_tables(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for block in results.get("train", []):
        rows = block["rows"]
        lines += [f"### Training step, batch {rows[0]['batch']} x {rows[0]['seq_len']} tokens, {rows[0]['layers']} layers"
                  + (" (input embeddings require grad in every variant)" if block.get("input_grad") else ""),
                  "",
                  f"Median of {len(rows[0]['step_s_all'])} interleaved steps; 'vs its LoRA' is the median of per-round ratios of {rows[0].get('timer', 'wall')} time "
                  "(lowest-highest round in brackets) against LoRA at the row's budget (`lora_b` for the published preset).",
                  "",
                  "| variant | trainable params | step CPU s | step wall s | vs its LoRA | peak step mem (MiB) | total peak (MiB) | step mem vs its LoRA | total vs its LoRA | saved for backward (MiB) | (B,H,L,L) saved |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            fmt = lambda key, spec=".1f": "" if r.get(key) is None else format(r[key], spec)  # noqa: E731
            lora = its_lora(rows, r)
            ratios = round_ratios(r, lora, "step_s_all")
            mem_ratio = _ratio(r.get("total_peak_mib"), lora.get("total_peak_mib"))
            step_ratio = _ratio(r.get("step_peak_mib"), lora.get("step_peak_mib"))
            show = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
            lines.append(f"| {r['label']} | {r['trainable_params']:,} | {fmt('step_cpu_s', '.2f')} | {fmt('step_wall_s', '.2f')} | {show_ratio(ratios)} | {fmt('step_peak_mib')} | "
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
    decode = results.get("decode", {})
    if decode.get("rows"):
        r0 = decode["rows"][0]
        lines += [f"### One decoded token, prompt {r0['prompt']}, {r0['layers']} layers (median of {len(r0['token_s_all'])} interleaved calls, {r0['timer']} time)", "",
                  "| variant | ms per token | tokens/s vs LoRA (lowest-highest call) | overhead per layer above base (us) | ATen calls per token | ATen calls per layer above base |",
                  "|---|---:|---:|---:|---:|---:|"]
        lora = _row(decode["rows"], "lora")
        for r in decode["rows"]:
            lines.append(f"| {r['label']} | {1000 * r['token_s']:.2f} | {show_ratio(round_ratios(lora, r, 'token_s_all'))} | {r['overhead_us_per_layer']:.0f} | "
                         f"{r['aten_calls']} | {r['aten_calls_per_layer']:.0f} |")
        parts = decode.get("gin_parts") or {}
        if parts:
            lines.append(f"\n`gin` on one layer's decode inputs, best of repeats: neighbour sum {parts['neighbour_sum_us']:.0f} us, block {parts['block_us']:.0f} us.")
        lines += _in_model_table(decode.get("in_model") or {})
        lines.append("")
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
                     f"{GATHER_MIN_KEYS_PER_NEIGHBOUR * 8} keys and `fused_gather_c{QUERY_CHUNK_ROWS}` from there (beside sdpa: evaluation, eager). "
                     "`joint` (`joint_keep`: probabilities kept for backward) is what training under sdpa runs instead of sdpa and the sum "
                     "together: compare it with `sdpa`; `joint_published` the same for the published preset's rule and 155-wide shared node features; `*_chunked`: the same in ATen's query chunks (the compiled attention off).\n")
    if results.get("top_k"):
        names = list(results["top_k"][0]["ms"])
        lines += ["### Per-row top-k of one query chunk's probabilities (ms per call, 2,304 rows; in brackets: / torch.topk)", "",
                  "| k | keys | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
        for r in results["top_k"]:
            lines.append(f"| {r.get('k', 8)} | {r['keys']} | " + " | ".join(f"{r['ms'][n]:.2f} ({r['over_torch_topk'][n]:.2f})" if n in r["ms"] else "" for n in names) + " |")
        lines.append(f"\n`compiled`: gin_adapter/native/row_topk.c, what the kernels use on the CPU up to k = {native_top_k.MAX_K}; `two_stage`: the ATen top-k (above that k, and the fallback).\n")
    summary = results.get("summary", {})
    if summary.get("targets"):
        lines += ["### Targets", "", "| target | value | met |", "|---|---:|---|"]
        for name, t in summary["targets"].items():
            value = t["value"]
            lines.append(f"| {name} | {'' if value is None else (f'{value:.3f}' if isinstance(value, float) else value)} | {t['met']} |")
        lines.append("")
    return "\n".join(lines)
