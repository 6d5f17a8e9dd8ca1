"""How much do graph messages add to what the layer already has? One measurement per node-feature mode.

On the embedded SmolLM2-135M (eager attention, fp32), one window of ``--tokens`` tokens of Wikipedia prose, every
layer and head:

* values: ``n_i^h = sum_{j in topk_i} P^h[i, j] v_j^h`` (the per-head top-k neighbour sum of the value vectors)
  against the head's own attention output ``o_i^h = sum_j P^h[i, j] v_j^h``, which the model already adds to its
  residual stream through ``o_proj``: cosine and relative difference ``|n - o| / |o|``;
* hidden: ``n_i^h = sum_{j in topk_i} P^h[i, j] u_j`` with ``u = h + attn_out`` (the residual stream after
  attention) against ``u_i`` itself: cosine.

Writes ``--out`` (JSON: medians and quartiles per mode and k, plus the machine and versions).

    .venv/bin/python scripts/measure_node_features.py --out docs/node_features.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from gin_adapter.compare.machine import machine
from gin_adapter.embedded import load_embedded_model, load_wiki_articles


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(x.flatten().double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"p25": round(q[0].item(), 4), "median": round(q[1].item(), 4), "p75": round(q[2].item(), 4)}


def topk_sum(probs: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """``sum_{j in topk_i} P[..., i, j] x[..., j, :]``: probs ``(B, H, L, L)``, x ``(B, H or 1, L, F)``."""
    weights, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
    sparse = torch.zeros_like(probs).scatter_(-1, index, weights)
    return sparse @ x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--out", type=Path, default=Path("docs/node_features.json"))
    args = parser.parse_args()

    model, tokenizer = load_embedded_model(attn_implementation="eager")
    model.eval()
    text = " ".join(extract for _, extract in load_wiki_articles()[:40])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.tokens]
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads

    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        store = seen.setdefault(index, {})
        handles.append(layer.self_attn.v_proj.register_forward_hook(lambda m, a, out, s=store: s.__setitem__("v", out)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, s=store: s.__setitem__("o", a[0])))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a, s=store: s.__setitem__("u", a[0])))
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    for handle in handles:
        handle.remove()

    results: dict[str, dict] = {"values": {}, "hidden": {}}
    length = ids.shape[1]
    for k in args.top_k:
        cos_v, rel_v, cos_h = [], [], []
        for index, probs in enumerate(out.attentions):  # (1, H, L, L)
            store = seen[index]
            v = store["v"].view(1, length, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
            o = store["o"].view(1, length, heads, head_dim).transpose(1, 2)  # the heads' attention outputs
            n = topk_sum(probs.float(), v.float(), k)
            cos_v.append(torch.nn.functional.cosine_similarity(n, o, dim=-1))
            rel_v.append((n - o).norm(dim=-1) / o.norm(dim=-1).clamp_min(1e-12))
            u = store["u"].unsqueeze(1).float()  # (1, 1, L, d)
            cos_h.append(torch.nn.functional.cosine_similarity(topk_sum(probs.float(), u, k), u, dim=-1))
        results["values"][f"top{k}"] = {"cosine(n, attention output)": _quantiles(torch.stack(cos_v)), "|n - o| / |o|": _quantiles(torch.stack(rel_v))}
        results["hidden"][f"top{k}"] = {"cosine(n, u_i)": _quantiles(torch.stack(cos_h))}

    report = {
        "what": __doc__.split("\n\n")[1],
        "model": "SmolLM2-135M-Instruct (embedded), eager, fp32",
        "tokens": length,
        "layers": len(out.attentions),
        "results": results,
        "machine": {**machine(), "torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))  # noqa: T201 (a script's report)


if __name__ == "__main__":
    main()
