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

from .blocking import BUDGET_BYTES
from .entry import Entry, LayerCode, PathEntry
from .errors import UserError
from .layers import bank_vectors, plan_layers, put_vectors, reconstruct, target_vectors
from .quant import quantize_alpha_beta, quantize_layers
from .search import centre, search
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
    entry = Entry(spec.name, s.weight_bits, s.alpha_bits, s.beta_bits, s.eps, s.fc)
    rows = []
    for kind, plan in plans.items():
        if plan is None:
            continue
        B = bank_vectors(sd[f"{plan.bank}.weight"], kind, plan.bind, plan.transforms)
        parts = [target_vectors(sd[f"{t}.weight"], kind, plan.bind) for t in plan.targets]
        res = search(B, torch.cat(parts), beta=spec.beta, eps_mode=spec.eps_mode, device=device,
                     budget_bytes=budget_bytes)
        path = PathEntry(kind, plan.bank, plan.bind, plan.transforms, B.shape[1], B.shape[0],
                         wscales.get(plan.bank))
        rows.append({"layer": plan.bank, "path": f"{kind} bank", "targets": None, "bank": B.shape[0],
                     "index_bits": None, "mean_residual": None,
                     "rel_error": rel_error(sd[f"{plan.bank}.weight"], orig[f"{plan.bank}.weight"])})
        start = 0
        for t, p in zip(plan.targets, parts):
            sl = slice(start, start + p.shape[0])
            start += p.shape[0]
            beta = res.beta[sl].clone() if spec.beta else None
            alpha, sa, beta, sb = quantize_alpha_beta(res.alpha[sl].clone(), beta, s.alpha_bits, s.beta_bits)
            code = LayerCode(res.k[sl].clone(), alpha, beta, sa, sb, wscales.get(t))
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
                        wscales.get(p.bank))
        for t, old in p.layers.items():
            k = old.k.clone()
            W = target_vectors(sd[f"{t}.weight"], p.kind, p.bind)
            alpha, beta = fit_fixed_k(B[k], W, entry.spec.beta)
            alpha, sa, beta, sb = quantize_alpha_beta(alpha, beta, entry.alpha_bits, entry.beta_bits)
            sd[f"{t}.weight"] = put_vectors(sd[f"{t}.weight"], reconstruct(B, k, alpha, beta), p.kind, p.bind)
            new.layers[t] = LayerCode(k, alpha, beta, sa, sb, wscales.get(t))
        setattr(out, p.kind, new)
    return sd, out
