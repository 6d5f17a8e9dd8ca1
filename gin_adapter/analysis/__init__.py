"""Two experiments on "transformers are graph neural networks", the figures, and the ``gin-analysis`` command.

1. :func:`attention_as_message_passing` (:mod:`~gin_adapter.analysis.message_passing`) -- *attention is message
   passing on the complete (causal) graph* (Joshi 2020/2025): every self-attention layer's output rebuilt with a
   torch_geometric ``MessagePassing`` layer over edges ``j -> i`` weighted by the softmax probabilities, and the
   largest deviation from the model's own output per layer.
2. :func:`gat_sparsity_sweep` (:mod:`~gin_adapter.analysis.gat_sparsity`) -- *run the transformer as a GAT*: each
   head attends only over its sparsified, renormalised graph (top-k per query row, or a threshold), and the base
   model's perplexity is measured against the fraction of causal edges kept.
3. :func:`plot_run` (:mod:`~gin_adapter.analysis.cli`) -- ``curves.png`` and ``scales.png`` from a training run's
   ``results.json``; :mod:`~gin_adapter.analysis.plotting` draws every figure.

Both experiments swap in a custom attention function (:mod:`~gin_adapter.analysis.attention_fn`) through
``transformers.AttentionInterface`` (and the matching ``AttentionMaskInterface`` entry, without which
transformers builds no mask at all), switch the model to it with ``model.set_attn_implementation`` and always
restore the previous implementation. This package uses the adapter's adjacency maths and the embedded model;
neither the adapter nor the comparison harness imports it, except the harness for the training plots.

CLI::

    python -m gin_adapter.analysis message-passing --model embedded --text "The cat sat on the mat."
    python -m gin_adapter.analysis gat-sparsity --model embedded --out runs/sparsity \\
        --topk 1,2,4,8,16,32 --thresholds 0.01,0.05,0.1,0.3 --max-tokens 2048
    python -m gin_adapter.analysis plots runs/my_run
"""

from .attention_fn import layer_attention_probabilities
from .cli import main, plot_run
from .gat_sparsity import GAT_IMPL, RULES, evaluate_perplexity, gat_sparsity_sweep, sparsify_attention
from .message_passing import CAPTURE_IMPL, AttentionMessagePassing, attention_as_message_passing, build_attention_graph

__all__ = [
    "AttentionMessagePassing",
    "layer_attention_probabilities",
    "build_attention_graph",
    "sparsify_attention",
    "attention_as_message_passing",
    "gat_sparsity_sweep",
    "evaluate_perplexity",
    "plot_run",
    "main",
]
