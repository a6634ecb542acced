"""The vectors of a layer and the layers of a model (docs/design.md §2).

A covered weight is seen as rows of vectors: 3x3 kernels (kernel path, ``9 * bind`` long with
v2.5's binding) or chunks of its (O, I) rows (pointwise path). ``plan_layers`` finds the bank and
target layers of any model by module traversal; ``bank_vectors`` / ``target_vectors`` /
``put_vectors`` cut weights into vectors and back; ``reconstruct`` is ``alpha * bank[k] + beta``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .errors import UserError

DEPTHWISE_BANK_ARCHS = ("mobilenet", "mobilenetv2")  # their kernel bank is the first depthwise conv


def reconstruct(bank: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor | None):
    """``alpha * bank[k] + beta`` row by row: the one expression every tool uses, so that
    stored weights and reconstructions agree bit for bit."""
    out = alpha[:, None] * bank[k]
    return out if beta is None else out + beta[:, None]


# ---------------------------------------------------------------- vectors of a layer
DIHEDRAL = ("id", "rot90", "rot180", "rot270", "flip", "flip-rot90", "flip-rot180", "flip-rot270")


def dihedral(vectors: torch.Tensor) -> torch.Tensor:
    """(N, 9) 3x3 kernels -> (8N, 9); row ``8 * n + t`` is transform ``DIHEDRAL[t]`` of kernel n
    (``flip`` mirrors left-right; rotations are counter-clockwise, as ``torch.rot90``)."""
    k = vectors.reshape(-1, 3, 3)
    f = k.flip(-1)
    ts = [torch.rot90(k, i, (-2, -1)) for i in range(4)] + [torch.rot90(f, i, (-2, -1)) for i in range(4)]
    return torch.stack(ts, 1).reshape(-1, 9)


def bank_vectors(weight: torch.Tensor, kind: str, bind: int = 1, transforms: int = 1) -> torch.Tensor:
    """Bank vectors of a bank layer's weight (docs/design.md §2).

    kernel: ``weight.reshape(-1, 9 * bind)``, grown by the 8 dihedral transforms when
    ``transforms == 8``; pointwise: every window of length ``bind`` at stride 1 along
    each row of the (O, I) weight, ``O * (I - bind + 1)`` vectors in row order.
    """
    if kind == "kernel":
        v = weight.reshape(-1, 9 * bind)
        return dihedral(v) if transforms == 8 else v
    w = weight.reshape(weight.shape[0], -1)
    return w.unfold(1, bind, 1).reshape(-1, bind)


def target_vectors(weight: torch.Tensor, kind: str, bind: int = 1) -> torch.Tensor:
    """Target vectors of a covered layer: 3x3 kernels (``9 * bind`` long), or each (O, I) row
    cut into chunks of ``bind``; a pointwise remainder shorter than ``bind`` is left out."""
    if kind == "kernel":
        return weight.reshape(-1, 9 * bind)
    w = weight.reshape(weight.shape[0], -1)
    return w[:, :w.shape[1] // bind * bind].reshape(-1, bind)


def put_vectors(weight: torch.Tensor, vectors: torch.Tensor, kind: str, bind: int = 1) -> torch.Tensor:
    """A copy of ``weight`` with its target vectors replaced (the inverse of ``target_vectors``)."""
    if kind == "kernel":
        return vectors.reshape(weight.shape).clone()
    w = weight.reshape(weight.shape[0], -1).clone()
    n = w.shape[1] // bind * bind
    w[:, :n] = vectors.reshape(w.shape[0], n)
    return w.reshape(weight.shape)


# ---------------------------------------------------------------- layers of a model
@dataclass
class PathPlan:
    kind: str  # "kernel" (3x3) or "pointwise" (1x1)
    bank: str  # module name of the bank layer
    targets: list[str] = field(default_factory=list)
    bind: int = 1  # -d for v2.5, -pwd for the pointwise path, else 1
    transforms: int = 1


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _conv_list(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]  # forward order


def plan_layers(model: nn.Module, arch: str, *, bind: int = 1, transforms: int = 1, pointwise: bool = True,
                pw_bind: int = 8, fc: bool = False) -> dict[str, PathPlan | None]:
    """Bank and target layers of both paths (docs/design.md §2), found by module traversal.

    ``fc`` (--fc) adds every fully connected layer to the pointwise path as a target, its (O, I)
    weight cut like a 1x1 conv's; without 1x1 convs (or with ``pointwise=False``, --np) the first
    FC layer is the bank.

    Raises ``UserError`` when ``bind`` (v2.5's -d) does not divide the channels a covered
    layer binds, or when ``pw_bind`` (-pwd) is wider than the pointwise bank layer.
    """
    convs = _conv_list(model)
    plans: dict[str, PathPlan | None] = {"kernel": None, "pointwise": None}

    k3 = [(n, m) for n, m in convs if m.kernel_size == (3, 3)]
    if arch in DEPTHWISE_BANK_ARCHS:
        banks = [(n, m) for n, m in k3 if m.groups > 1 and m.groups == m.in_channels]
    else:
        banks = k3
    if banks:
        bank_name, bank = banks[0]
        after = [n for n, _ in convs]
        targets = [n for n, m in k3 if after.index(n) > after.index(bank_name)]
        if bind < 1:
            raise UserError(f"-d/--bind-size must be at least 1, got {bind}")
        if bind > 1:
            # the bank is a pool of vectors: only its kernel count must divide; a target binds
            # consecutive input channels (consecutive channels for a depthwise conv)
            if (bank.weight.numel() // 9) % bind:
                raise UserError(f"-d {bind} does not divide the {bank.weight.numel() // 9} kernels of the "
                                f"bank layer {bank_name}")
            mods = dict(convs)
            for t in targets:
                per = mods[t].in_channels // mods[t].groups
                ch, what = (per, "input channels") if per > 1 else (mods[t].out_channels, "channels")
                if ch % bind:
                    raise UserError(f"-d {bind} does not divide the {ch} {what} of {t}; choose a -d that "
                                    f"divides every 3x3 layer's channels")
        if targets:
            plans["kernel"] = PathPlan("kernel", bank_name, targets, bind, transforms)

    k1 = [(n, m) for n, m in convs if m.kernel_size == (1, 1) and m.groups == 1] if pointwise else []
    fcs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)] if fc else []
    rows = k1 + fcs  # (O, I) matrices: 1x1 convs in forward order, then the FC layers
    if len(rows) > 1:
        if pw_bind < 1:
            raise UserError(f"-pwd/--pw-bind-size must be at least 1, got {pw_bind}")
        bank_name, bank = rows[0]
        width = _in_width(bank)
        if width < pw_bind:
            what = "input features" if isinstance(bank, nn.Linear) else "input channels"
            raise UserError(f"-pwd {pw_bind} is wider than the {width} {what} of the pointwise bank layer "
                            f"{bank_name}; use -pwd {width} or less" + ("" if fc else ", or --np"))
        targets = [n for n, m in rows[1:] if _in_width(m) >= pw_bind]
        if targets:
            plans["pointwise"] = PathPlan("pointwise", bank_name, targets, pw_bind)
    return plans
