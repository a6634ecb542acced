"""Retraining in MESS form, in any training loop (docs/design.md §6).

    >>> import mess
    >>> c = mess.compress(model, "v2qq")
    >>> model.load_state_dict(c.state_dict)
    >>> mess.parametrize(model, c.entry)      # bank, alpha, beta trainable; k fixed; STE in q versions
    >>> ...                                    # the caller's own optimizer and loop
    >>> c = mess.export(model)                # a Compressed again, exactly representable

Every covered target weight becomes a function of trainable tensors through
``torch.nn.utils.parametrize``: the bank layer's (latent) weight, per-vector alpha and beta, with k
a fixed buffer. In q versions the forward pass sees ``linear_quantize`` values and the backward
pass is straight-through. The regularizers ``--nl`` and ``--pl`` and ``--wclip`` live here too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize as tp

from .entry import Entry, LayerCode, PathEntry
from .grids import grid_quantize, on_scale, ste_fixed
from .layers import bank_vectors, dihedral, put_vectors, reconstruct, target_vectors
from .quant import QuantSTE, latent_init, linear_quantize, ste_quantize

PCC_EPS = 1e-12  # keeps pcc^2 of a zero-variance vector at 0 instead of 0/0


class MessWeight(nn.Module):
    """Parametrization of a covered target conv's weight: ``put_vectors(X, alpha * bank[k] + beta)``.

    ``bank`` is the bank conv itself (a shared submodule, so DataParallel's replicas share it
    too); its ``weight`` is already quantized straight-through in q versions. ``X`` (the
    parametrization's original) only serves the pointwise remainder columns, which stay float.
    Gradients of vectors sharing a bank row accumulate into that row through ``bank[k]``.
    """

    def __init__(self, bank: nn.Module, path: PathEntry, code: LayerCode, alpha_bits: int | None,
                 beta_bits: int | None, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                 grid: str = "minmax"):
        super().__init__()
        self.bank = bank
        self.kind, self.bind, self.transforms = path.kind, path.bind, path.transforms
        self.alpha_bits, self.beta_bits = alpha_bits, beta_bits
        self.learned = isinstance(bank, LearnedBank)
        # the mse grid trains on the scales it was compressed with (fixed-scale STE); minmax recomputes them
        self.fixed = grid != "minmax"
        self.alpha_scale, self.beta_scale = code.alpha_scale, code.beta_scale
        self.register_buffer("k", code.k.detach().clone())
        self.alpha = nn.Parameter(code.alpha.detach().clone() if alpha is None else alpha)
        if code.beta is not None:
            self.beta = nn.Parameter(code.beta.detach().clone() if beta is None else beta)
        else:
            self.register_parameter("beta", None)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.fixed:
            a = ste_fixed(self.alpha, self.alpha_scale, self.alpha_bits)
            b = None if self.beta is None else ste_fixed(self.beta, self.beta_scale, self.beta_bits)
            return a, b
        a = ste_quantize(self.alpha, self.alpha_bits)
        b = None if self.beta is None else ste_quantize(self.beta, self.beta_bits)
        return a, b

    def vectors(self) -> torch.Tensor:
        a, b = self.quantized()
        if self.learned:
            B = self.bank.rows()
        else:
            B = bank_vectors(self.bank.weight, self.kind, self.bind, self.transforms)
        return reconstruct(B, self.k, a, b)  # the one expression every tool uses: saved == reconstructed

    def forward(self, X):
        return put_vectors(X, self.vectors(), self.kind, self.bind)


class LearnedBank(nn.Module):
    """A learned bank while retraining: its rows trainable, on their fixed grid straight through."""

    def __init__(self, path: PathEntry, bits: int | None):
        super().__init__()
        self.weight = nn.Parameter(path.learned.detach().clone())
        self.scale, self.bits, self.transforms = path.learned_scale, bits, path.transforms

    def quantized(self) -> torch.Tensor:
        return ste_fixed(self.weight, self.scale, self.bits)

    def rows(self) -> torch.Tensor:
        q = self.quantized()
        return dihedral(q) if self.transforms == 8 else q


def _has_remainder(weight: torch.Tensor, kind: str, bind: int) -> bool:
    return kind == "pointwise" and weight.reshape(weight.shape[0], -1).shape[1] % bind != 0


def parametrize(model: nn.Module, entry: Entry | dict) -> list[str]:
    """Register the MESS parametrizations of ``entry`` on ``model`` (whose weights are the compressed
    ones); returns the target layer names. Latent alpha, beta and bank start where ``latent_init``
    says, so the first forward pass computes the compressed weights."""
    entry = Entry.from_dict(entry)
    wb, ab, bb = entry.weight_bits, entry.alpha_bits, entry.beta_bits
    targets = []
    fixed = entry.grid != "minmax"
    for path in entry.paths():
        bank = model.get_submodule(path.bank)
        if wb:
            with torch.no_grad():
                bank.weight.copy_(latent_init(bank.weight, path.bank_scale, wb))
            tp.register_parametrization(bank, "weight", QuantSTE(wb))
        if path.learned is not None:
            bank = LearnedBank(path, wb).to(bank.weight.device)
        for t, code in path.layers.items():
            conv = model.get_submodule(t)
            alpha = code.alpha.clone() if fixed else latent_init(code.alpha, code.alpha_scale, ab)
            beta = None if code.beta is None else (
                code.beta.clone() if fixed else latent_init(code.beta, code.beta_scale, bb))
            mw = MessWeight(bank, path, code, ab, bb, alpha, beta, entry.grid)
            has_rest = _has_remainder(conv.weight, path.kind, path.bind)
            tp.register_parametrization(conv, "weight", mw)
            # the kernel path replaces X entirely: a frozen X keeps DDP from waiting for its gradient
            conv.parametrizations.weight.original.requires_grad_(has_rest)
            targets.append(t)
    model._mess_entry = entry  # what export() rebuilds the entry from
    return targets


def parametrize_quant(model: nn.Module, layers, bits: int, scales: dict | None = None) -> None:
    """Every listed conv weight on the ``bits``-bit grid, trained straight through (``-Q``)."""
    for name in layers:
        conv = model.get_submodule(name)
        if scales and name in scales:
            with torch.no_grad():
                conv.weight.copy_(latent_init(conv.weight, scales[name], bits))
        tp.register_parametrization(conv, "weight", QuantSTE(bits))


def latent(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The trainable tensor behind ``module.<name>``: the parametrization's original, if any."""
    if tp.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


def plain_state_dict(model: nn.Module, keys=None) -> dict:
    """The unwrapped state_dict the model would have without parametrizations: ``keys`` in order
    (default: the model's own, parametrizations dropped), each parametrized weight computed by its
    forward (so the saved values are what was evaluated)."""
    if keys is None:
        keys = plain_keys(model)
    out = {}
    with torch.no_grad():
        for key in keys:
            mod_name, _, attr = key.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            out[key] = getattr(mod, attr).detach().to("cpu", copy=True)
    return out


def plain_keys(model: nn.Module) -> list[str]:
    """The state_dict keys of ``model`` as if it had no parametrization, in their order."""
    out = []
    for key in model.state_dict():
        if ".parametrizations." in key or key.startswith("parametrizations."):
            head, _, tail = key.partition("parametrizations.")
            name, _, rest = tail.partition(".")
            if rest != "original":
                continue  # a parametrization's own tensors (alpha, beta, k): part of the entry
            key = f"{head}{name}"
        out.append(key)
    return out


def export_entry(model: nn.Module, entry: Entry | None = None) -> Entry:
    """The entry of a parametrized model: current k, quantized alpha and beta with their scales, and
    the bank scale, as ``linear_quantize`` computes them in the forward pass."""
    entry = Entry.from_dict(entry) if entry is not None else model._mess_entry
    wb, ab, bb = entry.weight_bits, entry.alpha_bits, entry.beta_bits
    out = entry.replace(kernel=None, pointwise=None)
    for path in entry.paths():
        bank = model.get_submodule(path.bank)
        new = PathEntry(path.kind, path.bank, path.bind, path.transforms, path.vector_length, path.bank_size,
                        linear_quantize(latent(bank), wb)[1] if wb else None)
        for t in path.layers:
            mw = model.get_submodule(t).parametrizations.weight[0]
            if mw.fixed:
                alpha, sa = _fixed_or_float(mw.alpha, mw.alpha_scale, ab)
                beta, sb = (None, None) if mw.beta is None else _fixed_or_float(mw.beta, mw.beta_scale, bb)
            else:
                alpha, sa = _quant_or_float(mw.alpha, ab)
                beta, sb = (None, None) if mw.beta is None else _quant_or_float(mw.beta, bb)
            new.layers[t] = LayerCode(mw.k.detach().cpu().clone(), alpha, beta, sa, sb, None)
            if mw.learned:
                new.learned = mw.bank.quantized().detach().cpu().clone()
                new.learned_scale = mw.bank.scale
        setattr(out, path.kind, new)
    return out


def _quant_or_float(x: torch.Tensor, bits: int | None):
    if bits:
        q, s = linear_quantize(x, bits)
        return q.cpu(), s
    return x.detach().cpu().clone(), None


def _fixed_or_float(x: torch.Tensor, scale: float | None, bits: int | None):
    """What ``ste_fixed`` gives in the forward pass; a constant (scale 0) is re-gridded as compress does."""
    if bits and scale:
        return on_scale(x.detach(), scale, bits).cpu(), scale
    if bits:
        q, s = grid_quantize(x, bits, "mse")
        return q.cpu(), s
    return x.detach().cpu().clone(), None


# ---------------------------------------------------------------- regularizers and clipping
@dataclass
class Covered:
    """One path's layers, whatever they came from (a search plan or a MESS entry)."""
    kind: str
    bank: str
    targets: list[str]
    bind: int = 1
    transforms: int = 1


def nuclear_loss(model: nn.Module, paths: list[Covered]) -> torch.Tensor:
    """Sum over covered layers (bank and targets) of the nuclear norm of the (num_vectors, L) matrix."""
    total = 0.0
    for p in paths:
        for name in (p.bank, *p.targets):
            M = target_vectors(model.get_submodule(name).weight, p.kind, p.bind)
            total = total + torch.linalg.matrix_norm(M, "nuc")
    return total


def pcc_loss(model: nn.Module, paths: list[Covered], index: dict, beta: bool = True) -> torch.Tensor:
    """Mean over covered target vectors of ``1 - pcc(w, bank[k])^2`` (cosine for no-beta versions):
    the L2 residual of the best affine fit is ``||c_w||^2 (1 - pcc^2)``, so this trains kernels
    to be expressible by their bank row. ``index[layer]`` is the k of each vector."""
    total, n = 0.0, 0
    for p in paths:
        B = bank_vectors(model.get_submodule(p.bank).weight, p.kind, p.bind, p.transforms)
        for t in p.targets:
            W = target_vectors(model.get_submodule(t).weight, p.kind, p.bind)
            R = B[index[t].to(B.device)]
            if beta:
                W, R = W - W.mean(1, keepdim=True), R - R.mean(1, keepdim=True)
            r2 = (W * R).sum(1).square() / ((W * W).sum(1) * (R * R).sum(1) + PCC_EPS)
            total = total + (1 - r2).sum()
            n += W.shape[0]
    return total / max(n, 1)


def clip_weights_(tensors, k: float) -> None:
    """Clamp each tensor in place to its mean +- k standard deviations (``--wclip``)."""
    with torch.no_grad():
        for p in tensors:
            m, s = p.mean(), p.std()
            p.clamp_(min=m - k * s, max=m + k * s)
