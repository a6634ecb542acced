"""A learned bank: N vectors fitted to the kernels they will serve (docs/design.md §2).

    >>> from mess.bank import fit_bank
    >>> bank = fit_bank(targets, 256)          # (M, L) kernels -> (256, L) unit-norm, zero-mean shapes

What the affine fit ``alpha * r + beta`` cannot change is a kernel's *shape*: its centred vector up
to scale and sign. The least-squares residual of kernel w against row r is
``||c_w||^2 (1 - <s_w, r>^2)`` with ``s_w = c_w / ||c_w||`` and r a unit-norm, zero-mean row. So the
bank is a sign-invariant, weighted spherical k-means of the shapes s_w with weights ``||c_w||^2``:

1. k-means++ seeding with the sign-invariant distance, then faiss's weighted spherical k-means
   (``faiss.Kmeans``; bench/bench_kmeans.py measures it against scikit-learn's KMeans) on the shapes
   with their sign made canonical (the largest-magnitude entry positive), so that s and -s meet;
2. a few sign-invariant Lloyd steps: each shape goes to the row of largest ``<s, r>^2``, each row
   becomes the top eigenvector of its members' weighted scatter ``sum u s s^T`` (the exact minimiser
   of the cluster's residual); an emptied row takes the worst-fitted shape.

Without beta (v2nb) nothing is centred: rows are unit-norm directions of the raw vectors.
"""
from __future__ import annotations

import torch

DEFAULT_ITERS = 20  # faiss k-means iterations
REFINE_ITERS = 5  # sign-invariant Lloyd steps after it
SAMPLE_PER_ROW = 512  # shapes per bank row the k-means sees at most (faiss's own subsampling rule)
TINY = 1e-8  # kernels with a centred norm below this carry no shape and are left out


def shapes(vectors: torch.Tensor, centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit shapes, weights ``||c||^2``) of the vectors whose centred norm is not tiny."""
    v = vectors.detach().float()
    c = v - v.mean(1, keepdim=True) if centred else v
    norm = c.norm(dim=1)
    keep = norm > TINY
    return c[keep] / norm[keep, None], norm[keep].square()


def canonical_sign(s: torch.Tensor) -> torch.Tensor:
    """Each row times the sign of its largest-magnitude entry."""
    idx = s.abs().argmax(1, keepdim=True)
    return s * torch.where(s.gather(1, idx) < 0, -1.0, 1.0)


def kmeans_faiss(x: torch.Tensor, n: int, weight: torch.Tensor | None = None, *, iters: int = DEFAULT_ITERS,
                 seed: int = 0, spherical: bool = False, max_points: int | None = None,
                 init: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(centroids (n, L), faiss's final objective) of a weighted k-means by faiss."""
    import faiss
    import numpy as np

    xs = np.ascontiguousarray(x.detach().float().numpy())
    km = faiss.Kmeans(xs.shape[1], n, niter=iters, seed=seed, spherical=spherical, verbose=False,
                      min_points_per_centroid=1,
                      max_points_per_centroid=max_points or max(1, xs.shape[0] // n + 1))
    w = None if weight is None else np.ascontiguousarray(weight.detach().float().numpy())
    km.train(xs, weights=w, init_centroids=None if init is None else np.ascontiguousarray(init.numpy()))
    return torch.from_numpy(km.centroids.copy()), float(km.obj[-1]) if len(km.obj) else float("nan")


def kmeans_pp(s: torch.Tensor, u: torch.Tensor, n: int, g: torch.Generator,
              sample: int = 20000) -> torch.Tensor:
    """k-means++ seeding of ``n`` rows among the shapes ``s`` (a sample of at most ``sample``), with the
    sign-invariant weighted distance ``u (1 - <s, r>^2)``: rows start spread over the shapes, so that
    Lloyd's steps do not leave two true shapes merged in one row."""
    if s.shape[0] > sample:
        pick = torch.randperm(s.shape[0], generator=g)[:sample]
        s, u = s[pick], u[pick]
    first = int(torch.multinomial(u, 1, generator=g))
    rows = [first]
    d = u * (1 - (s @ s[first]).square()).clamp_min(0)
    for _ in range(1, n):
        total = d.sum()
        i = int(torch.multinomial(d, 1, generator=g)) if total > 0 else int(torch.randint(s.shape[0], (1,),
                                                                                         generator=g))
        rows.append(i)
        d = torch.minimum(d, u * (1 - (s @ s[i]).square()).clamp_min(0))
    return s[rows].clone()


def assign(s: torch.Tensor, rows: torch.Tensor, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(row of largest ``<s, r>^2``, that value) of every shape, in blocks."""
    ks, best = [], []
    for i in range(0, s.shape[0], block):
        d = (s[i:i + block] @ rows.T).square_()
        b, k = d.max(1)
        ks.append(k)
        best.append(b)
    return torch.cat(ks), torch.cat(best)


def refine(s: torch.Tensor, u: torch.Tensor, rows: torch.Tensor, iters: int = REFINE_ITERS) -> torch.Tensor:
    """Sign-invariant weighted Lloyd steps (module docstring, step 2)."""
    n, L = rows.shape
    for _ in range(iters):
        k, fit = assign(s, rows)
        scatter = torch.zeros(n, L * L, dtype=torch.float64)
        for i in range(0, s.shape[0], 65536):
            si, ui = s[i:i + 65536].double(), u[i:i + 65536].double()
            scatter.index_add_(0, k[i:i + 65536], (ui[:, None, None] * si[:, :, None] * si[:, None, :])
                               .reshape(-1, L * L))
        scatter = scatter.reshape(n, L, L)
        count = torch.bincount(k, minlength=n)
        _, vecs = torch.linalg.eigh(scatter)
        new = vecs[:, :, -1].float()
        empty = (count == 0).nonzero().flatten()
        if empty.numel():  # refill with the worst-fitted shapes, weighted residual u (1 - fit)
            worst = (u * (1 - fit)).argsort(descending=True)[:empty.numel()]
            new[empty[:worst.numel()]] = s[worst]
        rows = new
    return rows


def fit_bank(vectors: torch.Tensor, n: int, *, centred: bool = True, iters: int = DEFAULT_ITERS,
             refine_iters: int = REFINE_ITERS, seed: int = 0) -> torch.Tensor:
    """``n`` bank rows (unit norm; zero mean when ``centred``) fitted to ``vectors`` (M, L).

    Fewer distinct shapes than ``n``: the shapes themselves, padded with repeats of the first."""
    s, u = shapes(vectors, centred)
    if s.shape[0] == 0:
        rows = torch.zeros(n, vectors.shape[1])
        rows[:, 0] = 1.0
        return rows - rows.mean(1, keepdim=True) if centred else rows
    s = canonical_sign(s)
    if s.shape[0] <= n:
        return torch.cat([s, s[:1].expand(n - s.shape[0], -1)]) if s.shape[0] < n else s.clone()
    g = torch.Generator().manual_seed(seed)
    cap = SAMPLE_PER_ROW * n
    idx = torch.randperm(s.shape[0], generator=g)[:cap] if s.shape[0] > cap else torch.arange(s.shape[0])
    init = kmeans_pp(s[idx], u[idx], n, g)
    rows, _ = kmeans_faiss(s[idx], n, u[idx], iters=iters, seed=seed, init=init)
    rows = refine(s[idx], u[idx], rows, refine_iters)
    if centred:  # exact zero mean and unit norm again after the float32 updates
        rows = rows - rows.mean(1, keepdim=True)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(TINY)
