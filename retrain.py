"""Retraining in compressed form (DESIGN.md section 6): what main.py's training loop runs besides plain SGD.

    python main.py digits -a resnet --layers 20 -T --ckpt ckpt_best_v2qq_q488.pth --epochs 2 --lr 0.01
    python main.py digits -a resnet --layers 20 -T --ckpt ckpt_best_v2qq_q488.pth -N -s 1 --epochs 2 --lr 0.01
    python main.py digits -a resnet --layers 20 -N -s 2 -v v2qq --epochs 8   # the "new method", from scratch
    python main.py digits -a resnet --layers 20 -T -Q --qb 4 --ckpt ckpt_best_q4.pth --epochs 2
    python main.py digits -a resnet --layers 20 --nl --nls 0.01 --wclip 3 --epochs 8

A run is one of five modes, decided by ``decide`` from the flags and the checkpoint:

* ``mess`` (``-T`` on a MESS checkpoint): every covered target conv's weight is a function of
  trainable tensors through ``torch.nn.utils.parametrize``: the bank layer's (latent) weight,
  per-vector alpha and beta, with k a fixed buffer. In q versions the forward pass sees
  ``linear_quantize`` values and the backward pass is straight-through (``ste_quantize``).
* ``free`` (``-N -s S``): covered weights train as dense floats and every S epochs (and at the
  last) the search of the version projects them into MESS form; v2f keeps k and refits only
  alpha and beta. Checkpoints are written right after each projection.
* ``quant`` (``-Q --qb B``): every conv weight on the B-bit grid through the same STE.
* ``finetune`` (``-T`` on a float checkpoint) and ``train``: plain SGD.

Every mode can add the regularizers ``--nl`` and ``--pl`` and the weight clipping ``--wclip``.
Saved checkpoints are plain state_dicts (DESIGN.md section 4); ``check_representable`` checks one.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from find_similar_kernel import (
    VERSION_SPECS,
    bank_vectors,
    centre,
    compress,
    get_version,
    output_name,
    plan_layers,
    put_vectors,
    reconstruct,
    target_vectors,
)
from quantize import check_bits, conv_layers, linear_quantize, quantize_alpha_beta, quantize_layers
from utils import Dist, UserError

PCC_EPS = 1e-12  # keeps pcc^2 of a zero-variance vector at 0 instead of 0/0


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


# ---------------------------------------------------------------- the MESS parametrization
class MessWeight(nn.Module):
    """Parametrization of a covered target conv's weight: ``put_vectors(X, alpha * bank[k] + beta)``.

    ``bank`` is the bank conv itself (a shared submodule, so DataParallel's replicas share it
    too); its ``weight`` is already quantized straight-through in q versions. ``X`` (the
    parametrization's original) only serves the pointwise remainder columns, which stay float.
    Gradients of vectors sharing a bank row accumulate into that row through ``bank[k]``.
    """

    def __init__(self, bank: nn.Conv2d, path: dict, entry: dict, alpha_bits: int | None,
                 beta_bits: int | None, alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None):
        super().__init__()
        self.bank = bank
        self.kind, self.bind, self.transforms = path["kind"], int(path["bind"]), int(path["transforms"])
        self.alpha_bits, self.beta_bits = alpha_bits, beta_bits
        self.register_buffer("k", entry["k"].detach().clone())
        self.alpha = nn.Parameter(entry["alpha"].detach().clone() if alpha is None else alpha)
        if "beta" in entry:
            self.beta = nn.Parameter(entry["beta"].detach().clone() if beta is None else beta)
        else:
            self.register_parameter("beta", None)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        a = ste_quantize(self.alpha, self.alpha_bits)
        b = None if self.beta is None else ste_quantize(self.beta, self.beta_bits)
        return a, b

    def vectors(self) -> torch.Tensor:
        a, b = self.quantized()
        B = bank_vectors(self.bank.weight, self.kind, self.bind, self.transforms)
        return reconstruct(B, self.k, a, b)  # the one expression every tool uses: saved == reconstructed

    def forward(self, X):
        return put_vectors(X, self.vectors(), self.kind, self.bind)


def _has_remainder(weight: torch.Tensor, kind: str, bind: int) -> bool:
    return kind == "pointwise" and weight.reshape(weight.shape[0], -1).shape[1] % bind != 0


def parametrize_mess(model: nn.Module, mess: dict) -> list[str]:
    """Register the MESS parametrizations of ``mess`` on ``model``; returns the target layer names.

    Latent alpha, beta and bank start where ``latent_init`` says, so the first forward pass
    computes the checkpoint's own weights.
    """
    wb, ab, bb = mess.get("weight_bits"), mess.get("alpha_bits"), mess.get("beta_bits")
    targets = []
    for kind in ("kernel", "pointwise"):
        path = mess.get(kind)
        if not path:
            continue
        bank = model.get_submodule(path["bank"])
        if wb:
            with torch.no_grad():
                bank.weight.copy_(latent_init(bank.weight, path.get("bank_scale"), wb))
            parametrize.register_parametrization(bank, "weight", QuantSTE(wb))
        for t, e in path["layers"].items():
            conv = model.get_submodule(t)
            alpha = latent_init(e["alpha"], e.get("alpha_scale"), ab)
            beta = latent_init(e["beta"], e.get("beta_scale"), bb) if "beta" in e else None
            mw = MessWeight(bank, path, e, ab, bb, alpha, beta)
            has_rest = _has_remainder(conv.weight, kind, path["bind"])
            parametrize.register_parametrization(conv, "weight", mw)
            # the kernel path replaces X entirely: a frozen X keeps DDP from waiting for its gradient
            conv.parametrizations.weight.original.requires_grad_(has_rest)
            targets.append(t)
    return targets


def parametrize_quant(model: nn.Module, layers, bits: int, scales: dict | None = None) -> None:
    """Every listed conv weight on the ``bits``-bit grid, trained straight through (``-Q``)."""
    for name in layers:
        conv = model.get_submodule(name)
        if scales and name in scales:
            with torch.no_grad():
                conv.weight.copy_(latent_init(conv.weight, scales[name], bits))
        parametrize.register_parametrization(conv, "weight", QuantSTE(bits))


def _latent(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The trainable tensor behind ``module.<name>``: the parametrization's original, if any."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name)


def plain_state_dict(model: nn.Module, keys) -> dict:
    """The unwrapped state_dict the model would have without parametrizations: ``keys`` in order,
    each parametrized weight computed by its forward (so the saved values are what was evaluated)."""
    out = {}
    with torch.no_grad():
        for key in keys:
            mod_name, _, attr = key.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            out[key] = getattr(mod, attr).detach().to("cpu", copy=True)
    return out


def mess_entry(model: nn.Module, mess: dict) -> dict:
    """``mess`` updated from a parametrized model: current k, quantized alpha and beta with their
    scales, and the bank scale, as ``linear_quantize`` computes them in the forward pass."""
    wb, ab, bb = mess.get("weight_bits"), mess.get("alpha_bits"), mess.get("beta_bits")
    out = {k: v for k, v in mess.items() if k not in ("kernel", "pointwise")}
    for kind in ("kernel", "pointwise"):
        path = mess.get(kind)
        if not path:
            out[kind] = path
            continue
        new = {k: v for k, v in path.items() if k != "layers"}
        bank = model.get_submodule(path["bank"])
        new["bank_scale"] = linear_quantize(_latent(bank), wb)[1] if wb else None
        new["layers"] = {}
        for t in path["layers"]:
            mw = model.get_submodule(t).parametrizations.weight[0]
            alpha, sa = _quant_or_float(mw.alpha, ab)
            e = {"k": mw.k.detach().cpu().clone(), "alpha": alpha}
            sb = None
            if mw.beta is not None:
                e["beta"], sb = _quant_or_float(mw.beta, bb)
            e.update(alpha_scale=sa, beta_scale=sb, weight_scale=None)
            new["layers"][t] = e
        out[kind] = new
    return out


def _quant_or_float(x: torch.Tensor, bits: int | None):
    if bits:
        q, s = linear_quantize(x, bits)
        return q.cpu(), s
    return x.detach().cpu().clone(), None


# ---------------------------------------------------------------- re-search with k fixed (v2f)
def fit_fixed_k(rows: torch.Tensor, targets: torch.Tensor, beta: bool = True):
    """Least-squares alpha (and beta) of each target against its own bank row (DESIGN.md section 1,
    with k given): the formulas of ``find_similar_kernel.search``, zero-variance rows giving alpha 0."""
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


def refit_fixed_k(state_dict: dict, mess: dict) -> tuple[dict, dict]:
    """v2f's re-search: quantize the covered layers as the version does, then refit alpha and beta
    of every target with its k kept. Returns the new state_dict and ``mess`` entry."""
    spec = VERSION_SPECS[mess["version"]]
    wb, ab, bb = mess.get("weight_bits"), mess.get("alpha_bits"), mess.get("beta_bits")
    sd = {k: v.detach().clone() for k, v in state_dict.items()}
    paths = [mess[kind] for kind in ("kernel", "pointwise") if mess.get(kind)]
    covered = [n for p in paths for n in (p["bank"], *p["layers"])]
    wscales = quantize_layers(sd, covered, wb) if wb else {}
    out = {k: v for k, v in mess.items() if k not in ("kernel", "pointwise")}
    out.update(kernel=None, pointwise=None)
    for path in paths:
        kind, bind = path["kind"], path["bind"]
        B = bank_vectors(sd[f"{path['bank']}.weight"], kind, bind, path["transforms"])
        new = {k: v for k, v in path.items() if k != "layers"}
        new["bank_scale"], new["layers"] = wscales.get(path["bank"]), {}
        for t, e in path["layers"].items():
            k = e["k"].clone()
            alpha, beta = fit_fixed_k(B[k], target_vectors(sd[f"{t}.weight"], kind, bind), spec.beta)
            alpha, sa, beta, sb = quantize_alpha_beta(alpha, beta, ab, bb if spec.beta else None)
            sd[f"{t}.weight"] = put_vectors(sd[f"{t}.weight"], reconstruct(B, k, alpha, beta), kind, bind)
            entry = {"k": k, "alpha": alpha}
            if spec.beta:
                entry["beta"] = beta
            entry.update(alpha_scale=sa, beta_scale=sb, weight_scale=wscales.get(t))
            new["layers"][t] = entry
        out[kind] = new
    return sd, out


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


# ---------------------------------------------------------------- representability
class NotRepresentable(ValueError):
    """A checkpoint that does not hold what its ``mess`` or ``quant`` entry claims."""


def _check_grid(x: torch.Tensor, scale, bits: int, what: str) -> None:
    if scale is None:
        raise NotRepresentable(f"{what}: quantized to {bits} bits but no scale is stored")
    if scale == 0.0:
        if x.numel() and not bool((x == x.reshape(-1)[0]).all()):
            raise NotRepresentable(f"{what}: scale 0 but the values are not constant")
        return
    q = (x / scale).round()
    if not torch.equal(q * torch.tensor(scale, dtype=x.dtype), x):
        raise NotRepresentable(f"{what}: values are not on the grid of scale {scale}")
    if q.numel() and (q.min() < -(2 ** (bits - 1)) or q.max() > 2 ** (bits - 1) - 1):
        raise NotRepresentable(f"{what}: grid indices outside {bits} bits")


def check_representable(ckpt: dict) -> None:
    """Raise ``NotRepresentable`` unless ``ckpt`` satisfies DESIGN.md section 4: a plain unwrapped
    state_dict; in a MESS checkpoint every covered weight equal to ``alpha * bank[k] + beta`` bit for
    bit, with k in range and quantized values (bank, alpha, beta) on their grids; in a plain
    quantized checkpoint (``quant``) every listed weight on its grid."""
    sd = ckpt["model"]
    bad = [k for k in sd if "parametrizations." in k or k.startswith(("module.", "_orig_mod."))]
    if bad:
        raise NotRepresentable(f"state_dict is not plain: {bad[0]}")
    mess = ckpt.get("mess")
    if mess:
        spec = VERSION_SPECS[mess["version"]]
        wb, ab, bb = mess.get("weight_bits"), mess.get("alpha_bits"), mess.get("beta_bits")
        for kind in ("kernel", "pointwise"):
            path = mess.get(kind)
            if not path:
                continue
            bank_w = sd[f"{path['bank']}.weight"]
            if wb:
                _check_grid(bank_w, path.get("bank_scale"), wb, f"bank {path['bank']}")
            B = bank_vectors(bank_w, kind, path["bind"], path["transforms"])
            if tuple(B.shape) != (path["bank_size"], path["vector_length"]):
                raise NotRepresentable(f"bank {path['bank']}: {tuple(B.shape)} vectors, entry says "
                                       f"{(path['bank_size'], path['vector_length'])}")
            for t, e in path["layers"].items():
                W = target_vectors(sd[f"{t}.weight"], kind, path["bind"])
                k, alpha = e["k"], e["alpha"]
                if k.dtype != torch.int64 or alpha.dtype != torch.float32:
                    raise NotRepresentable(f"{t}: k must be int64 and alpha float32")
                if k.shape != (W.shape[0],) or alpha.shape != k.shape:
                    raise NotRepresentable(f"{t}: {W.shape[0]} vectors but {tuple(k.shape)} indices")
                if k.numel() and (k.min() < 0 or k.max() >= B.shape[0]):
                    raise NotRepresentable(f"{t}: k outside the bank of {B.shape[0]}")
                if ("beta" in e) != spec.beta:
                    raise NotRepresentable(f"{t}: beta {'missing' if spec.beta else 'present'} in "
                                           f"{mess['version']}")
                if ab:
                    _check_grid(alpha, e.get("alpha_scale"), ab, f"{t} alpha")
                if spec.beta and bb:
                    _check_grid(e["beta"], e.get("beta_scale"), bb, f"{t} beta")
                vec = reconstruct(B, k, alpha, e.get("beta"))
                if not torch.equal(vec, W):
                    raise NotRepresentable(f"{t}: weight differs from alpha * bank[k] + beta by up to "
                                           f"{(vec - W).abs().max().item():.3g}")
    quant = ckpt.get("quant")
    if quant:
        for name, scale in quant["scales"].items():
            _check_grid(sd[f"{name}.weight"], scale, quant["bits"], f"{name}.weight")


# ---------------------------------------------------------------- what a run is, and its file names
@dataclass
class RunSpec:
    mode: str  # train | finetune | quant | mess | free
    version: str | None
    prefix: str  # checkpoint names: <prefix>_epoch_N.pth, <prefix>_best.pth
    n_retrain: int = 0
    mess: dict | None = None  # the MESS entry to start from


def parse_name(stem: str) -> tuple[int, str]:
    """``(n, tag)`` of a checkpoint name: ``ckpt_rt1_v2qq_q888_best`` -> ``(1, "v2qq_q888")``,
    ``ckpt_best_v2qq_q888`` -> ``(0, "v2qq_q888")``, ``ckpt_epoch_5`` -> ``(0, "")``."""
    s = stem[5:] if stem.startswith("ckpt_") else ("" if stem == "ckpt" else stem)
    n = 0
    m = re.match(r"rt(\d+)(?:_|$)", s)
    if m:
        n, s = int(m.group(1)), s[m.end():]
    tokens, out, i = s.split("_") if s else [], [], 0
    while i < len(tokens):
        if tokens[i] == "best":
            i += 1
        elif tokens[i] == "epoch" and i + 1 < len(tokens) and tokens[i + 1].isdigit():
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return n, "_".join(out)


def _extras(args, free: bool) -> str:
    s = ""
    if args.nuc_loss:
        s += f"_nl{args.nl_scale:g}"
    if args.pcc_loss:
        s += f"_pl{args.pl_scale:g}"
    if args.wclip:
        s += f"_wclip{args.wclip:g}"
    if free:
        s += f"_s{args.save_epoch}"  # the original's: ckpt_rt1_v2qq_q888_s5_best.pth
    return s


def _join(*parts: str) -> str:
    return "_".join(p for p in parts if p)


def decide(args, ckpt: dict | None, path: Path | None) -> RunSpec:
    """The run's mode, version and checkpoint names from the flags and the loaded checkpoint;
    every bad combination is a one-line ``UserError``."""
    if args.wclip is not None and args.wclip <= 0:
        raise UserError(f"--wclip K clamps weights to mean +- K standard deviations; K must be positive, "
                        f"got {args.wclip:g}")
    if args.save_epoch < 1:
        raise UserError(f"-s/--save-epoch must be at least 1, got {args.save_epoch}")
    if args.retrain and not args.ckpt:
        raise UserError("-T/--retrain needs --ckpt PATH: the checkpoint to retrain")
    if args.version is not None:
        get_version(args.version)
        for bits, flag in ((args.qb, "--qb"), (args.qba, "--qba"), (args.qbb, "--qbb")):
            check_bits(bits, flag)  # now, not at the first search, epochs later
    if args.quant:
        check_bits(args.qb, "--qb")
        if args.version:
            raise UserError(f"-Q (plain quantization of every conv) and -v {args.version} (MESS) exclude "
                            f"each other")
    name = path.name if path is not None else ""
    info = (ckpt or {}).get("retrain")
    if args.resume and isinstance(info, dict) and "mode" in info:
        version = info.get("version")
        if args.version and version and args.version != version:
            raise UserError(f"{name} is a {version} retraining run; it resumes with -v {version}, "
                            f"not -v {args.version}")
        return RunSpec(info["mode"], version, info["prefix"], int(info.get("n_retrain", 0)), ckpt.get("mess"))

    if args.retrain and not args.resume:
        mess = ckpt.get("mess")
        n, tag = parse_name(path.stem)
        n = (n or int(ckpt.get("n_retrain", 0))) + 1
        if mess:
            version = mess["version"]
            if args.version and args.version != version:
                raise UserError(f"{name} is a MESS {version} checkpoint, but -v {args.version} was asked; "
                                f"retrain it with -v {version} (or without -v)")
            if args.quant:
                raise UserError(f"{name} is a MESS {version} checkpoint; it retrains in MESS form, "
                                f"without -Q")
            mode = "free" if args.new else "mess"
        else:
            if args.version:
                raise UserError(f"{name} is not a MESS checkpoint (no 'mess' entry), but -v {args.version} "
                                f"asks to retrain one; compress it first with find_similar_kernel.py -v "
                                f"{args.version}, or drop -v for plain fine-tuning")
            if args.new:
                raise UserError("-N/--new needs -v VERSION, the MESS version to search with")
            version, mode = None, "quant" if args.quant else "finetune"
            if args.quant:
                tag = _join(*[t for t in tag.split("_") if not re.fullmatch(r"q\d+", t)], f"q{args.qb}")
        prefix = _join(f"ckpt_rt{n}", tag) + _extras(args, mode == "free")
        return RunSpec(mode, version, prefix, n, mess)

    # training from scratch (or resuming a run that has no retraining record)
    if args.new:
        if not args.version:
            raise UserError("-N/--new needs -v VERSION, the MESS version to search with every -s epochs")
        stem = output_name("ckpt_new", args.version, np=args.np, qb=args.qb, qba=args.qba, qbb=args.qbb,
                           bind_size=args.bind_size, pw_bind_size=args.pw_bind_size)[:-len(".pth")]
        return RunSpec("free", args.version, stem + _extras(args, True))
    if args.version and not (args.nuc_loss or args.pcc_loss or args.wclip):
        raise UserError(f"-v {args.version} during training applies with -N (search every -s epochs) or "
                        f"-T (retrain a MESS checkpoint); add one of them")
    if args.quant:
        return RunSpec("quant", None, f"ckpt_q{args.qb}" + _extras(args, False))
    return RunSpec("train", args.version, "ckpt" + _extras(args, False))


# ---------------------------------------------------------------- one run's retraining state
def broadcast_from_main(make, d: Dist):
    """``make()`` on rank 0 only, its result sent to every rank (a search runs once under DDP)."""
    if not d.enabled:
        return make()
    import torch.distributed as dist
    box = [make() if d.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Retrainer:
    """What the loop of main.py asks of a run besides SGD: parameter groups, the extra loss, the
    searches at epoch boundaries, which epochs save, and what a checkpoint holds."""
    args: object
    model: nn.Module  # the unwrapped model, parametrized in mess and quant modes
    spec: RunSpec
    device: torch.device
    dist: Dist = Dist()
    keys: list[str] = field(default_factory=list)  # the plain state_dict's keys, in order
    mess: dict | None = None  # current MESS entry (mess and free modes)
    pcc_index: dict | None = None  # layer -> k for --pl
    searches: list[int] = field(default_factory=list)  # epochs after which a projection search ran
    paths: list[Covered] = field(default_factory=list)  # covered layers (regularizers, clipping)
    shadow: nn.Module | None = None  # a plain CPU copy that searches run on
    quant_layers: list[str] = field(default_factory=list)
    quant_bits: int | None = None  # -Q: the grid's bits

    @property
    def mode(self) -> str:
        return self.spec.mode

    @property
    def version(self) -> str | None:
        return self.spec.version

    # ---- set-up
    @classmethod
    def create(cls, args, model: nn.Module, spec: RunSpec, ckpt: dict | None, device, d: Dist = Dist()):
        r = cls(args, model, spec, device, d, keys=list(model.state_dict()))
        if spec.mess is not None:
            r.mess = copy.deepcopy(spec.mess)
        info = (ckpt or {}).get("retrain") if args.resume else None
        info = info if isinstance(info, dict) else None
        if info:
            r.searches = list(info.get("searches", []))
            if info.get("pcc_index") is not None:
                r.pcc_index = dict(info["pcc_index"])
        needs_paths = args.nuc_loss or args.pcc_loss or args.wclip or spec.mode == "free"
        if spec.mode == "free" or args.pcc_loss:
            r.shadow = copy.deepcopy(model).cpu()
        if needs_paths:
            r.paths = r._covered_paths()
        if spec.mode == "mess":
            parametrize_mess(model, r.mess)
        elif spec.mode == "quant":
            r.quant_layers = conv_layers(model)
            q = (ckpt or {}).get("quant") if args.retrain or args.resume else None
            r.quant_bits = q["bits"] if info and q else args.qb  # a resumed run keeps its grid
            scales = q["scales"] if q and q.get("bits") == r.quant_bits else None
            parametrize_quant(model, r.quant_layers, r.quant_bits, scales)
        if info and info.get("latent") is not None:
            r._load_latent(info["latent"])
        return r

    def _covered_paths(self) -> list[Covered]:
        if self.mess:
            return [Covered(p["kind"], p["bank"], list(p["layers"]), int(p["bind"]), int(p["transforms"]))
                    for p in (self.mess.get("kernel"), self.mess.get("pointwise")) if p]
        a = self.args
        spec = VERSION_SPECS[self.version] if self.version else None
        plans = plan_layers(self.model, a.arch, bind=a.bind_size if spec and spec.bind else 1,
                            transforms=spec.transforms if spec else 1, pointwise=not a.np,
                            pw_bind=a.pw_bind_size, fc=bool(getattr(a, "fc", False)))
        paths = [Covered(p.kind, p.bank, list(p.targets), p.bind, p.transforms) for p in plans.values() if p]
        if not paths:
            raise UserError(f"{a.arch} has no layer MESS covers, so --nl, --pl, --wclip and -N have nothing "
                            f"to act on")
        return paths

    def _load_latent(self, latent: dict) -> None:
        own = dict(self.model.named_parameters())
        if set(own) != set(latent):
            missing = sorted(set(own) ^ set(latent))
            raise UserError(f"the retraining state in --ckpt does not fit this run (e.g. {missing[0]})")
        with torch.no_grad():
            for name, p in own.items():
                p.copy_(latent[name])

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Trainable tensors; alpha and beta are scales of their vectors, so they get no weight decay."""
        ab = [p for m in self.model.modules() if isinstance(m, MessWeight)
              for p in (m.alpha, m.beta) if p is not None]
        ids = {id(p) for p in ab}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest}]
        if ab:
            groups.append({"params": ab, "weight_decay": 0.0})
        return groups

    def attach(self, optimizer) -> None:
        """Weight clipping after every optimizer step (``--wclip``)."""
        if self.args.wclip:
            tensors = self.clip_tensors()
            optimizer.register_step_post_hook(lambda opt, a, kw: clip_weights_(tensors, self.args.wclip))

    def clip_tensors(self) -> list[torch.Tensor]:
        """The trainable weights of the covered layers: the bank's latent weight when the targets are
        functions of it (mess mode), every conv's latent weight with -Q, else the layers themselves."""
        if self.mode == "quant":
            names = self.quant_layers
        elif self.mode == "mess":
            names = [p.bank for p in self.paths]
        else:
            names = [n for p in self.paths for n in (p.bank, *p.targets)]
        return [_latent(self.model.get_submodule(n)) for n in names]

    # ---- training
    @property
    def extra_loss(self):
        a = self.args
        if not (a.nuc_loss or a.pcc_loss):
            return None
        beta = VERSION_SPECS[self.version].beta if self.version else True

        def loss():
            total = 0.0
            if a.nuc_loss:
                total = total + a.nl_scale * nuclear_loss(self.model, self.paths)
            if a.pcc_loss:
                total = total + a.pl_scale * pcc_loss(self.model, self.paths, self.index(), beta)
            return total
        return loss

    def index(self) -> dict:
        """k of every covered target vector: fixed in mess mode, from the latest search otherwise."""
        if self.mess is not None:
            return {t: e["k"] for p in (self.mess.get("kernel"), self.mess.get("pointwise")) if p
                    for t, e in p["layers"].items()}
        return self.pcc_index

    def boundary(self, epoch: int) -> bool:
        return epoch % self.args.save_epoch == 0 or epoch == self.args.epochs

    def start(self) -> None:
        """A search for --pl's k at training start when no checkpoint provides one."""
        if self.args.pcc_loss and self.mess is None and self.pcc_index is None:
            self.pcc_index = self._search_index()

    def end_of_epoch(self, epoch: int) -> bool:
        """At an -s boundary: the projection of -N (returns True), or a fresh k for --pl."""
        if not self.boundary(epoch):
            return False
        if self.mode == "free":
            self._project()
            self.searches.append(epoch)
            return True
        if self.args.pcc_loss and self.mode != "mess":
            self.pcc_index = self._search_index()
        return False

    def saves(self, epoch: int) -> bool:
        """-N writes checkpoints only right after a projection, so each one is in MESS form."""
        return self.mode != "free" or self.boundary(epoch)

    def _search_kwargs(self) -> dict:
        a, m = self.args, self.mess
        kw = dict(qb=a.qb, qba=a.qba, qbb=a.qbb, bind_size=a.bind_size, pw_bind_size=a.pw_bind_size, np=a.np,
                  fc=bool(getattr(a, "fc", False)))
        if m:  # a retrained checkpoint keeps the structure and the bit widths it was compressed with
            kw.update(qb=m.get("weight_bits") or a.qb, qba=m.get("alpha_bits") or a.qba,
                      qbb=m.get("beta_bits") or a.qbb, np=not m.get("pointwise"), fc=bool(m.get("fc")))
            if m.get("kernel") and VERSION_SPECS[m["version"]].bind:
                kw["bind_size"] = m["kernel"]["bind"]
            if m.get("pointwise"):
                kw["pw_bind_size"] = m["pointwise"]["bind"]
        return kw

    def _shadow_with_weights(self) -> nn.Module:
        self.shadow.load_state_dict(plain_state_dict(self.model, self.keys))
        return self.shadow

    def _search_index(self) -> dict:
        version = self.version or "v2"

        def make():
            c = compress(self._shadow_with_weights(), self.args.arch, version, **self._search_kwargs(),
                         device=self.device)
            return {t: e["k"] for p in (c.mess["kernel"], c.mess["pointwise"]) if p
                    for t, e in p["layers"].items()}
        return broadcast_from_main(make, self.dist)

    def _project(self) -> None:
        """-N: the covered weights become their MESS reconstruction (on rank 0, then broadcast)."""
        def make():
            model = self._shadow_with_weights()
            if self.version == "v2f" and self.mess is not None:
                sd, mess = refit_fixed_k(model.state_dict(), self.mess)
            else:
                c = compress(model, self.args.arch, self.version, **self._search_kwargs(), device=self.device)
                sd, mess = c.state_dict, c.mess
            paths = [p for p in (mess["kernel"], mess["pointwise"]) if p]
            keys = [f"{n}.weight" for p in paths for n in (p["bank"], *p["layers"])]
            return {k: sd[k] for k in keys}, mess

        weights, mess = broadcast_from_main(make, self.dist)
        with torch.no_grad():
            for key, value in weights.items():
                mod_name, _, attr = key.rpartition(".")
                getattr(self.model.get_submodule(mod_name), attr).copy_(value)
        if "args" in (self.mess or {}):
            mess["args"] = self.mess["args"]
        self.mess = mess

    # ---- checkpoints
    def summary_name(self) -> str:
        return "summary.csv" if self.spec.prefix == "ckpt" else f"summary_{self.spec.prefix[5:]}.csv"

    def file_names(self, epoch: int) -> tuple[str, str]:
        return f"{self.spec.prefix}_epoch_{epoch}.pth", f"{self.spec.prefix}_best.pth"

    def state(self) -> dict:
        """What a checkpoint holds besides epoch, optimizer, schedule, flags and RNG: the plain
        weights, the ``mess``/``quant`` entry, and under ``retrain`` what an exact resume needs."""
        parametrized = self.mode in ("mess", "quant")
        out = {"model": plain_state_dict(self.model, self.keys) if parametrized else self.model.state_dict()}
        if self.mode == "mess":
            out["mess"] = mess_entry(self.model, self.mess)
        elif self.mode == "free":
            out["mess"] = self.mess
        elif self.mode == "quant":
            out["quant"] = {"bits": self.quant_bits, "scales": {
                n: linear_quantize(_latent(self.model.get_submodule(n)), self.quant_bits)[1]
                for n in self.quant_layers}}
        if self.mode == "train" and self.spec.prefix == "ckpt":
            return out  # plain training: the checkpoint of the foundation, unchanged
        out["n_retrain"] = self.spec.n_retrain
        out["retrain"] = {
            "mode": self.mode, "version": self.version, "prefix": self.spec.prefix,
            "n_retrain": self.spec.n_retrain, "searches": list(self.searches),
            "pcc_index": None if self.pcc_index is None else dict(self.pcc_index),
            # the float tensors behind quantized or reconstructed weights, for -R
            "latent": {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()}
            if parametrized else None,
        }
        return out
