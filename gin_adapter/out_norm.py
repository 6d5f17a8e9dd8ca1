"""The block's last two steps, output projection and scaled RMSNorm, with the projection recomputed in backward.

    y = m W^T + b                          m (B, L, F), W (d, F), b (d) or none: the model width d from the GIN width F
    out = y * r * g,  r = (mean_d y^2 + eps)^(-1/2),  g = w * scale      (B, L, d)

Autograd would keep ``y`` for the norm's backward: one ``(B, L, d)`` float32 tensor per wrapped layer, the largest
the block saves when ``F << d`` (32 or 155 against 576 on SmolLM2). This function keeps ``m`` (which the
projection's weight gradient needs anyway) and ``r (B, L, 1)`` instead, and recomputes ``y`` in backward (one
``F -> d`` matmul). With ``y_hat = y r`` and upstream ``dout``:

    dg = sum_tokens dout * y_hat,   dw = scale dg,   dscale = sum_d dg w
    dy = r (dy_hat - y_hat mean_d(dy_hat * y_hat)),  dy_hat = dout * g
    dm = dy W,   dW = dy^T m,   db = sum_tokens dy

The forward runs the float operations of :class:`gin_adapter.blocks.ScaledRMSNorm` in the same order (the same
numbers). Used for float32 training outside autocast; everything else takes the plain modules.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def inverse_rms(y: torch.Tensor, eps_t: torch.Tensor, width_t: torch.Tensor) -> torch.Tensor:
    """``r = 1 / sqrt(mean_d y^2 + eps)`` as ``(B, L, 1)``, the same operations as ScaledRMSNorm's forward."""
    return torch.rsqrt(torch.addcdiv(eps_t, torch.sum(y * y, dim=-1, keepdim=True), width_t))  # eps + sum / d: one call


class _ProjectAndNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, m, weight, bias, norm_weight, scale, eps_t, width_t):
        y = F.linear(m, weight, bias)
        r = inverse_rms(y, eps_t, width_t)
        gain = norm_weight * scale
        ctx.save_for_backward(m, weight, bias, norm_weight, scale, r)
        return y * r * gain

    @staticmethod
    def backward(ctx, grad_out):
        m, weight, bias, norm_weight, scale, r = ctx.saved_tensors
        need_m, need_w, need_b, need_g, need_s = ctx.needs_input_grad[:5]
        y_hat = F.linear(m, weight, bias).mul_(r)
        grad_gain = (grad_out * y_hat).flatten(0, -2).sum(dim=0) if (need_g or need_s) else None
        d_y_hat = grad_out * (norm_weight * scale)
        d_y = d_y_hat.sub_(y_hat * (d_y_hat * y_hat).mean(dim=-1, keepdim=True)).mul_(r)
        grad_m = d_y @ weight if need_m else None
        grad_weight = d_y.flatten(0, -2).t() @ m.flatten(0, -2) if need_w else None
        grad_bias = d_y.flatten(0, -2).sum(dim=0) if (need_b and bias is not None) else None
        grad_norm_weight = grad_gain * scale if need_g else None
        grad_scale = (grad_gain * norm_weight).sum().reshape(scale.shape) if need_s else None
        return grad_m, grad_weight, grad_bias, grad_norm_weight, grad_scale, None, None


def project_and_norm(m: torch.Tensor, out_proj: nn.Linear, norm: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """``norm(out_proj(m), scale)`` (``norm`` a :class:`gin_adapter.blocks.ScaledRMSNorm`): the same values; in
    float32 training outside autocast (something needs a gradient) without keeping ``out_proj(m)`` for backward
    (see the module docstring)."""
    fused = (
        torch.is_grad_enabled()
        and (m.requires_grad or scale.requires_grad or out_proj.weight.requires_grad or norm.weight.requires_grad)
        and m.dtype == out_proj.weight.dtype == norm.weight.dtype == torch.float32
        and not torch.is_autocast_enabled(m.device.type)
    )
    if not fused:
        return norm(out_proj(m), scale)
    return _ProjectAndNorm.apply(m, out_proj.weight, out_proj.bias, norm.weight, scale, norm.eps_t, norm.width_t)
