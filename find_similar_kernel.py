"""Compress a trained checkpoint with MESS: every covered kernel becomes ``alpha * bank[k] + beta``.

    python find_similar_kernel.py cifar10 -a mobilenet -v v2qq --ckpt ckpt_best.pth  # ckpt_best_v2qq_q888.pth
    python find_similar_kernel.py cifar10 -a resnet --layers 56 -v v2 --np --ckpt ckpt_best.pth
    python main.py cifar10 -a mobilenet -E --ckpt ckpt_best_v2qq_q888.pth

The maths (DESIGN.md sections 1-3), the checkpoint contract (section 4) and the storage
account (section 5) live here as library functions: ``search`` (vectorized fit of many
targets against a bank), ``plan_layers`` (bank and target layers of a model),
``compress`` (a whole model), ``reconstruct_state_dict`` and ``storage_account``.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from config import MESS_FLAGS, MODEL_FLAGS, TRACK_FLAGS, VERSIONS, OneLineParser, add_flags
from quantize import (
    check_bits,
    load_model_checkpoint,
    output_checkpoint,
    quantize_alpha_beta,
    quantize_layers,
)
from utils import UserError, run_cli, save_checkpoint, select_device

EPS = 1e-8  # the original's epsilon for the eps variants (its file names carry "_eps1e-08")
BUDGET_BYTES = 256 * 2**20  # bound on the search's per-block temporaries, whatever the model
CPU_BLOCK_PAIRS = 2**18  # (target, bank row) pairs per block and thread on CPU: 1 MB temporaries, in cache
DEPTHWISE_BANK_ARCHS = ("mobilenet", "mobilenetv2")  # their kernel bank is the first depthwise conv


# ---------------------------------------------------------------- versions
@dataclass(frozen=True)
class Version:
    """What a MESS version does (DESIGN.md section 3)."""
    name: str
    quant_weights: bool = True  # covered layers quantized to --qb before the search
    quant_ab: bool = True  # alphas (--qba) and betas (--qbb) quantized per layer after it
    beta: bool = True  # False: v2nb, alpha = <w, r> / ||r||^2 and no offset
    eps_mode: str | None = None  # "add" (epsv1), "replace" (epsv2), "nan1" (epsv3)
    bind: bool = False  # v2.5: -d input-channel kernels bound into one vector
    transforms: int = 1  # v3: 8, the dihedral group of each 3x3 bank kernel


VERSION_SPECS = {v.name: v for v in (
    Version("v2", quant_weights=False, quant_ab=False),
    Version("v2q", quant_ab=False),
    Version("v2qq"),
    Version("v2qq-epsv1", eps_mode="add"),
    Version("v2qq-epsv2", eps_mode="replace"),
    Version("v2qq-epsv3", eps_mode="nan1"),
    Version("v2f"),  # as v2qq here; retraining keeps its k fixed
    Version("v2nb", beta=False),
    Version("v2.5", bind=True),
    Version("v3", transforms=8),
)}
assert tuple(VERSION_SPECS) == VERSIONS, "config.VERSIONS and VERSION_SPECS disagree"


def get_version(name: str | None) -> Version:
    if name is None:
        raise UserError(f"-v/--version is required: one of {', '.join(VERSIONS)}")
    if name not in VERSION_SPECS:
        raise UserError(f"unknown version {name!r}; choose from {', '.join(VERSIONS)}")
    return VERSION_SPECS[name]


def index_bits(bank_size: int) -> int:
    """``ceil(log2 N)`` bits address a bank of N vectors (0 for a bank of one)."""
    return (bank_size - 1).bit_length()


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


def residual_argmin(alpha: torch.Tensor, c_r_t: torch.Tensor, c_w: torch.Tensor):
    """L1 residual ``sum_l |alpha * c_r[l] - c_w[l]|`` of every (target, bank row) pair of a
    block, and its minimum over the bank (ties: smallest index).

    alpha (B, N), c_r_t (L, N) the centred bank transposed, c_w (B, L) the centred targets.
    Loops over the vector length L, never over kernels: the temporaries are (B, N). This is
    the function a fused (compiled) kernel replaces; see ``search(residual_fn=...)``.
    """
    neg = c_w.neg()
    res = torch.addcmul(neg[:, :1], alpha, c_r_t[0]).abs_()
    tmp = torch.empty_like(res)
    for i in range(1, c_r_t.shape[0]):
        res.add_(torch.addcmul(neg[:, i:i + 1], alpha, c_r_t[i], out=tmp).abs_())
    best, k = res.min(1)
    return best, k


@contextmanager
def _single_threaded_ops():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def block_size(n_bank: int, device: torch.device, budget_bytes: int = BUDGET_BYTES) -> int:
    """Targets per block: about four (block, N) float32 temporaries live at once."""
    pairs = budget_bytes // 16
    if device.type == "cpu":
        pairs = min(pairs, CPU_BLOCK_PAIRS)
    return max(1, pairs // n_bank)


def search(bank: torch.Tensor, targets: torch.Tensor, *, beta: bool = True, eps_mode: str | None = None,
           eps: float = EPS, device: torch.device | None = None, budget_bytes: int = BUDGET_BYTES,
           residual_fn: Callable | None = None) -> SearchResult:
    """Best affine fit of every target row against every bank row (DESIGN.md section 1).

    bank (N, L), targets (M, L). Targets go in blocks against the whole bank: the alphas of
    a block are one matrix product of centred vectors, the residual and argmin one call of
    ``residual_fn``. Zero-variance bank rows get alpha 0 (or what ``eps_mode`` says), never
    NaN. Results come back on the CPU.
    """
    residual_fn = residual_fn or residual_argmin
    device = torch.device(device) if device is not None else bank.device
    R = bank.detach().to(device, torch.float32)
    T = targets.detach().to(device, torch.float32)
    n, m = R.shape[0], T.shape[0]
    if n == 0:
        raise ValueError("empty bank")
    if beta:
        c_r, m_r = centre(R)
        c_w, m_w = centre(T)
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
    c_r_mat = c_r.T.contiguous()  # (L, N): serves the matmul and the per-position residual rows

    k_out = torch.empty(m, dtype=torch.int64, device=device)
    r_out = torch.empty(m, dtype=torch.float32, device=device)
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    step = block_size(n, device, budget_bytes // workers)

    def run_block(s):
        cw = c_w[s:s + step]
        alpha = torch.mm(cw, c_r_mat).div_(div)
        if eps_mode == "nan1":
            alpha.masked_fill_(alpha.isnan(), 1.0)  # 0/0 of a zero-variance row
        r_out[s:s + step], k_out[s:s + step] = residual_fn(alpha, c_r_mat, cw)

    starts = range(0, m, step)
    if workers > 1:
        # CPU: one block per thread, each op single-threaded. Intra-op threads would meet at a
        # barrier after every small op, which stalls whenever the cores are shared (10x seen).
        with _single_threaded_ops(), ThreadPoolExecutor(min(workers, len(starts))) as pool:
            list(pool.map(run_block, starts))
    else:
        for s in starts:
            run_block(s)
    # the chosen alphas once more, row by row: unlike the blocked matmul's, their rounding does
    # not depend on the block size or the BLAS kernel, so results are reproducible bit for bit
    a_out = (c_w * c_r[k_out]).sum(1).div_(div[k_out])
    if eps_mode == "nan1":
        a_out.masked_fill_(a_out.isnan(), 1.0)
    b_out = m_w - a_out * m_r[k_out] if beta else None
    return SearchResult(k_out.cpu(), a_out.cpu(), None if b_out is None else b_out.cpu(), r_out.cpu())


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
    """Bank vectors of a bank layer's weight (DESIGN.md section 2).

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


