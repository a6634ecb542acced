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
from contextlib import contextmanager, nullcontext
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
SEARCH_ENV = "MESS_SEARCH"  # auto (default) | fused | plain: which search runs when search(fused=None)
# auto: below this many (target, bank row) pairs building the fused kernel costs more than it saves (C++ on
# CPU: 0.3 s against a plain search at ~2e8 pairs/s; Triton on CUDA: seconds, against a fast plain search)
FUSED_MIN_PAIRS = {"cpu": 2**26, "cuda": 2**34}
FUSED_CPU_KERNEL = "c++"  # CPU fused kernel: "c++" (hand-written, ctypes) or "inductor" (torch.compile)
CPU_FUSED_CHUNK_PAIRS = 2**20  # pairs per task of the C++ kernel's thread pool: about a millisecond
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


@contextmanager
def _single_threaded_ops():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def block_size(n_bank: int, device: torch.device, budget_bytes: int = BUDGET_BYTES, *,
               fused: bool = False) -> int:
    """Targets per block: about four (block, N) float32 temporaries live at once. The fused
    kernel keeps no (block, N) temporary, only a residual and an index per target: its blocks
    are as large as the budget allows that, so that per-call overheads vanish."""
    if fused:
        return max(1, budget_bytes // 16)
    pairs = budget_bytes // 16
    if device.type == "cpu":
        pairs = min(pairs, CPU_BLOCK_PAIRS)
    return max(1, pairs // n_bank)


# ---------------------------------------------------------------- the fused search
def fused_residual_argmin(c_w: torch.Tensor, c_r_t: torch.Tensor, div: torch.Tensor,
                          nan1: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(best residual, k) of every target of a block in one pass: alpha, L1 residual, minimum.

    c_w (B, L) the centred targets, c_r_t (L, N) the centred bank transposed, div (N,) the
    alpha denominators; ``nan1``: a NaN alpha becomes 1 (epsv3). The operations of
    ``block_alpha`` and ``residual_argmin``, in their order, with the loops over L unrolled when
    traced: under ``torch.compile`` the block becomes one loop nest (a Triton kernel on CUDA),
    in which each (target, bank row) pair costs about 5L arithmetic instructions in registers
    (the dot product, then multiply, subtract, abs and add per position), with no (B, N)
    temporary and the argmin (ties: smallest index) kept on the fly. The fused kernel on CUDA;
    on CPU ``_CPU_KERNEL_SOURCE`` does the same by hand, faster than Inductor's argmin (3x
    measured). Called eagerly it is correct, and slow.
    """
    L = c_r_t.shape[0]
    dot = c_w[:, :1] * c_r_t[0]
    for i in range(1, L):
        dot = dot + c_w[:, i:i + 1] * c_r_t[i]
    alpha = dot / div
    if nan1:
        alpha = torch.where(alpha.isnan(), 1.0, alpha)
    res = (alpha * c_r_t[0] - c_w[:, :1]).abs()
    for i in range(1, L):
        res = res + (alpha * c_r_t[i] - c_w[:, i:i + 1]).abs()
    return res.min(1)


# The CPU twin of fused_residual_argmin, by hand: vectors of _CPU_LANES bank rows (GCC/Clang vector
# extensions, lowered to AVX-512, AVX2, NEON...), L unrolled for the usual lengths, the running minimum
# and its index kept per lane. Built with -ffp-contract=off: every product and sum rounds on its own,
# in the order of block_alpha and residual_argmin, so that it picks the plain path's k bit for bit
# (for finite weights: a NaN residual never wins here, while torch.min would return it).
_CPU_LANES = 16
_CPU_KERNEL_SOURCE = r"""
#include <stdint.h>
#define LANES 16
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline vf bcast(float x) { vf v = {}; return v + x; }
static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }
static inline vf pick(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }  // m ? a : b
static inline vi pick(vi m, vi a, vi b) { return (a & m) | (b & ~m); }

// rows b0..b1-1 of c_w (M, len) against the bank c_r_t (len, np) and div (np,), np a multiple of
// LANES, n real rows; L > 0: len == L, known at compile time
template <int L>
static void rows(const float* cw, const float* crt, const float* dv, int64_t b0, int64_t b1, int64_t n,
                 int64_t np, int64_t len, int nan1, float* best, int64_t* kout) {
    const int64_t ll = L > 0 ? L : len;
    vi lane;
    for (int i = 0; i < LANES; i++) lane[i] = i;
    const vf inf = bcast(__builtin_inff());
    for (int64_t b = b0; b < b1; b++) {
        const float* w = cw + b * ll;
        vf bv = inf;
        vi bk = {};
        for (int64_t n0 = 0; n0 < np; n0 += LANES) {
            const vf r0 = load(crt + n0);
            vf dot = bcast(w[0]) * r0;
            for (int64_t l = 1; l < ll; l++) dot = dot + bcast(w[l]) * load(crt + l * np + n0);
            vf a = dot / load(dv + n0);
            if (nan1) a = pick(a != a, bcast(1.0f), a);
            vf res = vabs(a * r0 - bcast(w[0]));
            for (int64_t l = 1; l < ll; l++) res = res + vabs(a * load(crt + l * np + n0) - bcast(w[l]));
            const vi idx = lane + (int32_t)n0;
            if (n0 + LANES > n) res = pick(idx < (int32_t)n, res, inf);  // padding lanes never win
            const vi better = res < bv;  // strict: a lane keeps its earliest index among equals
            bv = pick(better, res, bv);
            bk = pick(better, idx, bk);
        }
        float r = bv[0];
        int32_t k = bk[0];
        for (int i = 1; i < LANES; i++)
            if (bv[i] < r || (bv[i] == r && bk[i] < k)) { r = bv[i]; k = bk[i]; }
        best[b] = r;
        kout[b] = k;
    }
}

extern "C" int mess_fused_search(const float* cw, const float* crt, const float* dv, int64_t b0, int64_t b1,
                                 int64_t n, int64_t np, int64_t len, int nan1, float* best, int64_t* kout) {
    if (np % LANES || n > np || n >= (int64_t)1 << 31 || len < 1) return 1;
    switch (len) {
        case 8: rows<8>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout); break;
        case 9: rows<9>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout); break;
        case 18: rows<18>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout); break;
        default: rows<0>(cw, crt, dv, b0, b1, n, np, len, nan1, best, kout);
    }
    return 0;
}
"""

_compiled: dict[str, Callable | None] = {}  # kernel name -> the built fused kernel; None: building it failed


def _kernel_name(device: torch.device) -> str:
    return "c++" if device.type == "cpu" and FUSED_CPU_KERNEL == "c++" else f"inductor-{device.type}"


def fused_kernel(device: torch.device) -> Callable | None:
    """The fused kernel for ``device``, built at its first use; None once building it failed.

    CPU: ``_CPU_KERNEL_SOURCE`` compiled by the system's C++ compiler (0.3 s) and called through
    ctypes. Other devices (CUDA), or ``FUSED_CPU_KERNEL = "inductor"``: ``fused_residual_argmin``
    under ``torch.compile`` (Triton on CUDA), which compiles at its first call for each vector
    length L (seconds; Inductor's disk cache makes later processes faster) and never again for
    other block or bank sizes: shapes are dynamic.
    """
    name = _kernel_name(device)
    if name not in _compiled:
        try:
            _compiled[name] = _build_cpu_kernel() if name == "c++" else _build_compiled()
        except Exception as e:  # no compiler: never fatal
            _fused_failed(name, e)
    return _compiled[name]


def _build_cpu_kernel() -> Callable:
    """``_CPU_KERNEL_SOURCE`` built into a shared library in a temporary folder (with ``-march=native``
    where the compiler takes it) and loaded; ctypes lets go of the GIL during each call."""
    import ctypes
    import shlex
    import shutil
    import subprocess
    import tempfile
    cxx = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(shlex.split(cxx)[0]):
        raise RuntimeError(f"no C++ compiler found ({'CXX=' + cxx if cxx else 'g++, c++, clang++'})")
    with tempfile.TemporaryDirectory(prefix="mess-kernel-", ignore_cleanup_errors=True) as tmp:
        src, lib = os.path.join(tmp, "kernel.cpp"), os.path.join(tmp, "kernel.so")
        with open(src, "w") as f:
            f.write(_CPU_KERNEL_SOURCE)
        for arch in (["-march=native"], []):
            p = subprocess.run([*shlex.split(cxx), *arch, "-O3", "-ffp-contract=off", "-shared", "-fPIC", src,
                                "-o", lib], capture_output=True, text=True)
            if p.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cxx} failed: {(p.stderr.strip().splitlines() or [''])[0]}")
        fn = ctypes.CDLL(lib).mess_fused_search
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 2
    return fn


def _build_compiled() -> Callable:
    _quiet_cpp_extension_import()
    # no fused multiply-add (C++: -ffp-contract=off; Triton: no fp fusion): every product and sum
    # rounds on its own, as in the plain path's eager ops, so that both pick the same k
    return torch.compile(fused_residual_argmin, dynamic=True, options={
        "cpp.enable_floating_point_contract_flag": "off", "emulate_precision_casts": True})


def _fused_failed(name: str, e: Exception) -> None:
    """Never fatal: one line on stderr, and the plain search from now on in this process."""
    _compiled[name] = None
    why = (str(e).strip().splitlines() or [""])[0][:200]
    print(f"warning: fused search unavailable ({name} kernel: {type(e).__name__}: {why}); "
          f"using the plain search", file=sys.stderr)


def _quiet_cpp_extension_import():
    """Inductor imports torch.utils.cpp_extension, which logs a warning about CUDA_HOME on a
    machine without CUDA; the search builds no extension, so that line is only noise."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        log.setLevel(level)


def use_fused(fused: bool | None, pairs: int, device: torch.device) -> bool:
    """Whether a search of ``pairs`` (target, bank row) pairs on ``device`` runs fused: as
    ``fused`` says when given, else as the environment's MESS_SEARCH says (``auto``, the
    default, fuses from FUSED_MIN_PAIRS pairs on); never once building the kernel failed."""
    if fused is None:
        mode = os.environ.get(SEARCH_ENV, "").strip().lower() or "auto"
        if mode not in ("auto", "fused", "plain"):
            raise UserError(f"{SEARCH_ENV}={mode}: choose auto, fused or plain")
        fused = pairs >= FUSED_MIN_PAIRS.get(device.type, 2**34) if mode == "auto" else mode == "fused"
    return bool(fused) and _compiled.get(_kernel_name(device), True) is not None


def fused_search(c_w: torch.Tensor, c_r_t: torch.Tensor, div: torch.Tensor, nan1: bool = False,
                 budget_bytes: int = BUDGET_BYTES,
                 workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(best residual, k) of every target (M, L) against the bank (c_r_t (L, N), div (N,)) by the
    fused kernel, on the tensors' device. CPU: the C++ kernel on ``workers`` threads (default:
    torch's), a few thousand targets per task, balanced as they finish. CUDA: the compiled
    kernel, as few blocks as ``budget_bytes`` allows. None where the kernel cannot be built,
    after a one-line warning on stderr the first time: the caller runs the plain search.
    """
    device = c_w.device
    kernel = fused_kernel(device)
    if kernel is None:
        return None
    c_w, c_r_t, div = c_w.float().contiguous(), c_r_t.float().contiguous(), div.float().contiguous()
    if _kernel_name(device) == "c++":
        return _cpu_fused(kernel, c_w, c_r_t, div, nan1, workers or torch.get_num_threads())
    m, n = c_w.shape[0], c_r_t.shape[1]
    if n == 1:  # a size-1 dimension would compile once more, as a constant; a duplicate row ties and loses
        c_r_t, div = c_r_t.repeat(1, 2), div.repeat(2)
    if m == 0:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.int64, device=device)
    step = max(2, block_size(n, device, budget_bytes, fused=True))
    parts = []
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            for s in range(0, m, step):
                cw = c_w[s:s + step].detach()  # not a view: a view would compile once more
                b = cw.shape[0]
                r_b, k_b = kernel(cw.repeat(2, 1) if b == 1 else cw, c_r_t, div, nan1)
                parts.append((r_b[:b], k_b[:b]))
    except Exception as e:  # no C++ compiler, no Triton, an unsupported backend: never fatal
        _fused_failed(_kernel_name(device), e)
        return None
    if len(parts) == 1:
        return parts[0]
    with _single_threaded_ops() if device.type == "cpu" else nullcontext():  # see search()
        return torch.cat([r for r, _ in parts]), torch.cat([k for _, k in parts])


def _cpu_fused(kernel: Callable, c_w: torch.Tensor, c_r_t: torch.Tensor, div: torch.Tensor, nan1: bool,
               workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The C++ kernel over all targets: the bank padded to whole vectors, rows in tasks of about
    CPU_FUSED_CHUNK_PAIRS pairs on a pool of ``workers`` threads (ctypes releases the GIL)."""
    (m, length), n = c_w.shape, c_r_t.shape[1]
    np_ = -(-n // _CPU_LANES) * _CPU_LANES
    crt = torch.zeros(length, np_)
    crt[:, :n] = c_r_t
    dv = torch.ones(np_)
    dv[:n] = div
    best, k = torch.empty(m), torch.empty(m, dtype=torch.int64)
    step = max(16, CPU_FUSED_CHUNK_PAIRS // np_)

    def run(s):
        if kernel(c_w.data_ptr(), crt.data_ptr(), dv.data_ptr(), s, min(m, s + step), n, np_, length,
                  int(nan1), best.data_ptr(), k.data_ptr()):
            raise ValueError(f"the fused kernel refused a bank of {n} rows of length {length}")

    starts = range(0, m, step)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(workers, len(starts))) as pool:
            list(pool.map(run, starts))
    else:
        for s in starts:
            run(s)
    return best, k


def search(bank: torch.Tensor, targets: torch.Tensor, *, beta: bool = True, eps_mode: str | None = None,
           eps: float = EPS, device: torch.device | None = None, budget_bytes: int = BUDGET_BYTES,
           residual_fn: Callable | None = None, fused: bool | None = None) -> SearchResult:
    """Best affine fit of every target row against every bank row (DESIGN.md section 1).

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
    rowwise = _single_threaded_ops if device.type == "cpu" else nullcontext
    with rowwise():
        R = bank.detach().to(device, torch.float32)
        T = targets.detach().to(device, torch.float32)
        n, m = R.shape[0], T.shape[0]
        if n == 0:
            raise ValueError("empty bank")
        if beta:
            c_r, m_r = centre(R)
            c_w, m_w = _by_rows(centre, threads, T)
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
        a_out, *b_out = _by_rows(fit, threads, c_w, k_out, *([m_w] if beta else []))
        return SearchResult(k_out.cpu(), a_out.cpu(), b_out[0].cpu() if beta else None, r_out.cpu())


ROW_CHUNK = 2**16  # rows per task of the row-wise work on CPU


def _by_rows(fn: Callable, workers: int, *xs: torch.Tensor):
    """``fn(*xs)`` for a row-wise ``fn``, by chunks of ROW_CHUNK rows on ``workers`` threads on CPU
    (each op single-threaded: call it under ``_single_threaded_ops``). The same rows come out
    whatever the chunks: torch reduces each row alike, however many there are."""
    m = xs[0].shape[0]
    if workers <= 1 or m <= ROW_CHUNK or xs[0].device.type != "cpu":
        return fn(*xs)
    starts = range(0, m, ROW_CHUNK)
    with ThreadPoolExecutor(min(workers, len(starts))) as pool:
        parts = list(pool.map(lambda s: fn(*(x[s:s + ROW_CHUNK] for x in xs)), starts))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


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
        with _single_threaded_ops(), ThreadPoolExecutor(min(workers, len(starts))) as pool:
            list(pool.map(run_block, starts))
    else:
        with _single_threaded_ops() if device.type == "cpu" else nullcontext():
            for s in starts:
                run_block(s)
    return r_out, k_out


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


def _in_width(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _conv_list(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]  # forward order


def plan_layers(model: nn.Module, arch: str, *, bind: int = 1, transforms: int = 1, pointwise: bool = True,
                pw_bind: int = 8, fc: bool = False) -> dict[str, PathPlan | None]:
    """Bank and target layers of both paths (DESIGN.md section 2), found by module traversal.

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


# ---------------------------------------------------------------- a whole model
@dataclass
class Compressed:
    state_dict: dict
    mess: dict
    rows: list[dict]  # per covered layer: what the table shows


def compress(model: nn.Module, arch: str, version: str, *, qb: int = 8, qba: int = 8, qbb: int = 8,
             bind_size: int = 2, pw_bind_size: int = 8, np: bool = False, fc: bool = False,
             device: torch.device | None = None, budget_bytes: int = BUDGET_BYTES) -> Compressed:
    """Run the search of ``version`` on every covered layer of ``model``; the model is not changed.

    Returns the new state_dict (covered weights = their reconstruction), the ``mess`` entry of
    DESIGN.md section 4, and per-layer statistics against the model's float weights.
    """
    spec = get_version(version)
    for bits, flag in ((qb, "--qb"), (qba, "--qba"), (qbb, "--qbb")):
        check_bits(bits, flag)
    plans = plan_layers(model, arch, bind=bind_size if spec.bind else 1, transforms=spec.transforms,
                        pointwise=not np, pw_bind=pw_bind_size, fc=fc)
    if plans["kernel"] is None and plans["pointwise"] is None:
        raise UserError(f"{arch} has no layer MESS can cover")
    orig = model.state_dict()
    sd = {k: v.detach().clone() for k, v in orig.items()}
    covered = [n for p in plans.values() if p for n in (p.bank, *p.targets)]
    wscales = quantize_layers(sd, covered, qb) if spec.quant_weights else {}
    qa, qbeta = (qba, qbb if spec.beta else None) if spec.quant_ab else (None, None)

    mess = {"version": spec.name, "weight_bits": qb if spec.quant_weights else None,
            "alpha_bits": qa, "beta_bits": qbeta, "eps": EPS if spec.eps_mode else None, "fc": fc,
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
                                       "and its packed .mess file beside it and prints the storage "
                                       "account).")
    return add_flags(parser, MODEL_FLAGS + MESS_FLAGS + ("fc",) + TRACK_FLAGS)


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
                 bind_size=args.bind_size, pw_bind_size=args.pw_bind_size, np=args.np, fc=args.fc,
                 device=device)
    seconds = time.perf_counter() - t0
    c.mess["args"] = {k: v for k, v in vars(args).items()  # never the database URL: it may hold a password
                      if isinstance(v, (str, int, float, bool, list, type(None))) and k != "mongo_url"}
    name = output_name(
        path.stem, spec.name, np=args.np, qb=args.qb, qba=args.qba, qbb=args.qbb, bind_size=args.bind_size,
        pw_bind_size=args.pw_bind_size if c.mess["pointwise"] else None)
    if args.fc:  # FC coverage is new: the original's names have no token for it
        pwd = f"_pwd{args.pw_bind_size}" if args.np and args.pw_bind_size != 8 and c.mess["pointwise"] else ""
        name = f"{name[:-len('.pth')]}{pwd}_fc.pth"
    out_path = path.with_name(name)
    out = output_checkpoint(ckpt, c.state_dict, mess=c.mess)
    save_checkpoint(out, out_path)
    from packed import SUFFIX, size_line, write_mess  # lazy: packed imports this module
    mess_path = out_path.with_suffix(SUFFIX)
    mess_bytes = write_mess(mess_path, out)  # the packed network, beside the checkpoint
    account = storage_account(c.state_dict, mess=c.mess)
    n_targets = sum(r["targets"] or 0 for r in c.rows)
    print_account(account, c.rows, title=f"MESS {spec.name}: {path.name}")
    print(f"searched {n_targets:,} vectors in {seconds:.2f}s on {device}; wrote {out_path} "
          f"and {mess_path.name}")
    print(size_line(mess_path, mess_bytes, c.state_dict))
    return {"path": out_path, "mess": c.mess, "account": account, "ratio": account.ratio, "rows": c.rows,
            "seconds": seconds, "mess_path": mess_path, "mess_bytes": mess_bytes}


if __name__ == "__main__":
    from tracking import Experiment, tracked_run
    # every run is a sacred run (tracking.py), built here so that sacred records this script
    run_cli(lambda args: tracked_run(Experiment("mess-compress"), main, args), get_args_parser())
