"""A test-side re-implementation of the published Sparse-GIN computation: deliberately slow and literal.

What it reproduces, from DESIGN.md section 2 ("The published Sparse-GIN computation, field by field" and "Known
defect of the published code"; lamm-mit/Graph-Aware-Transformers @ fb2c6ef, DL = ``llama_decoder_layer_with_gnn.py``,
GNN = ``graph_neural_network.py``, with its README's Sparse-GIN config), for every Llama decoder layer:

1. ``u = h + o_proj(attn)``: the residual after attention, un-normed (DL 394-402), with *eager* attention returning
   the probabilities ``P (B, H, L, L)`` (the published code forces eager).
2. Adjacency: ``A = clamp(sum_h P, max=1)`` (DL 493), multiplied by the binary mask of the 4D additive attention mask
   (entries above -1e10) *before* sharpening, ``S = sigmoid(10 (A - 0.1))``, entries ``<= 0.6`` zeroed, ``tril``
   (DL 540-553).
3. A Python loop over the batch: ``edge_index = S[b].nonzero().T`` (row 0 = query i, row 1 = key j, as published),
   edge weights ``S[b][i, j]``, one ``torch_geometric.data.Data`` per sample, then ``Batch.from_data_list``.
4. The GNN on the batched nodes: ``x = Linear(d, 155)(u)`` with bias (GNN 455); one causal GIN layer, a PyG
   ``MessagePassing`` with ``aggr="add"`` and PyG's default flow (messages from ``edge_index[0]`` to
   ``edge_index[1]``) whose causal filter keeps edges with ``source <= target`` inside one graph;
   ``z = eps * x + sum_{edges j->i} w * x_j`` (GNN 294: ``eps``, not ``1 + eps``);
   ``linear2(act(linear1(z))) + z`` (GNN 251-315); the same PReLU again, dropout 0.1 (GNN 445, 520, 570-571); no
   residual around the GIN; ``Linear(155, d)`` with bias (GNN 457).
5. ``h_out = u + lambda_k * RMSNorm(gnn_out)`` (``LlamaRMSNorm`` semantics, eps 1e-5; DL 342, 707), then the
   layer's ``post_attention_layernorm`` and MLP with ``h_out`` as their residual (DL 709).

The known defect follows from steps 3 and 4 alone: ``nonzero()`` of a lower-triangular matrix gives
``edge_index[0] = i >= edge_index[1] = j``, the filter keeps ``edge_index[0] <= edge_index[1]``, so only the
self-loops survive and ``z_i = eps x_i + S[i, i] x_i``. ``intended=True`` swaps the two rows of ``edge_index``
(source = key j, target = query i), the one change that gives the intended operator
``z_i = eps x_i + sum_{j <= i} S[i, j] x_j``; everything else stays as published.

Independence: nothing here imports gin_adapter's adjacency, aggregation or block code; :func:`published_weights`
reads a ``PublishedGinBlock``'s parameters by name so that both sides compute with identical weights, and
:func:`install_published_gin` uses ``gin_adapter.gin_layers`` only to find those blocks. Written from DESIGN.md;
the mask form (``> -1e10`` on the additive mask) and the README config (``gnn_residual=False``,
``GIN_use_norm=False``, ``GIN_edge_weight_scaling=True``) were checked against the published repository. A Python loop,
host syncs and a PyG batch per layer and call, by design: this is for tests only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.data import Batch, Data
from torch_geometric.nn import MessagePassing

SHARPEN_ALPHA, SHARPEN_TAU, THRESHOLD = 10.0, 0.1, 0.6
MASKED_BELOW = -1e10  # an additive-mask entry below this is a masked key
NORM_EPS = 1e-5
DROPOUT = 0.1

#: The PublishedGinBlock parameters (gin_adapter/blocks.py) the reference copies, by name.
BLOCK_PARAMETERS = (
    "in_proj.weight", "in_proj.bias", "eps", "lin1.weight", "lin1.bias", "lin2.weight", "lin2.bias",
    "act.weight", "out_proj.weight", "out_proj.bias", "norm.weight", "scale",
)


def published_weights(block: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a gin_adapter ``PublishedGinBlock``'s parameters, by name."""
    params = dict(block.named_parameters())
    missing = [name for name in BLOCK_PARAMETERS if name not in params]
    if missing:
        raise KeyError(f"{type(block).__name__} has no parameters {missing}; expected a PublishedGinBlock.")
    return {name: params[name].detach().clone() for name in BLOCK_PARAMETERS}


