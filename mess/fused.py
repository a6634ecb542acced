"""The fused search: alpha, L1 residual and argmin of every (target, bank row) pair in one pass.

CPU: ``fused_search.cpp`` beside this file, built by the system's C++ compiler at first use and
called through ctypes. CUDA (or ``FUSED_CPU_KERNEL = "inductor"``): ``fused_residual_argmin``
under ``torch.compile``. Both round every operation as the plain path (``mess/search.py``) does,
so both paths pick the same k bit for bit; a kernel that cannot be built is never fatal.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

from .blocking import BUDGET_BYTES, block_size, single_threaded_ops
from .errors import UserError

SEARCH_ENV = "MESS_SEARCH"  # auto (default) | fused | plain: which search runs when search(fused=None)
# auto: below this many (target, bank row) pairs building the fused kernel costs more than it saves (C++ on
# CPU: 0.3 s against a plain search at ~2e8 pairs/s; Triton on CUDA: seconds, against a fast plain search)
FUSED_MIN_PAIRS = {"cpu": 2**26, "cuda": 2**34}
FUSED_CPU_KERNEL = "c++"  # CPU fused kernel: "c++" (hand-written, ctypes) or "inductor" (torch.compile)
CPU_FUSED_CHUNK_PAIRS = 2**20  # pairs per task of the C++ kernel's thread pool: about a millisecond
CPU_KERNEL_SOURCE = Path(__file__).with_name("fused_search.cpp")
_CPU_LANES = 16  # bank rows per vector in fused_search.cpp (its LANES)


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
    on CPU ``fused_search.cpp`` does the same by hand, faster than Inductor's argmin (3x
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


_compiled: dict[str, Callable | None] = {}  # kernel name -> the built fused kernel; None: building it failed


def _kernel_name(device: torch.device) -> str:
    return "c++" if device.type == "cpu" and FUSED_CPU_KERNEL == "c++" else f"inductor-{device.type}"


def fused_kernel(device: torch.device) -> Callable | None:
    """The fused kernel for ``device``, built at its first use; None once building it failed.

    CPU: ``fused_search.cpp`` compiled by the system's C++ compiler (0.3 s) and called through
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
    """``fused_search.cpp`` built into a shared library in a temporary folder (with ``-march=native``
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
        shutil.copyfile(CPU_KERNEL_SOURCE, src)
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
    with single_threaded_ops() if device.type == "cpu" else nullcontext():  # see search()
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