def _conv_list(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]  # forward order


def plan_layers(model: nn.Module, arch: str, *, bind: int = 1, transforms: int = 1, pointwise: bool = True,
                pw_bind: int = 8) -> dict[str, PathPlan | None]:
    """Bank and target layers of both paths (DESIGN.md section 2), found by module traversal.

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

    k1 = [(n, m) for n, m in convs if m.kernel_size == (1, 1) and m.groups == 1]
    if pointwise and len(k1) > 1:
        if pw_bind < 1:
            raise UserError(f"-pwd/--pw-bind-size must be at least 1, got {pw_bind}")
        bank_name, bank = k1[0]
        if bank.in_channels < pw_bind:
            raise UserError(f"-pwd {pw_bind} is wider than the {bank.in_channels} input channels of the "
                            f"pointwise bank layer {bank_name}; use -pwd {bank.in_channels} or less, or --np")
        targets = [n for n, m in k1[1:] if m.in_channels >= pw_bind]
        if targets:
            plans["pointwise"] = PathPlan("pointwise", bank_name, targets, pw_bind)
    return plans


# ---------------------------------------------------------------- a whole model
@dataclass
class Compressed:
    state_dict: dict
    mess: dict
    rows: list[dict]  # per covered layer: what the table shows


def compress(model: nn.Module, arch: str, version: str, *, qb: int = 8, qba: int = 8, qbb: int = 8,
             bind_size: int = 2, pw_bind_size: int = 8, np: bool = False,
             device: torch.device | None = None, budget_bytes: int = BUDGET_BYTES) -> Compressed:
    """Run the search of ``version`` on every covered layer of ``model``; the model is not changed.

    Returns the new state_dict (covered weights = their reconstruction), the ``mess`` entry of
    DESIGN.md section 4, and per-layer statistics against the model's float weights.
    """
    spec = get_version(version)
    for bits, flag in ((qb, "--qb"), (qba, "--qba"), (qbb, "--qbb")):
        check_bits(bits, flag)
    plans = plan_layers(model, arch, bind=bind_size if spec.bind else 1, transforms=spec.transforms,
                        pointwise=not np, pw_bind=pw_bind_size)
    if plans["kernel"] is None and plans["pointwise"] is None:
        raise UserError(f"{arch} has no layer MESS can cover")
    orig = model.state_dict()
    sd = {k: v.detach().clone() for k, v in orig.items()}
    covered = [n for p in plans.values() if p for n in (p.bank, *p.targets)]
    wscales = quantize_layers(sd, covered, qb) if spec.quant_weights else {}
    qa, qbeta = (qba, qbb if spec.beta else None) if spec.quant_ab else (None, None)

    mess = {"version": spec.name, "weight_bits": qb if spec.quant_weights else None,
            "alpha_bits": qa, "beta_bits": qbeta, "eps": EPS if spec.eps_mode else None,
            "kernel": None, "pointwise": None}
    rows = []
    for kind, plan in plans.items():
        if plan is None:
            continue
        B = bank_vectors(sd[f"{plan.bank}.weight"], kind, plan.bind, plan.transforms)
        parts = [target_vectors(sd[f"{t}.weight"], kind, plan.bind) for t in plan.targets]
        res = search(B, torch.cat(parts), beta=spec.beta, eps_mode=spec.eps_mode, device=device,
                     budget_bytes=budget_bytes)
        path = {"bank": plan.bank, "kind": kind, "bind": plan.bind, "transforms": plan.transforms,
                "vector_length": B.shape[1], "bank_size": B.shape[0], "index_bits": index_bits(B.shape[0]),
                "bank_scale": wscales.get(plan.bank), "layers": {}}
        w0, wb = orig[f"{plan.bank}.weight"], sd[f"{plan.bank}.weight"]
        rows.append({"layer": plan.bank, "path": f"{kind} bank", "targets": None, "bank": B.shape[0],
                     "index_bits": None, "mean_residual": None, "rel_error": _rel_error(wb, w0)})
        start = 0
        for t, p in zip(plan.targets, parts):
            sl = slice(start, start + p.shape[0])
            start += p.shape[0]
            k, alpha = res.k[sl].clone(), res.alpha[sl].clone()
            beta = res.beta[sl].clone() if spec.beta else None
            alpha, sa, beta, sb = quantize_alpha_beta(alpha, beta, qa, qbeta)
            vec = reconstruct(B, k, alpha, beta)
            sd[f"{t}.weight"] = put_vectors(sd[f"{t}.weight"], vec, kind, plan.bind)
            entry = {"k": k, "alpha": alpha}
            if spec.beta:
                entry["beta"] = beta
            entry.update(alpha_scale=sa, beta_scale=sb, weight_scale=wscales.get(t))
            path["layers"][t] = entry
            w = orig[f"{t}.weight"]
            l1 = (vec - target_vectors(w, kind, plan.bind)).abs().sum(1)
            rows.append({"layer": t, "path": kind, "targets": p.shape[0], "bank": B.shape[0],
                         "index_bits": path["index_bits"], "mean_residual": float(l1.mean()),
                         "rel_error": _rel_error(sd[f"{t}.weight"], w)})
        mess[kind] = path
    return Compressed(sd, mess, rows)


def _rel_error(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).abs().sum() / old.abs().sum().clamp_min(1e-30))


def reconstruct_state_dict(state_dict: dict, mess: dict) -> dict:
    """Covered weights rebuilt from the bank layers and ``(k, alpha, beta)``; a MESS checkpoint
    satisfies ``reconstruct_state_dict(sd, mess)[key] == sd[key]`` exactly (section 4)."""
    out = dict(state_dict)
    for kind in ("kernel", "pointwise"):
        path = mess.get(kind)
        if not path:
            continue
        B = bank_vectors(state_dict[f"{path['bank']}.weight"], kind, path["bind"], path["transforms"])
        for t, e in path["layers"].items():
            vec = reconstruct(B, e["k"], e["alpha"], e.get("beta"))
            out[f"{t}.weight"] = put_vectors(state_dict[f"{t}.weight"], vec, kind, path["bind"])
    return out


# ---------------------------------------------------------------- storage account (section 5)
@dataclass(frozen=True)
class TensorBits:
    """One stored tensor: ``count`` values of ``bits`` bits each."""
    name: str  # a state_dict key, or "<layer>.weight:<part>" for the parts of a covered weight
    layer: str  # the module it belongs to
    part: str  # float | quantized | scale | k | alpha | beta | remainder
    count: int
    bits: int

    @property
    def total(self) -> int:
        return self.count * self.bits


@dataclass
class Account:
    tensors: list[TensorBits]
    fp32_by_layer: dict[str, int]  # 32 bits per float value of the same state_dict, per module

    @property
    def mess_bits(self) -> int:
        return sum(t.total for t in self.tensors)

    @property
    def fp32_bits(self) -> int:
        return sum(self.fp32_by_layer.values())

    @property
    def ratio(self) -> float:
        return self.fp32_bits / max(self.mess_bits, 1)

    def layer_bits(self, layer: str) -> tuple[int, int]:
        """(fp32 bits, stored bits) of one module's tensors."""
        return self.fp32_by_layer.get(layer, 0), sum(t.total for t in self.tensors if t.layer == layer)


