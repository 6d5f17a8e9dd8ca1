"""The ``gin-analysis`` command (also ``python -m gin_adapter.analysis``)::

    gin-analysis message-passing --model embedded --text "The cat sat on the mat."
    gin-analysis gat-sparsity --model embedded --out runs/sparsity \\
        --topk 1,2,4,8,16,32 --thresholds 0.01,0.05,0.1,0.3 --max-tokens 2048
    gin-analysis plots runs/my_run

``plots`` (:func:`plot_run`) redraws ``curves.png`` and ``scales.png`` from a training run's ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .gat_sparsity import gat_sparsity_sweep
from .message_passing import attention_as_message_passing


def plot_run(results_dir: str | Path) -> list[Path]:
    """Write ``curves.png`` and ``scales.png`` (and ``sparsity.png`` if ``sparsity.json`` exists).

    ``results_dir/results.json`` has ``"curves"`` (input of
    :func:`gin_adapter.analysis.plotting.plot_training_curves`) and ``"scale_history"`` (input of
    :func:`gin_adapter.analysis.plotting.plot_scales`); a missing or empty key is skipped.

    Returns:
        The paths written.
    """
    from . import plotting

    results_dir = Path(results_dir)
    written: list[Path] = []
    results_file = results_dir / "results.json"
    if results_file.is_file():
        data = json.loads(results_file.read_text(encoding="utf-8"))
        if data.get("curves"):
            written.append(plotting.plot_training_curves(data["curves"], results_dir / "curves.png"))
        if data.get("scale_history"):
            written.append(plotting.plot_scales(data["scale_history"], results_dir / "scales.png"))
    sparsity_file = results_dir / "sparsity.json"
    if sparsity_file.is_file():
        data = json.loads(sparsity_file.read_text(encoding="utf-8"))
        written.append(plotting.plot_sparsity_curve(data["results"], results_dir / "sparsity.png"))
    if not written:
        raise FileNotFoundError(f"nothing to plot in {results_dir} (no results.json or sparsity.json)")
    return written


def _load(model_name: str, device: str, dtype: str) -> tuple[Any, Any]:
    """Model (eval, sdpa) and tokenizer from a local folder, a Hub id or an embedded alias."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gin_adapter.embedded import resolve_model_path
    except ImportError:  # pragma: no cover - embedded.py is part of the package
        resolve_model_path = str
    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _parse_list(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def _eval_batches(
    tokenizer: Any, texts: Iterable[str], max_tokens: int, block_size: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """Concatenate texts (EOS between them), cut at ``max_tokens``, split into blocks and batches."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    blocks = [blk for blk in blocks if len(blk) >= 2]
    batches: list[dict[str, Tensor]] = []
    full = [blk for blk in blocks if len(blk) == block_size]
    rest = [blk for blk in blocks if len(blk) != block_size]
    for i in range(0, len(full), batch_size):
        x = torch.tensor(full[i : i + batch_size])
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    for blk in rest:
        x = torch.tensor([blk])
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x)})
    return batches


def _cmd_message_passing(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model, args.device, args.dtype)
    enc = tokenizer(args.text, return_tensors="pt")
    report = attention_as_message_passing(model, enc["input_ids"], enc.get("attention_mask"))
    print(f"{'layer':>5}  {'max |diff|':>11}  {'max |out|':>10}  {'edges':>7}")
    for r in report:
        print(f"{r['layer']:>5}  {r['max_abs_diff']:>11.3e}  {r['max_abs_output']:>10.3e}  {r['num_edges']:>7}")
    worst = max(r["max_abs_diff"] for r in report)
    print(f"tokens: {enc['input_ids'].shape[1]}  layers: {len(report)}  worst max |diff|: {worst:.3e}")
    return 0


def _cmd_gat_sparsity(args: argparse.Namespace) -> int:
    from . import plotting

    model, tokenizer = _load(args.model, args.device, args.dtype)
    if args.text_file:
        texts: list[str] = [Path(args.text_file).read_text(encoding="utf-8")]
    else:
        from gin_adapter.embedded import load_wiki_articles

        texts = [f"{title}\n{extract}" for title, extract in load_wiki_articles()]
    batches = _eval_batches(tokenizer, texts, args.max_tokens, args.block_size, args.batch_size)
    rules = [("topk", float(k)) for k in _parse_list(args.topk, int)]
    rules += [("threshold", t) for t in _parse_list(args.thresholds, float)]
    results = gat_sparsity_sweep(model, batches, rules)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": args.model,
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "block_size": args.block_size,
        "results": results,
    }
    (out / "sparsity.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    png = plotting.plot_sparsity_curve(results, out / "sparsity.png")
    print(f"{'rule':>9}  {'param':>6}  {'edges kept':>10}  {'perplexity':>10}")
    for r in results:
        param = "" if r["param"] is None else f"{r['param']:g}"
        print(f"{r['rule']:>9}  {param:>6}  {r['edge_fraction']:>10.4f}  {r['perplexity']:>10.4f}")
    print(f"wrote {out / 'sparsity.json'} and {png}")
    return 0


def _cmd_plots(args: argparse.Namespace) -> int:
    for path in plot_run(args.results_dir):
        print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gin-analysis", description="Attention-as-message-passing experiments and run plots."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="embedded", help="local folder, Hub id, or 'embedded' (SmolLM2-135M)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])

    mp = sub.add_parser("message-passing", help="rebuild each layer's attention as PyG message passing")
    model_args(mp)
    mp.add_argument("--text", default="Graphs are everywhere: attention is message passing on a complete graph.")
    mp.set_defaults(func=_cmd_message_passing)

    gs = sub.add_parser("gat-sparsity", help="perplexity with sparsified per-head attention graphs")
    model_args(gs)
    gs.add_argument("--out", required=True, help="output folder for sparsity.json and sparsity.png")
    gs.add_argument("--topk", default="1,2,4,8,16,32", help="comma-separated k values")
    gs.add_argument("--thresholds", default="0.01,0.05,0.1,0.3", help="comma-separated thresholds")
    gs.add_argument("--max-tokens", type=int, default=2048, help="evaluation tokens (default 2048)")
    gs.add_argument("--block-size", type=int, default=256, help="tokens per sequence (default 256)")
    gs.add_argument("--batch-size", type=int, default=4, help="sequences per batch (default 4)")
    gs.add_argument("--text-file", default=None, help="evaluate on this text instead of the embedded Wikipedia intros")
    gs.set_defaults(func=_cmd_gat_sparsity)

    pl = sub.add_parser("plots", help="curves.png and scales.png from a run's results.json")
    pl.add_argument("results_dir")
    pl.set_defaults(func=_cmd_plots)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gin-analysis`` / ``python -m gin_adapter.analysis``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))
