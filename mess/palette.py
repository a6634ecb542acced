"""The peers of MESS: k-means palettization and per-layer kernel codebooks (docs/design.md §9).

    >>> from mess.palette import palettize
    >>> ckpt = palettize(model, "kmeans", bits=2, granularity="channel")   # {"model", "palette"}
    >>> ckpt = palettize(model, "vq", bits=6)                               # 64 3x3 kernels per layer

What a researcher would otherwise use, inside the tool so that it is counted by the same account
(``mess.account``), packed in the same ``.mess`` files and fine-tuned by the same loop:

* ``kmeans``: every conv weight's values replaced by the nearest of ``2^bits`` values of a look-up
  table (LUT) fitted by 1-D k-means, one LUT per layer (``tensor``: Deep Compression, TF-MOT's
  weight clustering) or per output channel (``channel``: coremltools' per-channel palettization);
* ``vq``: every 3x3 conv's kernels replaced by the nearest of ``2^bits`` 3x3 kernels of a codebook
  fitted by k-means per layer (product quantization with 9-value sub-vectors); other convs stay
  float32.

LUT and codebook values are float16 (as coremltools stores them), so a decoded weight is exactly
``lut[idx]`` with float16 values. FC layers, BatchNorm and biases stay float32, as in MESS.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError

METHODS = ("kmeans", "vq")
GRANULARITIES = ("tensor", "channel")
MAX_PALETTE_BITS = 8
KMEANS_ITERS = 300  # Lloyd stops earlier, when no boundary moves (10-100 steps, typically)
KPP_POINTS = 2**13  # k-means++ seeds a row from at most this many of its values
RESTART_VALUES = 2**24  # the restarts of a layer's rows hold at most this many values at once


class PaletteError(ValueError):
    pass


def check_palette(method: str, bits: int, granularity: str | None) -> None:
    if method not in METHODS:
        raise UserError(f"--method must be one of linear, {', '.join(METHODS)}, got {method!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_PALETTE_BITS:
        raise UserError(f"{method} palettes take 1 to {MAX_PALETTE_BITS} bits (--qb), got {bits}")
    if method == "kmeans" and granularity not in GRANULARITIES:
        raise UserError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


def half(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 values, kept in float32."""
    return x.detach().float().half().float()