@dataclass
class LayerRecord:
    """What one call of one reference layer saw, summed over the batch (for the tests' sanity checks)."""

    layer: int
    thresholded_edges: int  # entries of S left by the threshold and tril
    off_diagonal_edges: int  # of those, edges with j < i
    filtered_edges: int  # edges left after the published causal filter
    self_loops: int  # of those, edges i -> i
    visible_self_loops: int  # diagonal entries the mask lets through (the most self-loops there can be)
    margin: float  # smallest |sharpened - 0.6| over visible entries: how far a decision is from flipping
    diagonal_margin: float  # the same over visible diagonal entries (the only decisions the filter keeps)


class CausalWeightedGIN(MessagePassing):
    """One published GIN layer: causal edge filter, weighted add-aggregation, ``eps * x``, MLP with a skip."""

    def __init__(self, width: int) -> None:
        super().__init__(aggr="add")  # PyG's default flow, source_to_target: edge_index[0] sends to edge_index[1]
        self.linear1 = nn.Linear(width, width)
        self.linear2 = nn.Linear(width, width)
        self.eps = nn.Parameter(torch.zeros(1))
        self.kept_edges: torch.Tensor | None = None

    @staticmethod
    def published_causal_filter(edge_index: torch.Tensor, edge_weight: torch.Tensor, graph_of_node: torch.Tensor):
        """Keep the edges whose source index is <= their target index, inside one graph of the batch."""
        source, target = edge_index[0], edge_index[1]
        keep = (graph_of_node[source] == graph_of_node[target]) & (source <= target)
        return edge_index[:, keep], edge_weight[keep]

    def forward(self, x, edge_index, edge_weight, graph_of_node, act):
        edge_index, edge_weight = self.published_causal_filter(edge_index, edge_weight, graph_of_node)
        self.kept_edges = edge_index
        z = self.eps * x + self.propagate(edge_index, x=x, edge_weight=edge_weight)
        return self.linear2(act(self.linear1(z))) + z

    def message(self, x_j, edge_weight):
        return edge_weight.unsqueeze(-1) * x_j


class PublishedGNN(nn.Module):
    """In-projection, the GIN layer, the shared PReLU again, dropout, out-projection (no residual around the GIN)."""

    def __init__(self, model_dim: int, width: int) -> None:
        super().__init__()
        self.project_in = nn.Linear(model_dim, width)
        self.gin = CausalWeightedGIN(width)
        self.act = nn.PReLU()  # one slope, used inside the GIN's MLP and after the layer
        self.project_out = nn.Linear(width, model_dim)

    def forward(self, u, edge_index, edge_weight, graph_of_node):
        x = self.project_in(u)
        y = self.act(self.gin(x, edge_index, edge_weight, graph_of_node, self.act))
        y = F.dropout(y, p=DROPOUT, training=self.training)
        return self.project_out(y)