def _layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def storage_account(state_dict: dict, mess: dict | None = None, quant: dict | None = None) -> Account:
    """Bits of every stored tensor (DESIGN.md section 5), in state_dict order.

    * a covered target weight: ``index_bits`` per vector (k), alpha and beta at their bits
      (32 for float) plus one 32-bit scale each when quantized, and the pointwise remainder
      (columns past ``I // d * d``) at 32 bits;
    * a bank layer's weight: ``weight_bits`` per value plus one 32-bit scale (32 bits per
      value and no scale in v2); a plain-quantized conv weight (``quant``) likewise;
    * everything else that is a float tensor (BN parameters and running statistics, biases,
      FC, uncovered stems and convs): 32 bits per value. Integer buffers (BN's
      ``num_batches_tracked``) are not weights and count on neither side.

    Scales used only during the search (the targets' pre-search ``weight_scale``) are not
    needed to decode and are not counted. The packed ``.mess`` format stores exactly these.
    """
    targets, quantized = {}, {}
    if mess:
        for kind in ("kernel", "pointwise"):
            path = mess.get(kind)
            if not path:
                continue
            for t, e in path["layers"].items():
                targets[t] = (path, e)
            quantized[path["bank"]] = mess.get("weight_bits")
    if quant:
        quantized.update({n: quant["bits"] for n in quant["scales"]})
    tensors, fp32 = [], {}
    for key, v in state_dict.items():
        if not v.is_floating_point():
            continue
        layer = _layer_of(key)
        fp32[layer] = fp32.get(layer, 0) + 32 * v.numel()
        is_weight = key.endswith(".weight")
        if is_weight and layer in targets:
            path, e = targets[layer]
            n = int(e["k"].numel())
            tensors.append(TensorBits(f"{key}:k", layer, "k", n, path["index_bits"]))
            for part, bits_key in (("alpha", "alpha_bits"), ("beta", "beta_bits")):
                if part not in e:
                    continue
                bits = mess.get(bits_key)
                tensors.append(TensorBits(f"{key}:{part}", layer, part, n, bits or 32))
                if bits:
                    tensors.append(TensorBits(f"{key}:{part}_scale", layer, "scale", 1, 32))
            rest = v.numel() - n * path["vector_length"]
            if rest:
                tensors.append(TensorBits(f"{key}:remainder", layer, "remainder", rest, 32))
        elif is_weight and quantized.get(layer):
            tensors.append(TensorBits(key, layer, "quantized", v.numel(), quantized[layer]))
            tensors.append(TensorBits(f"{key}:scale", layer, "scale", 1, 32))
        else:
            tensors.append(TensorBits(key, layer, "float", v.numel(), 32))
    return Account(tensors, fp32)


