"""Linear quantization (docs/design.md §3) and its straight-through twin for training (§6).

Shared by MESS (weights before the search, alphas and betas after it), the plain-quantization
baseline (``quantize.py``) and retraining, so that all of them quantize the same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .errors import UserError
from .settings import check_bits


def linear_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """The original's per-tensor linear quantization; returns ``(x', scale)``.

    ``scale = (max - min) / (2^b - 1)``, ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)``,
    ``x' = q * scale``, all in float32. The grid is centred on zero, so a tensor far from
    zero is clipped: that is the original's scheme, kept for comparable numbers. A tensor
    with ``max == min`` is returned unchanged with ``scale = 0.0`` (it still costs one
    scale: a packer stores the constant there, with ``q = 1``).
    """
    check_bits(bits)
    x = x.detach().float()
    if x.numel() == 0:
        return x.clone(), 0.0
    lo, hi = torch.aminmax(x)
    if hi == lo:
        return x.clone(), 0.0
    if not torch.isfinite(hi - lo):
        raise UserError("cannot quantize a tensor holding NaN or inf")
    scale = (hi - lo) / (2**bits - 1)
    q = torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * scale, float(scale)


def quantize_layers(state_dict: dict, layers, bits: int) -> dict[str, float]:
    """Quantize ``<layer>.weight`` of each layer in place in ``state_dict``, one scale per layer."""
    scales = {}
    for name in layers:
        key = f"{name}.weight"
        state_dict[key], scales[name] = linear_quantize(state_dict[key], bits)
    return scales


def quantize_alpha_beta(alpha: torch.Tensor, beta: torch.Tensor | None, qba: int | None, qbb: int | None):
    """Alphas and betas of one layer, each with its own scale; ``None`` bits keep float32.

    Returns ``(alpha', alpha_scale, beta', beta_scale)``; a scale is ``None`` when not quantized.
    """
    sa = sb = None
    if qba is not None:
        alpha, sa = linear_quantize(alpha, qba)
    if beta is not None and qbb is not None:
        beta, sb = linear_quantize(beta, qbb)
    return alpha, sa, beta, sb


def conv_layers(model: nn.Module) -> list[str]:
    """Every Conv2d, in forward order: what ``-Q`` quantizes."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------- straight-through quantization
class _LinearQuantSTE(torch.autograd.Function):
    """Forward: exactly ``linear_quantize(x, bits)``; backward: the identity (straight through).

    ``x + (q - x).detach()`` would round twice and miss the grid by an ulp; this does not."""

    @staticmethod
    def forward(ctx, x, bits):
        return linear_quantize(x, bits)[0].to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste_quantize(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    return x if not bits else _LinearQuantSTE.apply(x, bits)


class QuantSTE(nn.Module):
    """Parametrization: a weight on the ``bits``-bit grid of its own tensor, trained straight through."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def forward(self, x):
        return ste_quantize(x, self.bits)


def latent_init(x: torch.Tensor, scale: float | None, bits: int | None) -> torch.Tensor:
    """A float tensor whose ``linear_quantize`` gives back ``x`` (already on the grid of ``scale``).

    The original's grid spans ``max - min`` of the tensor and clips at ``-2^(b-1)`` and
    ``2^(b-1) - 1``, so quantizing a clipped tensor again would shrink its grid. One end of a
    quantized tensor always sits on the clamp bound; moving that end's element outwards, where
    it still rounds to the bound, restores the span and hence the scale.
    """
    x = x.detach().clone()
    if not bits or not scale or x.numel() < 2:
        return x
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.round(x / scale)
    span = (2**bits - 1) * scale
    flat = x.view(-1)
    lo, hi = flat.min(), flat.max()
    if q.min() <= qmin:
        flat[flat.argmin()] = hi - span
    elif q.max() >= qmax:
        flat[flat.argmax()] = lo + span
    return x


def on_grid(x: torch.Tensor, scale, bits: int) -> str | None:
    """Why ``x`` is not what ``linear_quantize`` at ``bits`` with ``scale`` gives, or None when it is."""
    if scale is None:
        return f"quantized to {bits} bits but no scale is stored"
    if scale == 0.0:
        if x.numel() and not bool((x == x.reshape(-1)[0]).all()):
            return "scale 0 but the values are not constant"
        return None
    q = (x / scale).round()
    if not torch.equal(q * torch.tensor(scale, dtype=x.dtype), x):
        return f"values are not on the grid of scale {scale}"
    if q.numel() and (q.min() < -(2 ** (bits - 1)) or q.max() > 2 ** (bits - 1) - 1):
        return f"grid indices outside {bits} bits"
    return None
