"""Shared fixtures: tiny randomly initialised causal LMs of every supported family (seconds to build)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# before huggingface_hub / transformers / datasets are imported: they read these at import time (tests that talk to
# the local fake Hub switch the client's constants back themselves, see fake_hub.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "False")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random causal LM of family ``arch`` in eval mode (fp32)."""
    config_name, extra = ARCHITECTURES[arch]
    kwargs = {**TINY, **extra, **overrides}
    if arch == "gpt2":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def perturb_adapter(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Give every GIN block a non-zero scale and random eps, so the adapter is far from the identity."""
    from gin_adapter import gin_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in gin_layers(model):
            for block in layer.gin_blocks.values():
                block.scale.fill_(scale)
                block.eps.copy_(torch.rand(1, generator=generator))


def joint_training_step(config, *, joint_enabled: bool, spied: tuple, monkeypatch, length: int = 150, padding: bool = False,
                        pad_tokens: int = 20, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One training step of a tiny wrapped model: ``(loss, every adapter gradient flattened, calls of the spied
    function)``. ``spied = (module, name)``: the function whose calls are counted (a joint attention path);
    ``joint_enabled`` sets ``gin_adapter.joint.ENABLED``. Sample 0 is left-padded by ``pad_tokens`` with ``padding``."""
    from gin_adapter import get_gin_model
    from gin_adapter import joint as joint_module

    calls = []
    module, name = spied
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(joint_module, "ENABLED", joint_enabled)
    monkeypatch.setattr(module, name, spy)
    torch.manual_seed(0)
    model = get_gin_model(tiny_model(), config)
    perturb_adapter(model)
    model.train()
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :pad_tokens] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), len(calls)


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def kernel_paths(monkeypatch):
    """Records which neighbour-sum path the fused top-k kernel ran: 'dense', 'gather' or 'decode' (one token)."""
    from gin_adapter import topk_sum

    used: list[str] = []
    forward, decode = topk_sum._forward, topk_sum._decode_step

    def spy_forward(query, key, value, mask, spec, top_k, sum_mode, chunks):
        used.append(sum_mode)
        return forward(query, key, value, mask, spec, top_k, sum_mode, chunks)

    def spy_decode(*args, **kwargs):
        used.append("decode")
        return decode(*args, **kwargs)

    monkeypatch.setattr(topk_sum, "_forward", spy_forward)
    monkeypatch.setattr(topk_sum, "_decode_step", spy_decode)
    return used
