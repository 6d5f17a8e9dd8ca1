"""The GIN block's non-linearities, by ``GinConfig.activation`` name.

``"gelu"`` is the exact (erf) GELU, ``GELU(x) = x / 2 * (1 + erf(x / sqrt(2)))``, as ``nn.GELU()``. On the CPU,
PyTorch routes it to oneDNN for float32, which costs about 10 us per call whatever the size (the primitive's setup;
an ad-hoc ``timeit`` on an AMD EPYC, 1 thread: 10.3 us for 32 or 576 elements, ATen's own vectorised kernel
1.5-2.2 us; docs/benchmarks.md has the model-level effect). A
decoded token runs the block's GELU twice per layer on ``hidden_dim`` numbers, so :class:`GELU` calls ATen's kernel
for inputs of at most :data:`SMALL_INPUT` elements (above it oneDNN is faster: 39 us against 50 us at 32,768).
Both compute the same function; their results differ by float32 rounding (at most 2.4e-7 here).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SMALL_INPUT = 4096
"""Inputs of at most this many elements take ATen's GELU kernel on the CPU (decoding); larger ones oneDNN's."""

_ONEDNN_ENABLED = getattr(torch._C, "_get_mkldnn_enabled", None)  # private PyTorch API: without it, plain F.gelu
_SET_ONEDNN = getattr(torch._C, "_set_mkldnn_enabled", None)


class GELU(nn.GELU):
    """``nn.GELU`` (same ``approximate`` argument, no state) that skips oneDNN's per-call setup on small CPU inputs.

    The skip switches PyTorch's oneDNN flag off for the one call (process-wide, for about a microsecond): an
    operator that another thread runs in that window takes ATen's kernel too, which gives the same values up to
    float32 rounding. Not done while ``torch.compile`` traces (the compiled kernel has no such setup).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (_SET_ONEDNN is None or x.device.type != "cpu" or x.numel() > SMALL_INPUT or torch.compiler.is_compiling()
                or not _ONEDNN_ENABLED()):
            return F.gelu(x, approximate=self.approximate)
        _SET_ONEDNN(False)
        try:
            return F.gelu(x, approximate=self.approximate)
        finally:
            _SET_ONEDNN(True)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": GELU, "silu": nn.SiLU, "relu": nn.ReLU, "prelu": nn.PReLU}
"""``GinConfig.activation`` -> module class."""