def summarize(ckpt: dict) -> str:
    """Two lines on a compressed checkpoint: what it is, and its size against float32."""
    sd = ckpt["model"]
    if "mess" in ckpt:
        m = ckpt["mess"]
        acc = storage_account(sd, mess=m)
        paths = [f"{kind} bank {p['bank']} ({p['bank_size']} vectors, {p['index_bits']}-bit index) "
                 f"for {len(p['layers'])} layers" for kind in ("kernel", "pointwise") if (p := m.get(kind))]
        bits = ", ".join(f"{what} {m[key]}-bit" if m.get(key) else f"{what} float32"
                         for what, key in (("weights", "weight_bits"), ("alpha", "alpha_bits"),
                                           ("beta", "beta_bits"))
                         if not (what == "beta" and not VERSION_SPECS[m["version"]].beta))
        head = f"MESS {m['version']}: {'; '.join(paths)}; {bits}"
    elif "quant" in ckpt:
        acc = storage_account(sd, quant=ckpt["quant"])
        head = f"plain {ckpt['quant']['bits']}-bit quantization of {len(ckpt['quant']['scales'])} conv layers"
    else:
        acc = storage_account(sd)
        head = "float32 checkpoint"
    return (f"{head}\nsize {acc.mess_bits:,} bits vs {acc.fp32_bits:,} bits float32: "
            f"compression ratio {acc.ratio:.2f}x")


