"""A plain per-kernel MESS search, straight from docs/design.md §1: the yardstick the
vectorized search is tested and benchmarked against. One target at a time, against the
whole bank; bank vectors built with explicit Python loops. Deliberately slow."""
from __future__ import annotations

import numpy as np
import torch

EPS = 1e-8

# docs/design.md §3, written out independently of find_similar_kernel.VERSION_SPECS
VERSION_SEARCH = {
    "v2": {}, "v2q": {}, "v2qq": {}, "v2f": {},
    "v2qq-epsv1": {"eps_mode": "add"}, "v2qq-epsv2": {"eps_mode": "replace"},
    "v2qq-epsv3": {"eps_mode": "nan1"},
    "v2nb": {"beta": False},
    "v2.5": {"bind": 2},
    "v3": {"transforms": True},
}


def _row_stats(x: torch.Tensor, beta: bool):
    """Mean and centred vector of one row; an all-equal row is exactly zero-variance."""
    if not beta:
        return torch.zeros(()), x.clone()
    if bool((x == x[0]).all()):
        return x[0].clone(), torch.zeros_like(x)
    m = x.mean()
    return m, x - m


def loop_search(bank: torch.Tensor, targets: torch.Tensor, beta: bool = True, eps_mode: str | None = None):
    """(k, alpha, beta, residuals (M, N)) for every target, one target at a time."""
    R = bank.float()
    stats = [_row_stats(r, beta) for r in R]
    m_r = torch.stack([s[0] for s in stats])
    c_r = torch.stack([s[1] for s in stats])
    denom = (c_r * c_r).sum(1)
    c_r[denom == 0] = 0
    ks, alphas, betas, residuals = [], [], [], []
    for w in targets.float():
        m_w, c_w = _row_stats(w, beta)
        numer = c_r @ c_w
        if eps_mode == "add":
            a = numer / (denom + EPS)
        elif eps_mode == "replace":
            a = numer / torch.where(denom == 0, torch.full_like(denom, EPS), denom)
        elif eps_mode == "nan1":
            a = numer / denom
            a[torch.isnan(a)] = 1.0
        else:
            a = torch.where(denom == 0, torch.zeros_like(numer), numer / denom)
        b = m_w - a * m_r
        res = (a[:, None] * R + b[:, None] - w).abs().sum(1) if beta else (a[:, None] * R - w).abs().sum(1)
        k = int(torch.argmin(res))
        ks.append(k)
        alphas.append(float(a[k]))
        betas.append(float(b[k]))
        residuals.append(res)
    return (torch.tensor(ks, dtype=torch.int64), torch.tensor(alphas), torch.tensor(betas),
            torch.stack(residuals) if residuals else torch.zeros(0, len(R)))


def kernel_bank(weight: torch.Tensor, bind: int = 1, transforms: bool = False) -> torch.Tensor:
    """Bank vectors of a 3x3 layer, kernel by kernel; with transforms, the 8 rotations/flips
    of each kernel follow it (numpy's rot90 / fliplr, counter-clockwise)."""
    kernels = [weight[o, i] for o in range(weight.shape[0]) for i in range(weight.shape[1])]
    if transforms:
        out = []
        for k in kernels:
            a = k.numpy()
            for t in range(8):
                b = np.fliplr(a) if t >= 4 else a
                out.append(torch.from_numpy(np.rot90(b, t % 4).copy()).reshape(9))
        return torch.stack(out)
    flat = [k.reshape(9) for k in kernels]
    return torch.stack([torch.cat(flat[j:j + bind]) for j in range(0, len(flat), bind)])


def kernel_targets(weight: torch.Tensor, bind: int = 1) -> torch.Tensor:
    return kernel_bank(weight, bind)


def pointwise_bank(weight: torch.Tensor, d: int) -> torch.Tensor:
    w = weight.reshape(weight.shape[0], -1)
    return torch.stack([w[o, j:j + d] for o in range(w.shape[0]) for j in range(w.shape[1] - d + 1)])


def pointwise_targets(weight: torch.Tensor, d: int) -> torch.Tensor:
    w = weight.reshape(weight.shape[0], -1)
    return torch.stack([w[o, j:j + d] for o in range(w.shape[0]) for j in range(0, w.shape[1] - d + 1, d)])


def linear_quantize(x: torch.Tensor, bits: int):
    """docs/design.md §3, value by value."""
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return x.clone(), 0.0
    scale = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(2**bits - 1))
    q = [min(max(round(float(np.float32(v) / scale)), -(2 ** (bits - 1))), 2 ** (bits - 1) - 1)
         for v in x.flatten().tolist()]
    return (torch.tensor(q, dtype=torch.float32) * torch.tensor(scale)).reshape(x.shape), float(scale)