# ---------------------------------------------------------------- fitting
def kmeans_1d(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = 0) -> torch.Tensor:
    """``k`` centroids (sorted, float32) of the rows of ``x`` (R, n), one 1-D k-means per row, batched.

    A row with at most ``k`` distinct values keeps them (the last one repeated): it palettizes without
    loss. The others: greedy k-means++ seeds (``_kmeanspp``), then Lloyd's iteration until no cluster
    boundary moves, exact in 1-D (clusters are runs of the sorted row, found by bisection at the
    midpoints between centroids; their sums by prefix sums). A row where a cluster empties is finished
    alone, its empty clusters re-seeded at the worst-fitted values (``_lloyd_row``). Small k restart
    (``restarts(k)`` seeds, the lowest squared error kept per row), where a start costs least."""
    x = x.detach()
    R, n = x.shape
    if n == 0:
        return torch.zeros(R, k)
    xs = x.double().sort(1).values
    C = torch.empty(R, k, dtype=torch.float64)
    few = (1 + (xs[:, 1:] > xs[:, :-1]).sum(1)) <= k
    for r in few.nonzero().flatten().tolist():
        u = xs[r].unique()
        C[r] = torch.cat([u, u[-1:].expand(k - len(u))])
    many = (~few).nonzero().flatten()
    if len(many):
        X = xs[many]
        t = max(1, min(restarts(k), RESTART_VALUES // X.numel()))  # the starts run as extra rows, and
        # fewer of them where the copies would pass RESTART_VALUES values
        Xt = X.repeat(t, 1)
        Ct = _kmeans_rows(Xt, k, seed, iters)
        best = _sse(Xt, Ct).view(t, -1).argmin(0)  # per row, its start of the lowest squared error
        C[many] = Ct.view(t, -1, k)[best, torch.arange(len(many))]
    return C.float()


def kpp_trials(k: int) -> int:
    """Candidates per k-means++ step, the best kept (greedy). scikit-learn takes ``2 + ln k``; with the
    restarts below, 2 gave the same squared errors on ResNet-20/56 at half the seeding time."""
    return 2


def restarts(k: int) -> int:
    """k-means starts per row: 8 up to k = 32, then fewer (one at k = 256): about 256 seeding steps."""
    return max(1, min(8, 256 // k))


def _sse(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Squared error of each sorted row of ``X`` against its nearest centroid of the sorted rows of ``C``."""
    idx = torch.searchsorted(((C[:, :-1] + C[:, 1:]) / 2).contiguous(), X)
    return (X - C.gather(1, idx)).square().sum(1)


def _kmeans_rows(X: torch.Tensor, k: int, seed: int, iters: int) -> torch.Tensor:
    """Centroids (R, k) of sorted float64 rows, each holding more than ``k`` distinct values."""
    R, n = X.shape
    C = torch.empty(R, k, dtype=torch.float64)
    step = max(1, 2**22 // min(n, KPP_POINTS) // kpp_trials(k))  # rows seeded at a time
    for s in range(0, R, step):
        C[s:s + step] = _kmeanspp(X[s:s + step], k, seed + s)
    C = C.sort(1).values
    S = torch.cat([torch.zeros(R, 1, dtype=X.dtype), X.cumsum(1)], 1)
    zero, end = torch.zeros(R, 1, dtype=torch.int64), torch.full((R, 1), n, dtype=torch.int64)
    edges, bad = None, torch.zeros(R, dtype=torch.bool)
    for _ in range(iters):
        new = torch.cat([zero, torch.searchsorted(X, ((C[:, :-1] + C[:, 1:]) / 2).contiguous(), right=True),
                         end], 1)
        if edges is not None and torch.equal(new, edges):
            break
        edges = new
        cnt = edges[:, 1:] - edges[:, :-1]
        empty = cnt == 0
        bad |= empty.any(1) | (C[:, 1:] <= C[:, :-1]).any(1)  # duplicate seeds, empty clusters
        C = torch.where(empty, C, (S.gather(1, edges[:, 1:]) - S.gather(1, edges[:, :-1])) / cnt.clamp(min=1))
    for r in bad.nonzero().flatten().tolist():
        u, counts = X[r].unique(return_counts=True)
        C[r] = _lloyd_row(u, counts.double(), _kmeanspp(u[None], k, seed + r, counts.double()[None])[0], k,
                          iters)
    return C


def _kmeanspp(X: torch.Tensor, k: int, seed: int, W: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-means++ seeds (``kpp_trials`` candidates a step, the best kept) of every row of ``X``
    (R, n) at once, ``W`` weighting the points. Only the seeding subsamples: a row of more
    than ``KPP_POINTS`` values is seeded from that many, evenly spaced in sorted order."""
    R, n = X.shape
    if n > KPP_POINTS:
        pick = torch.linspace(0, n - 1, KPP_POINTS).round().long()
        X, W = X[:, pick], None if W is None else W[:, pick]
        n = KPP_POINTS
    X, W = X.float(), None if W is None else W.float()  # float32 halves the cost of the candidates' scores
    g = torch.Generator().manual_seed(seed)
    trials = kpp_trials(k)
    rows = torch.arange(R)
    out = torch.empty(R, k, dtype=torch.float64)
    mass = torch.ones_like(X).cumsum(1) if W is None else W.cumsum(1)
    c = X.gather(1, torch.searchsorted(mass, torch.rand(R, 1, generator=g) * mass[:, -1:]).clamp(max=n - 1))
    out[:, 0] = c[:, 0]
    d = (X - c).square()
    for j in range(1, k):
        pot = (d if W is None else W * d).cumsum(1)
        cand = X.gather(1, torch.searchsorted(pot, torch.rand(R, trials, generator=g) * pot[:, -1:])
                        .clamp(max=n - 1))  # (R, trials), drawn with probability ~ distance^2
        nd = torch.minimum(d[:, None, :], (X[:, None, :] - cand[:, :, None]).square())  # (R, trials, n)
        best = (nd if W is None else W[:, None, :] * nd).sum(2).argmin(1)
        d = nd[rows, best]
        out[:, j] = cand[rows, best]
    return out


def _lloyd_row(u: torch.Tensor, w: torch.Tensor, c: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Lloyd on one row of sorted distinct values ``u`` with counts ``w`` from seeds ``c``; an empty
    cluster (or a duplicate seed) is re-seeded at the value with the largest weighted squared error."""
    u, w, c = u.numpy(), w.numpy(), np.unique(c.numpy())
    n = len(u)
    cw, cs = np.concatenate([[0.0], np.cumsum(w)]), np.concatenate([[0.0], np.cumsum(w * u)])
    edges = None
    for _ in range(iters):
        if len(c) < k:  # more than k distinct values: the worst-fitted ones are not centroids yet
            near = np.searchsorted((c[:-1] + c[1:]) / 2, u) if len(c) > 1 else np.zeros(n, np.int64)
            worst = np.argsort(-(w * (u - c[near]) ** 2), kind="stable")[:k - len(c)]
            c = np.sort(np.concatenate([c, u[worst]]))
        new = np.concatenate([[0], np.searchsorted(u, (c[:-1] + c[1:]) / 2, side="right"), [n]])
        if edges is not None and np.array_equal(new, edges):
            break
        edges = new
        m = cw[edges[1:]] - cw[edges[:-1]]
        full = m > 0
        c = (cs[edges[1:]] - cs[edges[:-1]])[full] / m[full]  # ascending: means of disjoint sorted runs
        if not full.all():
            edges = None  # re-seeded next round
    return torch.from_numpy(c)


def nearest_1d(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest LUT value of every element of each row (ties: the lower value)."""
    lut_sorted, order = lut.sort(1)
    mid = (lut_sorted[:, 1:] + lut_sorted[:, :-1]) / 2
    pos = torch.searchsorted(mid.contiguous(), x.contiguous(), right=False)
    return order.gather(1, pos)


def nearest_rows(x: torch.Tensor, book: torch.Tensor, block: int = 65536) -> torch.Tensor:
    out = []
    bb = (book * book).sum(1)
    for i in range(0, x.shape[0], block):
        xb = x[i:i + block]
        out.append((bb[None] - 2 * xb @ book.T).argmin(1))
    return torch.cat(out)


@dataclass
class PaletteLayer:
    idx: torch.Tensor  # int64: the weight's shape (kmeans), or one per 3x3 kernel (vq)
    lut: torch.Tensor  # float32 holding float16 values: (2^b,), (O, 2^b) or (2^b, 9)

    def decode(self, shape, method: str, granularity: str | None) -> torch.Tensor:
        if method == "vq":
            return self.lut[self.idx].reshape(shape)
        if granularity == "channel":
            return self.lut.gather(1, self.idx.reshape(shape[0], -1)).reshape(shape)
        return self.lut[self.idx]


@dataclass
class Palette:
    """The ``palette`` entry of a checkpoint: method, bits, granularity and per layer idx and LUT."""
    method: str
    bits: int
    granularity: str | None = None  # kmeans only
    layers: dict[str, PaletteLayer] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "bits": self.bits, "granularity": self.granularity,
                "layers": {n: {"idx": p.idx, "lut": p.lut} for n, p in self.layers.items()}}

    @classmethod
    def from_dict(cls, d) -> Palette:
        if isinstance(d, Palette):
            return d
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict):
            raise UserError("the palette entry has no layers")
        check_palette(d.get("method"), d.get("bits"), d.get("granularity") if d.get("method") == "kmeans"
                      else "tensor")
        layers = {}
        for n, e in d["layers"].items():
            idx, lut = (e.get("idx"), e.get("lut")) if isinstance(e, dict) else (None, None)
            if not (isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
                    and isinstance(lut, torch.Tensor) and lut.dtype == torch.float32):
                raise UserError(f"palette layer {n}: idx must be int64 and lut float32 tensors")
            layers[n] = PaletteLayer(idx, lut)
        return cls(d["method"], d["bits"], d.get("granularity") if d["method"] == "kmeans" else None, layers)

    def lut_shape(self, shape) -> tuple:
        k = 2 ** self.bits
        if self.method == "vq":
            return (k, 9)
        return (shape[0], k) if self.granularity == "channel" else (k,)

    def idx_shape(self, shape) -> tuple:
        if self.method == "vq":
            n = 1
            for d in shape:
                n *= d
            return (n // 9,)
        return tuple(shape)

    def check(self, state_dict: dict) -> None:
        """Raise ``PaletteError`` unless every listed weight is exactly its decoded palette."""
        k = 2 ** self.bits
        for n, p in self.layers.items():
            w = state_dict.get(f"{n}.weight")
            if w is None:
                raise PaletteError(f"palette layer {n} has no weight in the state_dict")
            if self.method == "vq" and tuple(w.shape[-2:]) != (3, 3):
                raise PaletteError(f"{n}: a kernel codebook needs a 3x3 conv, not {tuple(w.shape)}")
            if tuple(p.lut.shape) != self.lut_shape(w.shape) or tuple(p.idx.shape) != self.idx_shape(w.shape):
                raise PaletteError(f"{n}: lut {tuple(p.lut.shape)} / idx {tuple(p.idx.shape)} do not fit its "
                                   f"weight {tuple(w.shape)} at {self.bits} bits")
            if p.idx.numel() and (p.idx.min() < 0 or p.idx.max() >= k):
                raise PaletteError(f"{n}: index outside the {k} entries of its palette")
            if not torch.equal(half(p.lut), p.lut):
                raise PaletteError(f"{n}: palette values are not float16 values")
            if not torch.equal(p.decode(w.shape, self.method, self.granularity), w):
                raise PaletteError(f"{n}: weight differs from its palette")


def palette_layers(model: nn.Module, method: str) -> list[str]:
    """Every Conv2d (kmeans), every 3x3 Conv2d (vq), in forward order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)
            and (method == "kmeans" or m.kernel_size == (3, 3))]


def fit_layer(w: torch.Tensor, method: str, bits: int, granularity: str | None,
              seed: int = 0) -> PaletteLayer:
    k = 2 ** bits
    w = w.detach().float()
    if method == "vq":
        x = w.reshape(-1, 9)
        uniq = torch.unique(x, dim=0)
        if uniq.shape[0] <= k:
            book = torch.cat([uniq, uniq[:1].expand(k - uniq.shape[0], -1)])
        else:
            from .bank import kmeans_faiss
            book, _ = kmeans_faiss(x, k, iters=20, seed=seed, spherical=False)
        book = half(book)
        return PaletteLayer(nearest_rows(x, book), book)
    rows = w.reshape(w.shape[0], -1) if granularity == "channel" else w.reshape(1, -1)
    lut = half(kmeans_1d(rows, k))
    idx = nearest_1d(rows, lut)
    return PaletteLayer(idx.reshape(w.shape), lut if granularity == "channel" else lut[0])


def palettize(model: nn.Module, method: str = "kmeans", bits: int = 2,
              granularity: str | None = "tensor", layers: list[str] | None = None) -> dict:
    """The palettized checkpoint dict of ``model`` (not changed): ``{"model", "palette"}``."""
    granularity = granularity if method == "kmeans" else None
    check_palette(method, bits, granularity or "tensor")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pal = Palette(method, bits, granularity)
    for n in layers if layers is not None else palette_layers(model, method):
        p = fit_layer(sd[f"{n}.weight"], method, bits, granularity)
        sd[f"{n}.weight"] = p.decode(sd[f"{n}.weight"].shape, method, granularity)
        pal.layers[n] = p
    return {"model": sd, "palette": pal.to_dict()}


# ---------------------------------------------------------------- fine-tuning the LUTs
class _Lookup(torch.autograd.Function):
    """``lut[idx]``; backward: each entry gets the MEAN of its members' gradients. The sum would scale
    a centroid's step with its member count (thousands for a 2-bit layer), which measured 13.6 %
    top-1 after fine-tuning where the mean kept 87.9 %."""

    @staticmethod
    def forward(ctx, lut, flat_idx, counts):
        ctx.save_for_backward(flat_idx, counts)
        ctx.shape = lut.shape
        return lut.reshape(-1)[flat_idx]

    @staticmethod
    def backward(ctx, grad):
        flat_idx, counts = ctx.saved_tensors
        g = torch.zeros(counts.numel(), dtype=grad.dtype, device=grad.device)
        g.index_add_(0, flat_idx.reshape(-1), grad.reshape(-1))
        return (g / counts.clamp_min(1)).reshape(ctx.shape), None, None


class _Half(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return half(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class PaletteWeight(nn.Module):
    """Parametrization of a palettized conv weight: ``lut[idx]``, idx fixed, the LUT trainable and kept
    on float16 values straight through."""

    def __init__(self, p: PaletteLayer, shape, method: str, granularity: str | None):
        super().__init__()
        self.shape, self.method, self.granularity = tuple(shape), method, granularity
        self.lut = nn.Parameter(p.lut.detach().clone())
        self.register_buffer("idx", p.idx.detach().clone())
        flat = self._flat_idx()
        self.register_buffer("flat", flat)
        self.register_buffer("counts", torch.bincount(flat.reshape(-1), minlength=p.lut.numel()).float())

    def _flat_idx(self) -> torch.Tensor:
        lut = self.lut
        if self.method == "vq":  # each kernel index picks 9 consecutive values of the (K, 9) codebook
            return (self.idx[:, None] * 9 + torch.arange(9)).reshape(self.shape)
        if self.granularity == "channel":
            rows = self.idx.reshape(self.shape[0], -1)
            return (rows + torch.arange(self.shape[0])[:, None] * lut.shape[1]).reshape(self.shape)
        return self.idx

    def forward(self, X):
        return _Lookup.apply(_Half.apply(self.lut), self.flat, self.counts).reshape(self.shape)


def parametrize_palette(model: nn.Module, palette) -> list[str]:
    """Register a ``PaletteWeight`` on every palettized conv; the first forward pass is the checkpoint's."""
    from torch.nn.utils import parametrize as tp
    pal = Palette.from_dict(palette)
    for n, p in pal.layers.items():
        conv = model.get_submodule(n)
        tp.register_parametrization(conv, "weight", PaletteWeight(p, conv.weight.shape, pal.method,
                                                                  pal.granularity))
        conv.parametrizations.weight.original.requires_grad_(False)
    model._mess_palette = pal
    return list(pal.layers)


def export_palette(model: nn.Module, palette=None) -> dict:
    """The ``palette`` entry of a parametrized model: its current float16 LUTs, the same indices."""
    pal = Palette.from_dict(palette) if palette is not None else model._mess_palette
    out = Palette(pal.method, pal.bits, pal.granularity)
    for n, p in pal.layers.items():
        pw = model.get_submodule(n).parametrizations.weight[0]
        out.layers[n] = PaletteLayer(p.idx.clone(), half(pw.lut).detach().cpu())
    return out.to_dict()