# ---------------------------------------------------------------- report
def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def print_account(account: Account, rows: list[dict], title: str = "") -> None:
    """The per-layer table (rich) with totals."""
    from rich.console import Console
    from rich.table import Table
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160))
    table = Table(title=title or None, show_footer=True, header_style="bold")
    for name, justify in (("layer", "left"), ("path", "left"), ("targets", "right"), ("bank", "right"),
                          ("idx bits", "right"), ("mean L1 res", "right"), ("rel err", "right"),
                          ("bits before", "right"), ("bits after", "right")):
        table.add_column(name, justify=justify)
    shown = set()
    for r in rows:
        before, after = account.layer_bits(r["layer"])
        shown.add(r["layer"])
        table.add_row(r["layer"], r["path"], _fmt(r.get("targets"), ","), _fmt(r.get("bank"), ","),
                      _fmt(r.get("index_bits"), "d"), _fmt(r.get("mean_residual"), ".4g"),
                      _fmt(r.get("rel_error"), ".3%"), f"{before:,}", f"{after:,}")
    other_before = sum(v for k, v in account.fp32_by_layer.items() if k not in shown)
    other_after = sum(t.total for t in account.tensors if t.layer not in shown)
    table.add_row("everything else", "float32", "", "", "", "", "", f"{other_before:,}", f"{other_after:,}",
                  end_section=True)
    table.columns[0].footer = "total"
    table.columns[7].footer = f"{account.fp32_bits:,}"
    table.columns[8].footer = f"{account.mess_bits:,}"
    console = Console(highlight=False, width=width)
    console.print(table)
    console.print(f"fp32 {account.fp32_bits / 8 / 2**20:.3f} MiB -> {account.mess_bits / 8 / 2**20:.3f} MiB: "
                  f"compression ratio {account.ratio:.2f}x")


