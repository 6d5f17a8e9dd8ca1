"""The wrapper around one attention module: ``output = attention(x) + sum_adapters delta(x)``.

For each active adapter (:mod:`gin_adapter.blocks` for the formula and shapes):

1. the attention runs unchanged; the GIN attention function records its q, k, v and mask
   (:mod:`gin_adapter.attention`);
2. node features ``x_j`` for every key ``j`` the attention saw: the value vectors (``node_features="values"``, from
   the KV cache), or ``W_in u_j`` with ``u`` the decoder layer's hidden state after attention
   (``"hidden"``: ``u = h + attn_out``, ``h`` the decoder layer's input) or the normed input of the attention
   (``"input"``); projected features of earlier tokens come from the KV cache's layer (:mod:`gin_adapter.cache`);
3. the neighbour sum ``n_i = sum_j A[i, j] x_j`` over the attention graph (:mod:`gin_adapter.aggregate`);
4. ``delta = block(x_self, n)`` is added to the attention module's output.

Where the delta lands: the attention module's output, i.e. before the residual add in pre-norm decoders (Llama,
Qwen, Mistral, Phi-3, GPT-2: ``h + attn_out + delta``), and inside the post-attention norm where the architecture
normalises the attention output before adding it (Gemma 2/3, OLMo 2: ``h + norm(attn_out + delta)``). With
``scale = 0`` the model equals the base model either way. ``"hidden"`` uses ``u = h + attn_out`` with the module's
own output (before any such norm), as the published code did for Llama.

The decoder layer's input ``h`` is captured where gradient checkpointing's recomputation sees it too
(:class:`LayerInputWatcher`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import joint_threshold, native_block
from .adjacency import AdjacencyRule
from .aggregate import GraphInputs, decode_graph_rows, graph_neighbour_sum
from .attention import AggregationRequest, capture
from .blocks import AttentionDims, make_block
from .cache import check_supported, feature_cache_layer, find_cache
from .config import GinConfig


class GinAttentionLayer(nn.Module, BaseTunerLayer):
    """PEFT tuner layer wrapping one attention module; forward has three branches: disabled, active, none active."""

    adapter_layer_names = ("gin_blocks",)
    other_param_names = ("gin_rules", "gin_node_features")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GinConfig, *, dims: AttentionDims, scale_init: float, layer_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.gin_blocks = nn.ModuleDict()
        self.gin_rules: dict[str, AdjacencyRule] = {}
        self.gin_node_features: dict[str, str] = {}
        self.dims, self.layer_index = dims, layer_index
        self._layer_input_watcher: LayerInputWatcher | None = None
        self._active_set: tuple | None = None  # the active adapters and what follows from them, see _active
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.update_layer(adapter_name, config, scale_init=scale_init)

    def __getattr__(self, name: str) -> Any:
        """Look up what this wrapper lacks on the wrapped attention module.

        Decoder layers read their attention's attributes from outside (Ergo's reads ``self_attn.o_proj.weight.dtype``
        to pick the branch dtype), so a wrapper without them breaks the model. The wrapper's own sub-modules
        (``base_layer``, ``gin_blocks``: looked up in every forward) are answered first, as fast as ``nn.Module``'s.
        """
        modules = self.__dict__.get("_modules", {})
        if name in modules:
            return modules[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base_layer" not in modules:  # not set yet (during __init__): no fallback to recurse into
                raise
            return getattr(modules["base_layer"], name)

    def update_layer(self, adapter_name: str, config: GinConfig, *, scale_init: float) -> None:
        """Add (or replace) adapter ``adapter_name`` on this layer."""
        block = make_block(config, self.dims, scale_init)
        weight = next(self.base_layer.parameters(), None)
        if weight is not None:
            block.to(weight.device)
        block.train(self.base_layer.training)  # an adapter added to a model in eval mode has its dropout off
        self.gin_blocks[adapter_name] = block
        self.gin_rules[adapter_name] = AdjacencyRule.from_config(config)
        self.gin_node_features[adapter_name] = config.node_features
        if self._layer_input_watcher is not None:
            self._layer_input_watcher.sync()
        self._active_set = None
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def watch_layer_input(self, decoder_layer: nn.Module) -> None:
        """Capture ``decoder_layer``'s input ``h`` on each of its calls (for ``node_features="hidden"``)."""
        if self._layer_input_watcher is None:
            self._layer_input_watcher = LayerInputWatcher(decoder_layer, lambda: "hidden" in self.gin_node_features.values())

    def stop_watching(self) -> None:
        """Remove the decoder-layer hooks (when the adapter is unloaded)."""
        if self._layer_input_watcher is not None:
            self._layer_input_watcher.remove()
            self._layer_input_watcher = None

    def merge(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "A GIN adapter cannot be merged into the base weights: its output depends on the input through the "
            "attention graph, so no fixed weight change reproduces it. Use `unload()` to drop the adapter, or keep "
            "the PeftModel for inference."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        active, joint_rule, needs_features = self._active()
        if self.disable_adapters or not active:
            return self.base_layer(hidden_states, *args, **kwargs)
        output, graph = self.attend(hidden_states, *args, joint_rule=joint_rule, **kwargs)
        attn_output = output[0] if isinstance(output, tuple) else output
        cache, cache_layer = find_cache(kwargs), None
        if cache is not None:  # refuse caches the adapter cannot follow; keep projected features beside the KV cache
            cache_layer = (feature_cache_layer if needs_features else check_supported)(cache, self.layer_index, type(self.base_layer).__name__)
        if len(active) == 1:  # the block adds its delta itself (one call fewer; the whole step one call when decoding)
            attn_output = self._adapter_update(active[0], graph, hidden_states, attn_output, cache_layer, add_to=attn_output)
        else:
            # h read once for every adapter (the watcher lets go of it when read without gradient)
            layer_input = self._layer_input() if any(self.gin_node_features[name] == "hidden" for name in active) else None
            delta = None
            for name in active:
                update = self._adapter_update(name, graph, hidden_states, attn_output, cache_layer, layer_input=layer_input)
                delta = update if delta is None else delta + update
            attn_output = attn_output + (delta if delta.dtype == attn_output.dtype else delta.to(attn_output.dtype))
        return (attn_output, *output[1:]) if isinstance(output, tuple) else attn_output

    def _active(self) -> tuple[tuple[str, ...], AdjacencyRule | None, bool]:
        """``(the active adapters this layer holds, their joint rule (:meth:`_joint_rule_for`), whether any projects
        node features (a feature cache))``, worked out again only when PEFT's active-adapter value is another object
        (``set_adapter`` and ``delete_adapter`` assign a new one) or an adapter was added here (the forward runs per
        layer and decoded token)."""
        current, cached = self._active_adapter, self._active_set
        if cached is None or cached[0] is not current:
            active = tuple(name for name in self.active_adapters if name in self.gin_blocks)
            needs_features = any(self.gin_node_features[name] != "values" for name in active)
            cached = self._active_set = (current, (active, self._joint_rule_for(active) if active else None, needs_features))
        return cached[1]

    def _adapter_update(self, name: str, graph: GraphInputs, hidden_states, attn_output, cache_layer, *, add_to: torch.Tensor | None = None,
                        layer_input: torch.Tensor | None = None) -> torch.Tensor:
        """Adapter ``name``'s ``delta (B, Lq, d)``, or ``add_to + delta`` when given: node features, neighbour sum, block.

        A decoded token with projected node features takes one compiled call for all three where it can
        (:func:`gin_adapter.native_block.decode_update`)."""
        mode = self.gin_node_features[name]
        if mode == "values":  # the queries are the last Lq keys (a dynamic cache appends)
            x_self, features = graph.value.narrow(-2, graph.k_len - graph.q_len, graph.q_len), graph.value
        else:
            u0, u1 = self._feature_source(mode, hidden_states, attn_output, layer_input)
            if cache_layer is not None and graph.q_len == 1 and not torch.is_grad_enabled():
                rows = decode_graph_rows(graph, self.gin_rules[name])
                if rows is not None:
                    fused = native_block.decode_update(self.gin_blocks[name], u0, u1, rows,
                                                       lambda width: cache_layer.gin_reserve(name, 1, graph.k_len, width, u0), add_to=add_to)
                    if fused is not None:
                        return fused
            x_self, features = self._projected_features(name, graph, u0 if u1 is None else u0 + u1, cache_layer)
        neighbours = graph_neighbour_sum(graph, features, self.gin_rules[name])
        return self.gin_blocks[name](x_self, neighbours, add_to)

    def attend(self, hidden_states: torch.Tensor, *args: Any, joint_rule: AdjacencyRule | None = None, **kwargs: Any) -> tuple[Any, GraphInputs]:
        """Run the wrapped attention module unchanged; return its output and the graph inputs it recorded (q, k, v,
        mask; with ``joint_rule``, the graph built inside the attention where it can be, :mod:`gin_adapter.joint`)."""
        request = AggregationRequest(self.base_layer, joint_rule=joint_rule)
        with capture(request):
            output = self.base_layer(hidden_states, *args, **kwargs)
        if request.graph is None:
            raise RuntimeError(
                f"{getattr(self, 'target_description', type(self.base_layer).__name__)} did not call transformers' "
                "attention interface with the GIN attention function and itself as `module`, so it cannot be wrapped; "
                "pass GinConfig(target_modules=[...]) naming the module that does."
            )
        return output, request.graph

    def _joint_rule_for(self, active: Sequence[str]) -> AdjacencyRule | None:
        """The rule the attention may build the graph with (:mod:`gin_adapter.joint`,
        :mod:`gin_adapter.joint_threshold`): every active adapter uses the per-head top-k rule (either graph mode)
        with backend ``"auto"`` and the same ``k``, or the published rule (backend ``"auto"``) with the same constants; else
        ``None`` (:meth:`_active` keeps it per set of active adapters)."""
        rules = [self.gin_rules[name] for name in active]
        first = rules[0]
        top_k = all(r.per_head_top_k and r.backend == "auto" and r.top_k == first.top_k for r in rules)
        threshold = all(r.fused_threshold and joint_threshold.same_rule(r, first) for r in rules)
        return first if top_k or threshold else None

    def _feature_source(self, mode: str, hidden_states: torch.Tensor, attn_output: torch.Tensor, layer_input: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``u = u0 (+ u1)``, what ``"hidden"`` or ``"input"`` features are projected from: ``(h, attn_out)`` with ``h``
        the decoder layer's input (``layer_input``, else read from the watcher; ``u = h + attn_out``), or
        ``(hidden_states, None)``, what the attention module received; each ``(B, Lq, d)``."""
        if mode == "hidden":
            return (self._layer_input() if layer_input is None else layer_input), attn_output
        return hidden_states, None

    def _layer_input(self) -> torch.Tensor:
        """The decoder layer's input ``h`` of this call (:class:`LayerInputWatcher`)."""
        return self._layer_input_watcher.layer_input(type(self.base_layer).__name__)

    def _projected_features(self, name: str, graph: GraphInputs, u: torch.Tensor, cache_layer) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_self (B, 1, Lq, F), features of every key (B, 1, Lk, F))``: ``W_in u`` for the new tokens, the earlier
        ones' from the KV cache's layer."""
        new = self.gin_blocks[name].project(u)  # (B, Lq, F)
        if cache_layer is not None:
            every = cache_layer.gin_extend(name, new, graph.k_len)
        elif graph.k_len != graph.q_len:
            raise RuntimeError(f"{graph.k_len} keys for {graph.q_len} queries but no KV cache was passed to the attention module.")
        else:
            every = new
        return new.unsqueeze(1), every.unsqueeze(1)

    def __repr__(self) -> str:
        return "gin." + super().__repr__()


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states")


class LayerInputWatcher:
    """Captures a decoder layer's input ``h`` where gradient checkpointing's recomputation sees it too.

    transformers (>= 5.24) checkpoints a decoder layer's ``forward``, not its ``__call__``: hooks on the layer itself
    run once, never in the recomputation, where (with ``use_reentrant=True``) the layer gets a detached copy of its
    input. Hooks on the layer's *children* do run in the recomputation. So a pre-hook on the layer learns, on its
    first call, which child the layer's forward calls first with the layer input itself (the input norm in pre-norm
    decoders: ``input_layernorm``, ``ln_1``; the attention in post-norm ones: OLMo 2), and from then on that child's
    pre-hook records ``h``, in the forward and in every recomputation alike.
    """

    def __init__(self, decoder_layer: nn.Module, wanted: Callable[[], bool]) -> None:
        self.layer_name = type(decoder_layer).__name__
        self.wanted = wanted
        self.decoder_layer = decoder_layer
        self.first_child: nn.Module | None = None
        self.learning: torch.Tensor | None = None  # the layer input, while the first child is not known yet
        self.value: torch.Tensor | None = None
        self.unsupported = False
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.sync()

    def sync(self) -> None:
        """Hook the decoder layer when an adapter wants ``h`` (``wanted()``) and nothing is hooked yet.

        A hooked module takes ``nn.Module``'s slower call path (about 2 us per call, decoding runs every layer once
        per token), so layers whose adapters all use other node features carry no hook, and once the first child is
        known only its hook is kept (:meth:`_child_called`)."""
        layer = self.decoder_layer
        if self.handles or not self.wanted():
            return
        if self.first_child is not None:
            self.handles.append(self.first_child.register_forward_pre_hook(functools.partial(self._child_called, self.first_child), with_kwargs=True))
            return
        self.handles.append(layer.register_forward_pre_hook(self._layer_called, with_kwargs=True))
        for child in layer.children():
            self.handles.append(child.register_forward_pre_hook(functools.partial(self._child_called, child), with_kwargs=True))

    def _layer_called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.first_child is None and self.wanted():
            self.learning = _first_tensor(args, kwargs)

    def _child_called(self, child: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.learning is not None:
            self.unsupported = _first_tensor(args, kwargs) is not self.learning
            self.first_child, self.learning = (None if self.unsupported else child), None
            if self.first_child is not None:  # learned: every other hook is overhead from now on
                self.remove()
                self.sync()
        if child is self.first_child:
            self.value = _first_tensor(args, kwargs)

    def layer_input(self, module_name: str) -> torch.Tensor:
        """The current call's ``h``; kept for a recomputation in backward, dropped at once when there is none."""
        if self.unsupported or self.value is None:
            raise RuntimeError(
                f"node_features='hidden' needs the input of the decoder layer around {module_name}, but "
                + (f"{self.layer_name}'s first sub-module does not receive it; use node_features='input' or 'values'."
                   if self.unsupported else "no call of that layer was seen: call the model, not the attention module alone.")
            )
        value = self.value
        if not torch.is_grad_enabled():
            self.value = None
        return value

    def remove(self) -> None:
        """Remove every hook and drop what was captured (what was learned about the layer is kept)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.value = self.learning = None
