"""The search: the best affine fit of every target vector against every bank vector (docs/design.md §1).

    >>> from mess.search import search
    >>> r = search(bank, targets)            # bank (N, L), targets (M, L)
    >>> r.k, r.alpha, r.beta, r.residual     # per target: index, slope, offset, L1 residual

Targets go in blocks against the whole bank, never a Python loop over kernels; ``mess/fused.py``
does a block in one compiled pass, the plain path here in eager ops on (block, N) tensors.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .blocking import BUDGET_BYTES, block_size, by_rows, single_threaded_ops
from .fused import fused_search, use_fused
from .settings import EPS


# ---------------------------------------------------------------- the search
@dataclass
class SearchResult:
    k: torch.Tensor  # int64 (M,)
    alpha: torch.Tensor  # float32 (M,)
    beta: torch.Tensor | None  # float32 (M,); None without beta
    residual: torch.Tensor  # float32 (M,), the L1 residual of the chosen fit


def centre(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows minus their means. A constant row gets its own value as mean, so its centred
    vector is exactly zero (a float mean of equal values can be off by one ulp)."""
    const = (x == x[:, :1]).all(1)
    mean = torch.where(const, x[:, 0], x.mean(1))
    return x - mean[:, None], mean


def block_alpha(c_w: torch.Tensor, c_r_t: torch.Tensor, div: torch.Tensor,
                nan1: bool = False) -> torch.Tensor:
    """alpha of every (target, bank row) pair of a block, (B, N): ``<c_w, c_r> / div``.

    c_w (B, L) the centred targets, c_r_t (L, N) the centred bank transposed, div (N,) the
    denominators; ``nan1``: a NaN alpha becomes 1 (epsv3). The dot products add up position by
    position, every product and sum rounded on its own (no matrix product, no fused
    multiply-add): the operations of ``fused_residual_argmin`` in its order, so that the plain
    and the fused path round alike and pick the same k, bit for bit, even among near-ties.
    """
    dot = torch.mul(c_w[:, :1], c_r_t[0])
    tmp = torch.empty_like(dot)
    for i in range(1, c_r_t.shape[0]):
        dot.add_(torch.mul(c_w[:, i:i + 1], c_r_t[i], out=tmp))
    alpha = dot.div_(div)
    if nan1:
        alpha.masked_fill_(alpha.isnan(), 1.0)  # 0/0 of a zero-variance row
    return alpha


def residual_argmin(alpha: torch.Tensor, c_r_t: torch.Tensor, c_w: torch.Tensor):
    """L1 residual ``sum_l |alpha * c_r[l] - c_w[l]|`` of every (target, bank row) pair of a
    block, and its minimum over the bank (ties: smallest index).

    alpha (B, N), c_r_t (L, N) the centred bank transposed, c_w (B, L) the centred targets.
    Loops over the vector length L, never over kernels: the temporaries are (B, N). The plain
    path's kernel; ``fused_residual_argmin`` is the fused one, with the same operations in the
    same order (see ``block_alpha``), see ``search(fused=...)``.
    """
    res = torch.mul(alpha, c_r_t[0]).sub_(c_w[:, :1]).abs_()
    tmp = torch.empty_like(res)
    for i in range(1, c_r_t.shape[0]):
        res.add_(torch.mul(alpha, c_r_t[i], out=tmp).sub_(c_w[:, i:i + 1]).abs_())
    best, k = res.min(1)
    return best, k