# ---------------------------------------------------------------- CLI
def output_name(stem: str, version: str, *, np: bool, qb: int, qba: int, qbb: int, bind_size: int,
                pw_bind_size: int | None) -> str:
    """``<stem>_<version>[_d<d>][_np | _pwd<n>][_q<qb>[<qba>[<qbb>]]][_eps1e-08].pth``, the original's
    names; ``_pwd<n>`` only when the pointwise path ran with a -pwd other than the default 8."""
    spec = VERSION_SPECS[version]
    name = f"{stem}_{version}"
    if spec.bind:
        name += f"_d{bind_size}"
    if np:
        name += "_np"
    elif pw_bind_size is not None and pw_bind_size != 8:
        name += f"_pwd{pw_bind_size}"
    if spec.quant_weights:
        name += f"_q{qb}"
        if spec.quant_ab:
            name += f"{qba}{qbb}" if spec.beta else f"{qba}"
    if spec.eps_mode:
        name += f"_eps{EPS}"
    return name + ".pth"


def get_args_parser():
    parser = OneLineParser(prog="find_similar_kernel.py",
                           description="Compress a trained checkpoint with MESS (writes a new checkpoint "
                                       "beside it and prints the storage account).")
    return add_flags(parser, MODEL_FLAGS + MESS_FLAGS + TRACK_FLAGS)


def main(args):
    spec = get_version(args.version)  # flag errors first, before any file is read
    for bits, flag in ((args.qb, "--qb"), (args.qba, "--qba"), (args.qbb, "--qbb")):
        check_bits(bits, flag)
    device = select_device(args.cuda, args.gpuids)
    model, ckpt, path = load_model_checkpoint(args)
    if "mess" in ckpt:
        print(f"note: {path.name} is already a MESS checkpoint ({ckpt['mess'].get('version')}); "
              f"searching its reconstructed weights again")
    t0 = time.perf_counter()
    c = compress(model, args.arch, spec.name, qb=args.qb, qba=args.qba, qbb=args.qbb,
                 bind_size=args.bind_size, pw_bind_size=args.pw_bind_size, np=args.np, device=device)
    seconds = time.perf_counter() - t0
    c.mess["args"] = {k: v for k, v in vars(args).items()  # never the database URL: it may hold a password
                      if isinstance(v, (str, int, float, bool, list, type(None))) and k != "mongo_url"}
    out_path = path.with_name(output_name(
        path.stem, spec.name, np=args.np, qb=args.qb, qba=args.qba, qbb=args.qbb, bind_size=args.bind_size,
        pw_bind_size=args.pw_bind_size if c.mess["pointwise"] else None))
    save_checkpoint(output_checkpoint(ckpt, c.state_dict, mess=c.mess), out_path)
    account = storage_account(c.state_dict, mess=c.mess)
    n_targets = sum(r["targets"] or 0 for r in c.rows)
    print_account(account, c.rows, title=f"MESS {spec.name}: {path.name}")
    print(f"searched {n_targets:,} vectors in {seconds:.2f}s on {device}; wrote {out_path}")
    return {"path": out_path, "mess": c.mess, "account": account, "ratio": account.ratio, "rows": c.rows,
            "seconds": seconds}


if __name__ == "__main__":
    from tracking import Experiment, tracked_run
    # every run is a sacred run (tracking.py), built here so that sacred records this script
    run_cli(lambda args: tracked_run(Experiment("mess-compress"), main, args), get_args_parser())