class PublishedSparseGINLayer(nn.Module):
    """A Llama decoder layer computed as the published Sparse-GIN code does (GIN between attention and MLP)."""

    def __init__(self, layer: nn.Module, weights: dict[str, torch.Tensor], *, intended: bool = False, records: list | None = None) -> None:
        super().__init__()
        self.layer = layer  # the base layer's input_layernorm, self_attn, post_attention_layernorm, mlp
        self.index = layer.self_attn.layer_idx
        width, model_dim = weights["in_proj.weight"].shape
        self.gnn = PublishedGNN(model_dim, width)
        self.norm_weight = nn.Parameter(torch.ones(model_dim))
        self.lambda_k = nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.intended = intended
        self.records = records
        targets = {
            "in_proj.weight": self.gnn.project_in.weight, "in_proj.bias": self.gnn.project_in.bias,
            "eps": self.gnn.gin.eps,
            "lin1.weight": self.gnn.gin.linear1.weight, "lin1.bias": self.gnn.gin.linear1.bias,
            "lin2.weight": self.gnn.gin.linear2.weight, "lin2.bias": self.gnn.gin.linear2.bias,
            "act.weight": self.gnn.act.weight,
            "out_proj.weight": self.gnn.project_out.weight, "out_proj.bias": self.gnn.project_out.bias,
            "norm.weight": self.norm_weight, "scale": self.lambda_k,
        }
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(weights[name].reshape(target.shape))

    def rms_norm(self, y: torch.Tensor) -> torch.Tensor:
        """``LlamaRMSNorm(d, eps=1e-5)``: normalise in float32, cast back, times the weight."""
        y32 = y.float()
        normed = y32 / torch.sqrt(y32.square().mean(dim=-1, keepdim=True) + NORM_EPS)
        return self.norm_weight * normed.to(y.dtype)

    def sparse_adjacency(self, probs: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, H, L, L)`` probabilities -> ``(B, L, L)`` thresholded, lower-triangular ``S``."""
        summed = probs.sum(dim=1).clamp(max=1.0)
        length = summed.shape[-1]
        visible = torch.ones_like(summed, dtype=torch.bool)
        if attention_mask is not None:  # the binary mask, applied before sharpening
            mask = attention_mask[:, 0, :, :length]
            visible = (mask > MASKED_BELOW) if mask.dtype != torch.bool else mask
            visible = visible.expand_as(summed)
            summed = summed * visible.to(summed.dtype)
        sharpened = torch.sigmoid(SHARPEN_ALPHA * (summed - SHARPEN_TAU))
        kept = torch.where(sharpened > THRESHOLD, sharpened, torch.zeros_like(sharpened))
        if self.records is not None:
            visible = visible.tril()
            distance = (sharpened - THRESHOLD).abs()
            diagonal = visible.diagonal(dim1=-2, dim2=-1)
            self._stats = dict(
                margin=float(distance[visible].min()) if visible.any() else float("inf"),
                diagonal_margin=float(distance.diagonal(dim1=-2, dim2=-1)[diagonal].min()) if diagonal.any() else float("inf"),
                visible_self_loops=int(diagonal.sum()),
            )
        return kept.tril()

    def graph_update(self, u: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        """``u + lambda_k * RMSNorm(GNN(u))`` over one PyG graph per sample, built in a Python loop."""
        samples, length, model_dim = u.shape
        graphs = []
        thresholded = off_diagonal = 0
        for b in range(samples):
            edges = adjacency[b].nonzero().T  # (2, E): row 0 the query i, row 1 the key j
            weights = adjacency[b][edges[0], edges[1]]
            thresholded += edges.shape[1]
            off_diagonal += int((edges[0] != edges[1]).sum())
            if self.intended:
                edges = edges.flip(0)  # the fix: key j is the source, query i the target
            graphs.append(Data(x=u[b], edge_index=edges, edge_weight=weights))
        batch = Batch.from_data_list(graphs)
        out = self.gnn(batch.x, batch.edge_index, batch.edge_weight, batch.batch)
        out = torch.stack([out[batch.ptr[b] : batch.ptr[b + 1]] for b in range(samples)])  # (B, L, d)
        if self.records is not None:
            kept = self.gnn.gin.kept_edges
            self.records.append(
                LayerRecord(
                    layer=self.index, thresholded_edges=thresholded, off_diagonal_edges=off_diagonal,
                    filtered_edges=kept.shape[1], self_loops=int((kept[0] == kept[1]).sum()), **self._stats,
                )
            )
        return u + self.lambda_k * self.rms_norm(out)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        for name in ("use_cache", "cache", "past_key_values"):
            kwargs.pop(name, None)
        attn_out, probs = self.layer.self_attn(
            hidden_states=self.layer.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_embeddings=position_embeddings, cache=None, use_cache=False, **kwargs,
        )
        if probs is None or probs.dim() != 4:
            raise RuntimeError("The published computation needs eager attention probabilities (B, H, L, L).")
        u = hidden_states + attn_out
        h_out = self.graph_update(u, self.sparse_adjacency(probs, attention_mask))
        return h_out + self.layer.mlp(self.layer.post_attention_layernorm(h_out))


def install_published_gin(model: nn.Module, gin_model: nn.Module, adapter_name: str = "default", *, intended: bool = False) -> list[LayerRecord]:
    """Replace every decoder layer of the eager Llama ``model`` by its published Sparse-GIN version, in place.

    Weights come from ``gin_model``'s ``PublishedGinBlock`` of the same layer (adapter ``adapter_name``), copied now;
    ``model`` must be a separate, unwrapped copy of ``gin_model``'s base model. Returns the list to which every
    forward appends one :class:`LayerRecord` per layer.
    """
    from gin_adapter import gin_layers  # only to find the blocks whose weights are copied

    if model.config._attn_implementation != "eager":
        raise ValueError(f"The published code forces eager attention; got {model.config._attn_implementation!r}.")
    blocks = {layer.layer_index: layer.gin_blocks[adapter_name] for layer in gin_layers(gin_model)}
    decoder_layers = model.model.layers
    if sorted(blocks) != list(range(len(decoder_layers))):
        raise ValueError(f"Adapter {adapter_name!r} wraps layers {sorted(blocks)}; the model has {len(decoder_layers)}.")
    records: list[LayerRecord] = []
    for index, layer in enumerate(decoder_layers):
        replacement = PublishedSparseGINLayer(layer, published_weights(blocks[index]), intended=intended, records=records)
        decoder_layers[index] = replacement.to(next(layer.parameters()).device).train(layer.training)
    return records
