"""Compress a whole model: the search of a version on every covered layer (docs/design.md §1-§4).

    >>> import mess
    >>> c = mess.compress(model, "v2qq", qb=4)        # any nn.Module with 3x3 / 1x1 convs or linears
    >>> model.load_state_dict(c.state_dict)           # the compressed network, evaluated as any other
    >>> c.entry.kernel.bank_size, c.rows[0]["rel_error"]
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .bank import fit_bank
from .blocking import BUDGET_BYTES
from .entry import Entry, LayerCode, PathEntry
from .errors import UserError
from .grids import grid_quantize
from .layers import bank_vectors, plan_layers, put_vectors, reconstruct, target_vectors
from .quant import quantize_alpha_beta, quantize_layers
from .search import centre, match_l2, search
from .settings import Settings, index_bits


@dataclass
class Compressed:
    """A compressed network: its state_dict (covered weights equal to their reconstruction), the
    typed entry that says how, and per covered layer what the storage table shows."""
    state_dict: dict
    entry: Entry | None  # None: a float or plain-quantized file read by mess.load
    rows: list[dict]
    arch: dict | None = None  # what rebuilds the model (docs/design.md §4), when the caller knows it

    def checkpoint(self, **extra) -> dict:
        """The checkpoint dict of docs/design.md §4 (``torch.save`` it, or ``mess.save`` it packed)."""
        out = {"model": self.state_dict}
        if self.entry is not None:
            out["mess"] = self.entry.to_dict()
        if self.arch is not None:
            out["arch"] = self.arch
        out.update(extra)
        return out


def as_settings(settings: Settings | str, **kw) -> Settings:
    """``Settings`` from a version name and keyword settings, or the given ones (``kw`` overriding)."""
    if isinstance(settings, Settings):
        return replace(settings, **kw)  # validated again, as any new Settings
    return Settings(settings, **kw)


def compress(model: nn.Module, settings: Settings | str, *, arch: str | None = None,
             device: torch.device | None = None, budget_bytes: int = BUDGET_BYTES, **kw) -> Compressed:
    """Run the search of ``settings`` (a ``Settings``, or a version name with its fields as keywords:
    ``qb qba qbb bind_size pw_bind_size pointwise fc``) on every covered layer of ``model``, which is
    not changed. ``arch`` names one of the suite's architectures when it is one (mobilenets take their
    kernel bank from the first depthwise conv); any other model takes its first 3x3 conv.

    Returns the new state_dict, the entry, and per-layer statistics against the float weights.
    """
    s = as_settings(settings, **kw)
    spec = s.spec
    plans = plan_layers(model, arch, bind=s.bind, transforms=spec.transforms, pointwise=s.pointwise,
                        pw_bind=s.pw_bind_size, fc=s.fc)
    if plans["kernel"] is None and plans["pointwise"] is None:
        raise UserError(f"{arch or type(model).__name__} has no layer MESS can cover")
    orig = model.state_dict()
    sd = {k: v.detach().clone() for k, v in orig.items()}
    covered = [n for p in plans.values() if p for n in (p.bank, *p.targets)]
    wscales = quantize_layers(sd, covered, s.qb) if spec.quant_weights else {}
    entry = Entry(spec.name, s.weight_bits, s.alpha_bits, s.beta_bits, s.eps, s.fc, grid=s.grid)
    rows = []
    for kind, plan in plans.items():
        if plan is None:
            continue
        parts = [target_vectors(sd[f"{t}.weight"], kind, plan.bind) for t in plan.targets]
        W = torch.cat(parts)
        path = PathEntry(kind, plan.bank, plan.bind, plan.transforms, W.shape[1], 0, wscales.get(plan.bank))
        if s.learned:
            path.learned, path.learned_scale = learned_bank(W, s, spec.beta)
            B = path.bank_vectors(sd)
            k = match_l2(B, W, beta=spec.beta)
            alpha, beta = fit_fixed_k(B[k], W, spec.beta)
        else:
            B = bank_vectors(sd[f"{plan.bank}.weight"], kind, plan.bind, plan.transforms)
            res = search(B, W, beta=spec.beta, eps_mode=spec.eps_mode, device=device,
                         budget_bytes=budget_bytes)
            k, alpha, beta = res.k, res.alpha, res.beta
        path.bank_size = B.shape[0]
        rows.append({"layer": plan.bank, "path": f"{kind} bank" + (" layer" if s.learned else ""),
                     "targets": None, "bank": B.shape[0], "index_bits": None, "mean_residual": None,
                     "rel_error": rel_error(sd[f"{plan.bank}.weight"], orig[f"{plan.bank}.weight"])})
        start = 0
        for t, p in zip(plan.targets, parts):
            sl = slice(start, start + p.shape[0])
            start += p.shape[0]
            b = beta[sl].clone() if spec.beta else None
            code = quantize_code(B, p, k[sl].clone(), alpha[sl].clone(), b, s.grid, s.alpha_bits, s.beta_bits,
                                 wscales.get(t))
            vec = reconstruct(B, code.k, code.alpha, code.beta)
            sd[f"{t}.weight"] = put_vectors(sd[f"{t}.weight"], vec, kind, plan.bind)
            path.layers[t] = code
            w = orig[f"{t}.weight"]
            l1 = (vec - target_vectors(w, kind, plan.bind)).abs().sum(1)
            rows.append({"layer": t, "path": kind, "targets": p.shape[0], "bank": B.shape[0],
                         "index_bits": index_bits(B.shape[0]), "mean_residual": float(l1.mean()),
                         "rel_error": rel_error(sd[f"{t}.weight"], w)})
        setattr(entry, kind, path)
    return Compressed(sd, entry, rows)


def learned_bank(W: torch.Tensor, s: Settings, centred: bool) -> tuple[torch.Tensor, float | None]:
    """(rows, scale) of a learned bank for the target vectors ``W`` (``mess.bank.fit_bank``), on the
    grid of ``s.grid`` at the weight bits (float32 in v2)."""
    rows = fit_bank(W, s.bank_size, centred=centred)
    if s.weight_bits is None:
        return rows.contiguous(), None
    q, scale = grid_quantize(rows, s.weight_bits, s.grid)
    return q.contiguous(), scale


def quantize_code(B: torch.Tensor, W: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor,
                  beta: torch.Tensor | None, grid: str, alpha_bits: int | None, beta_bits: int | None,
                  weight_scale: float | None = None) -> LayerCode:
    """One layer's code with alpha and beta on their grids (docs/design.md §3).

    minmax: the original's, each quantized on its own. mse: alpha on the grid that minimises its
    error in weight space (each alpha weighted by ``||c_r||^2`` of its row), then beta refitted to the
    quantized alpha (``mean(w) - alpha' mean(r)``, the least-squares offset once alpha is fixed)
    before it is quantized in turn."""
    if grid == "minmax" or alpha_bits is None:
        alpha, sa, beta, sb = quantize_alpha_beta(alpha, beta, alpha_bits, beta_bits)
        return LayerCode(k, alpha, beta, sa, sb, weight_scale)
    R = B[k].float()
    c_r, m_r = centre(R) if beta is not None else (R, None)
    alpha, sa = grid_quantize(alpha, alpha_bits, grid, weight=(c_r * c_r).sum(1))
    sb = None
    if beta is not None:
        beta = W.float().mean(1) - alpha * m_r
        if beta_bits is not None:
            beta, sb = grid_quantize(beta, beta_bits, grid)
    return LayerCode(k, alpha, beta, sa, sb, weight_scale)


def rel_error(new: torch.Tensor, old: torch.Tensor) -> float:
    """Relative L1 error of a whole tensor."""
    return float((new - old).abs().sum() / old.abs().sum().clamp_min(1e-30))


# ---------------------------------------------------------------- re-search with k fixed (v2f)
def fit_fixed_k(rows: torch.Tensor, targets: torch.Tensor, beta: bool = True):
    """Least-squares alpha (and beta) of each target against its own bank row (docs/design.md §1,
    with k given): the formulas of ``mess.search.search``, zero-variance rows giving alpha 0."""
    R, W = rows.detach().float(), targets.detach().float()
    if beta:
        c_r, m_r = centre(R)
        c_w, m_w = centre(W)
    else:
        c_r, c_w = R.clone(), W
    denom = (c_r * c_r).sum(1)
    zero = denom == 0
    c_r[zero] = 0
    alpha = (c_w * c_r).sum(1).div_(torch.where(zero, torch.ones_like(denom), denom))
    return alpha, (m_w - alpha * m_r) if beta else None


def refit_fixed_k(state_dict: dict, entry: Entry) -> tuple[dict, Entry]:
    """v2f's re-search: quantize the covered layers as the version does, then refit alpha and beta
    of every target with its k kept. Returns the new state_dict and entry."""
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    wscales = quantize_layers(sd, entry.covered(), entry.weight_bits) if entry.weight_bits else {}
    out = entry.replace(kernel=None, pointwise=None)
    for p in entry.paths():
        B = p.bank_vectors(sd)
        new = PathEntry(p.kind, p.bank, p.bind, p.transforms, p.vector_length, p.bank_size,
                        wscales.get(p.bank), learned=p.learned, learned_scale=p.learned_scale)
        for t, old in p.layers.items():
            k = old.k.clone()
            W = target_vectors(sd[f"{t}.weight"], p.kind, p.bind)
            alpha, beta = fit_fixed_k(B[k], W, entry.spec.beta)
            code = quantize_code(B, W, k, alpha, beta, entry.grid, entry.alpha_bits, entry.beta_bits,
                                 wscales.get(t))
            vec = reconstruct(B, k, code.alpha, code.beta)
            sd[f"{t}.weight"] = put_vectors(sd[f"{t}.weight"], vec, p.kind, p.bind)
            new.layers[t] = code
        setattr(out, p.kind, new)
    return sd, out
