"""Make docs/figures/adjacency.png and docs/figures/causal_graph.png (the README's attention-graph figures).

One layer of the embedded SmolLM2-135M-Instruct on one sentence: each head's attention probabilities ``P[h, i, j]``
and the sparse adjacency the GIN adapter builds from them with its default rule (``GinConfig()``: per head, top-8
keys per query row), then one head's adjacency as a causal token graph (messages flow key j -> query i). The
probabilities are recomputed from the layer's own ``q, k`` (after RoPE) with
``gin_adapter.analysis.layer_attention_probabilities`` and checked against the model's eager attention weights.
The same computation, step by step, is in notebooks/quickstart.ipynb. Offline, CPU, about a minute::

    .venv/bin/python docs/figures/make_figures.py
    .venv/bin/python docs/figures/make_figures.py --layer 16 --heads 0,3,5,7 --graph-head 5 --out docs/figures   # the same

With the defaults (layer 16; heads 0, 3, 5, 7) head 0 is a previous-token head and head 5 (the causal graph) links
"it" back to "trophy", over the attention sink on the first token that most heads share.

The sparsity figure (``sparsity.png`` and ``sparsity.json``) comes from the CLI instead::

    .venv/bin/gin-analysis gat-sparsity --model embedded --max-tokens 512 --out docs/figures
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gin_adapter import GinConfig  # noqa: E402
from gin_adapter.adjacency import AdjacencyRule, sparse_adjacency  # noqa: E402
from gin_adapter.analysis import layer_attention_probabilities, plotting  # noqa: E402
from gin_adapter.embedded import load_embedded_model  # noqa: E402

SENTENCE = "The trophy did not fit into the brown suitcase because it was too big."


@torch.no_grad()
def layer_graph(model, tokenizer, sentence: str, layer: int, config: GinConfig):
    """``(tokens, probs (H, T, T), adjacency (H, T, T))`` of one Llama-style attention layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    enc = tokenizer(sentence, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    attention = model.model.layers[layer].self_attn
    captured = {}

    def grab_inputs(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        captured["cos_sin"] = kwargs["position_embeddings"]

    handle = attention.register_forward_pre_hook(grab_inputs, with_kwargs=True)
    try:
        model(**enc)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    shape = (*hidden.shape[:2], -1, attention.head_dim)
    q = attention.q_proj(hidden).view(shape).transpose(1, 2)
    k = attention.k_proj(hidden).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *captured["cos_sin"])
    probs, visible = layer_attention_probabilities(q, k, None, attention.scaling)
    adjacency = sparse_adjacency(probs, visible, AdjacencyRule.from_config(config))

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = model(**enc, output_attentions=True).attentions[layer]
    finally:
        model.set_attn_implementation(previous)
    error = (eager - probs).abs().max().item()
    if error > 1e-4:
        raise RuntimeError(f"recomputed probabilities differ from the model's eager attention weights by {error:.2e}")
    return tokens, probs[0], adjacency[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentence", default=SENTENCE)
    parser.add_argument("--layer", type=int, default=16, help="layer index (SmolLM2-135M has 30; default 16)")
    parser.add_argument("--heads", default="0,3,5,7", help="heads shown in adjacency.png (default 0,3,5,7)")
    parser.add_argument("--graph-head", type=int, default=5, help="head drawn in causal_graph.png (default 5)")
    parser.add_argument("--top-k", type=int, default=GinConfig().top_k, help="GinConfig.top_k (default 8, the adapter's default)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="output folder (default docs/figures)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_embedded_model()
    model.eval()
    config = GinConfig(top_k=args.top_k)
    heads = [int(h) for h in args.heads.split(",") if h.strip()]
    graph_head = args.graph_head
    tokens, probs, adjacency = layer_graph(model, tokenizer, args.sentence, args.layer, config)

    out = Path(args.out)
    written = [
        plotting.plot_adjacency(
            probs, adjacency, tokens, out / "adjacency.png", heads=heads,
            title=f"SmolLM2-135M, layer {args.layer}: attention probabilities (top) and the GIN adapter's "
                  f"top-{config.top_k} adjacency (bottom)",
        ),
        plotting.plot_causal_graph(
            adjacency[graph_head], tokens, out / "causal_graph.png",
            title=f"SmolLM2-135M, layer {args.layer}, head {graph_head}: top-{config.top_k} causal attention graph",
        ),
    ]
    causal = int((probs[0] > 0).sum())
    kept = [int((adjacency[h] > 0).sum()) for h in range(adjacency.shape[0])]
    print(f"{len(tokens)} tokens, {causal} causal edges per head, kept per head (top-{config.top_k}): {kept}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
