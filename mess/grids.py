"""The grids of alpha, beta and a learned bank (docs/design.md §3).

    >>> from mess.grids import grid_quantize
    >>> a, scale = grid_quantize(alpha, 8, "mse", weight=norms)   # or "minmax": the original's

``minmax`` is the original's grid (``mess.quant.linear_quantize``: the span max - min cut in 2^b steps,
centred on zero, so a tensor far from zero is clipped). ``mse`` is a symmetric grid whose clipping
point is chosen to minimise the (weighted) squared error: a few outliers (|alpha| up to 99 for targets
fitted to nearly constant bank rows) no longer stretch the grid until most values round to 0.
Both store ``q * scale`` with ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``: the same checks and packing.
"""
from __future__ import annotations

import torch

from .errors import UserError
from .quant import linear_quantize
from .settings import GRIDS

MSE_STEPS = 60  # clipping points tried, as fractions 0.05 .. 1 of max |x|


def check_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise UserError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    return grid


def on_scale(x: torch.Tensor, scale: float, bits: int) -> torch.Tensor:
    """``x`` rounded onto the grid of ``scale``: ``clamp(round(x / scale)) * scale`` (scale 0: unchanged)."""
    if not scale:
        return x.clone()
    s = torch.tensor(scale, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s


def mse_scale(x: torch.Tensor, bits: int, weight: torch.Tensor | None = None) -> float:
    """The scale of the symmetric ``bits``-bit grid with the least ``sum weight * (x - Q(x))^2``."""
    x = x.detach().float().reshape(-1)
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0:
        return 0.0
    if not torch.isfinite(torch.tensor(top)):
        raise UserError("cannot quantize a tensor holding NaN or inf")
    w = torch.ones_like(x) if weight is None else weight.detach().float().reshape(-1)
    qmax = 2 ** (bits - 1) - 1
    cands = torch.linspace(0.05, 1.0, MSE_STEPS, dtype=torch.float64) * top / max(qmax, 1)
    errs = [float((w * (x - on_scale(x, float(s), bits)).square()).sum()) for s in cands.float()]
    return float(cands.float()[min(range(len(errs)), key=errs.__getitem__)])


def grid_quantize(x: torch.Tensor, bits: int, grid: str = "mse",
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """``(x', scale)`` of ``x`` on the ``grid`` at ``bits`` (``weight``: per-value importance, mse only)."""
    if grid == "minmax":
        return linear_quantize(x, bits)
    check_grid(grid)
    x = x.detach().float()
    if x.numel() and bool((x == x.reshape(-1)[0]).all()) and float(x.reshape(-1)[0]) != 0.0:
        return x.clone(), 0.0  # a constant: stored as the scale itself, as linear_quantize does
    scale = mse_scale(x, bits, weight)
    return on_scale(x, scale, bits), scale


# ---------------------------------------------------------------- straight through, scale fixed
class _FixedGridSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits):
        return on_scale(x, scale, bits)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def ste_fixed(x: torch.Tensor, scale: float | None, bits: int | None) -> torch.Tensor:
    """``x`` on a grid whose scale stays fixed while training (the mse grid's), straight through."""
    return x if not bits or scale is None else _FixedGridSTE.apply(x, float(scale), bits)