def search(bank: torch.Tensor, targets: torch.Tensor, *, beta: bool = True, eps_mode: str | None = None,
           eps: float = EPS, device: torch.device | None = None, budget_bytes: int = BUDGET_BYTES,
           residual_fn: Callable | None = None, fused: bool | None = None) -> SearchResult:
    """Best affine fit of every target row against every bank row (docs/design.md §1).

    bank (N, L), targets (M, L). Targets go in blocks against the whole bank. Fused path
    (``fused_search``): one compiled kernel per block computes alpha, residual and argmin of
    every pair. Plain path: eager ops on (block, N) tensors, ``block_alpha`` then the residual
    and argmin by ``residual_fn`` (default ``residual_argmin``).
    ``fused``: True or False picks the path, None lets ``use_fused`` decide (MESS_SEARCH,
    problem size); a ``residual_fn`` implies the plain path, a failed compilation falls back
    to it. Both paths round every operation alike, so they give the same k (ties: smallest
    index) and residual bit for bit; alpha and beta of the chosen row are then computed row by
    row, the same way. Zero-variance bank rows get alpha 0 (or what ``eps_mode`` says), never
    NaN. Results come back on the CPU.

    On CPU the row-wise work runs single-threaded (intra-op threads would meet at a barrier
    after each small op, which stalls whenever the cores are shared: 10-30x seen); the bank
    search uses all of torch's threads, each taking blocks of targets as it finishes one.
    """
    device = torch.device(device) if device is not None else bank.device
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    rowwise = single_threaded_ops if device.type == "cpu" else nullcontext
    with rowwise():
        R = bank.detach().to(device, torch.float32)
        T = targets.detach().to(device, torch.float32)
        n, m = R.shape[0], T.shape[0]
        if n == 0:
            raise ValueError("empty bank")
        if beta:
            c_r, m_r = centre(R)
            c_w, m_w = by_rows(centre, threads, T)
        else:
            c_r, m_r = R.clone(), None
            c_w, m_w = T, None
        denom = (c_r * c_r).sum(1)
        zero = denom == 0  # constant rows, or rows whose squared norm underflows
        c_r[zero] = 0  # so their dot products are exactly 0: alpha becomes 0/denom, never x/0
        if eps_mode is None:
            div = torch.where(zero, torch.ones_like(denom), denom)
        elif eps_mode == "add":
            div = denom + eps
        elif eps_mode == "replace":
            div = torch.where(zero, torch.full_like(denom, eps), denom)
        elif eps_mode == "nan1":
            div = denom
        else:
            raise ValueError(f"unknown eps_mode {eps_mode!r}")
        c_r_mat = c_r.T.contiguous()  # (L, N): one contiguous row of the bank per position
    found = None
    if residual_fn is None and use_fused(fused, m * n, device):
        found = fused_search(c_w, c_r_mat, div, eps_mode == "nan1", budget_bytes, threads)
    if found is None:
        found = _plain_search(c_w, c_r_mat, div, eps_mode, budget_bytes, residual_fn or residual_argmin,
                              threads)
    r_out, k_out = found

    def fit(c_w, k, m_w=None):
        # the chosen alphas once more, row by row: unlike the blocks', their rounding does not
        # depend on the path or the block size: reproducible bit for bit
        alpha = (c_w * c_r.index_select(0, k)).sum(1).div_(div[k])
        if eps_mode == "nan1":
            alpha.masked_fill_(alpha.isnan(), 1.0)
        return (alpha, m_w - alpha * m_r[k]) if beta else (alpha,)

    with rowwise():
        a_out, *b_out = by_rows(fit, threads, c_w, k_out, *([m_w] if beta else []))
        return SearchResult(k_out.cpu(), a_out.cpu(), b_out[0].cpu() if beta else None, r_out.cpu())


def match_l2(bank: torch.Tensor, targets: torch.Tensor, *, beta: bool = True,
             block: int = 65536) -> torch.Tensor:
    """k of every target by the least *squared* residual of its affine fit: with centred rows c_r and
    targets c_w that residual is ``||c_w||^2 - <c_w, c_r>^2 / ||c_r||^2``, so k maximises
    ``<c_w, c_r / ||c_r||>^2``, one matrix product per block (ties: smallest index). A learned bank
    is fitted to this error (``mess.bank``), so it is the search that matches it."""
    R, T = bank.detach().float(), targets.detach().float()
    c_r = centre(R)[0] if beta else R
    c_w = centre(T)[0] if beta else T
    norm = c_r.norm(dim=1, keepdim=True)
    hat = torch.where(norm > 0, c_r / norm.clamp_min(1e-30), torch.zeros_like(c_r))
    out = []
    for i in range(0, c_w.shape[0], block):
        out.append((c_w[i:i + block] @ hat.T).square_().argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def _plain_search(c_w: torch.Tensor, c_r_mat: torch.Tensor, div: torch.Tensor, eps_mode: str | None,
                  budget_bytes: int, residual_fn: Callable,
                  workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(best residual, k) of every target by the plain path: per block ``block_alpha``, then
    ``residual_fn``; on CPU ``workers`` threads take one block each."""
    device = c_w.device
    m, n = c_w.shape[0], c_r_mat.shape[1]
    k_out = torch.empty(m, dtype=torch.int64, device=device)
    r_out = torch.empty(m, dtype=torch.float32, device=device)
    step = block_size(n, device, budget_bytes // workers)

    def run_block(s):
        cw = c_w[s:s + step]
        alpha = block_alpha(cw, c_r_mat, div, eps_mode == "nan1")
        r_out[s:s + step], k_out[s:s + step] = residual_fn(alpha, c_r_mat, cw)

    starts = range(0, m, step)
    if workers > 1 and len(starts) > 1:
        # CPU: one block per thread, each op single-threaded. Intra-op threads would meet at a
        # barrier after every small op, which stalls whenever the cores are shared (10x seen).
        with single_threaded_ops(), ThreadPoolExecutor(min(workers, len(starts))) as pool:
            list(pool.map(run_block, starts))
    else:
        with single_threaded_ops() if device.type == "cpu" else nullcontext():
            for s in starts:
                run_block(s)
    return r_out, k_out
