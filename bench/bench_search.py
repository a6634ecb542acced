"""Benchmark: the fused and the plain MESS search against the per-kernel loop, same weights, same run.

    python bench/bench_search.py                 # VGG-16 and MobileNet (CIFAR), CPU
    python bench/bench_search.py -C --sample 5000
    MESS_BENCH_COLD=1 python bench/bench_search.py   # compile time with an empty Inductor cache

For each model and path, the whole-model search runs as find_similar_kernel.py runs it (all
targets against the whole bank), once on the plain path (eager blocks) and once fused (one
compiled kernel per block); the per-kernel loop of tests/mess_reference.py runs on a random
sample of the same targets and its time is scaled up to the whole model. The three alternate,
``--repeats`` times, and the best round of each counts (the CPU may be shared). "kernel
pairs/s" times the fused kernel alone (no centring, no row-wise alpha and beta): (target, bank
row) pairs per second. "compile s" is the first fused call (compilation; Inductor's disk cache
makes it shorter in later processes), excluded from the timings. Checks: fused and plain give
identical k, alpha and beta on every target; the loop agrees on the sample (same k except
exact ties, alpha and beta within 1e-5). Weights are the models' random (Kaiming)
initialisation unless --ckpt gives trained ones.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # mess_reference.py, the tests' per-kernel loop: not installed
if os.environ.get("MESS_BENCH_COLD"):  # before torch reads it: an empty Inductor cache, a cold compile
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mess-bench-inductor-")

import torch  # noqa: E402
from mess_reference import loop_search  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import models  # noqa: E402
from mess import fused as fused_mod  # noqa: E402
from mess.layers import bank_vectors, plan_layers, target_vectors  # noqa: E402
from mess.search import SearchResult, centre, search  # noqa: E402
from utils import load_checkpoint, select_device  # noqa: E402

MODELS = {"vgg16": ("vgg", 16), "mobilenet": ("mobilenet", 16), "resnet56": ("resnet", 56),
          "mobilenetv2": ("mobilenetv2", 16)}


def path_vectors(model, arch):
    """(kind, bank, targets) of each path, exactly as compress() builds them (v2: no quantization)."""
    sd = model.state_dict()
    out = []
    for kind, plan in plan_layers(model, arch).items():
        if plan is None:
            continue
        bank = bank_vectors(sd[f"{plan.bank}.weight"], kind, plan.bind, plan.transforms)
        tgt = torch.cat([target_vectors(sd[f"{t}.weight"], kind, plan.bind) for t in plan.targets])
        out.append((kind, bank, tgt))
    return out


def compare(res, ref, targets, tol=1e-5):
    """(same k, ties, alpha/beta ok) of the vectorized result against the loop's on a sample."""
    k_ref, a_ref, b_ref, residuals = ref
    same = res.k == k_ref
    rows = torch.arange(len(k_ref))
    best, theirs = residuals[rows, k_ref], residuals[rows, res.k]
    tie = ~same & (theirs <= best + tol * (best + targets.abs().sum(1)) + 1e-7)
    ok = torch.allclose(res.alpha[same], a_ref[same], rtol=tol, atol=1e-6) and torch.allclose(
        res.beta[same], b_ref[same], rtol=tol, atol=1e-6)
    return int(same.sum()), int(tie.sum()), bool(ok and bool((same | tie).all()))


def identical(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.k, b.k), (a.alpha, b.alpha), (a.beta, b.beta)))


def kernel_inputs(bank, tgt, device):
    """What search() hands the fused kernel (v2: beta, no eps): centred targets, bank, divisors."""
    c_r, _ = centre(bank.to(device, torch.float32))
    c_w, _ = centre(tgt.to(device, torch.float32))
    denom = (c_r * c_r).sum(1)
    c_r[denom == 0] = 0
    return c_w, c_r.T.contiguous(), torch.where(denom == 0, torch.ones_like(denom), denom)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    s = f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        s += f", {torch.cuda.get_device_name(device)}"
    return s + f", load average {load()}"


def load() -> str:
    """The 1, 5 and 15 minute load averages (``uptime``): how busy the shared CPU was."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def measure(bank, tgt, device, args):
    """Timings and checks of one path of one model: (row dict, table cells)."""
    m, n = tgt.shape[0], bank.shape[0]
    compile_s, _ = timed(lambda: search(bank, tgt[:4096], device=device, fused=True), device)
    if fused_mod._compiled.get(fused_mod._kernel_name(device)) is None:
        raise SystemExit(f"the fused search did not compile on {device.type}; see the warning above")
    search(bank, tgt[:4096], device=device, fused=False)  # warm-up: thread pool, allocator
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(m, generator=g)[:min(args.sample, m)]
    c_w, c_r_t, div = kernel_inputs(bank, tgt, device)
    cpu = torch.device("cpu")
    runs = {"plain": (lambda: search(bank, tgt, device=device, fused=False), device),
            "fused": (lambda: search(bank, tgt, device=device, fused=True), device),
            "kernel": (lambda: fused_mod.fused_search(c_w, c_r_t, div), device),
            "loop": (lambda: loop_search(bank, tgt[idx]), cpu)}
    best = {}
    for _ in range(args.repeats):  # alternate, so that a busy moment of the shared CPU hits all alike
        for what, (fn, dev) in runs.items():
            dt, out = timed(fn, dev)
            if what not in best or dt < best[what][0]:
                best[what] = (dt, out)
    (plain_s, plain), (fused_s, fused), (kernel_s, _), (loop_s, ref) = (
        best[w] for w in ("plain", "fused", "kernel", "loop"))
    loop_rate = len(idx) / loop_s
    sub = SearchResult(fused.k[idx], fused.alpha[idx], fused.beta[idx], fused.residual[idx])
    same, ties, ok = compare(sub, ref, tgt[idx])
    row = {"targets": m, "bank": n, "L": bank.shape[1], "loop_rate": loop_rate, "plain_s": plain_s,
           "fused_s": fused_s, "plain_speedup": (m / plain_s) / loop_rate,
           "fused_speedup": (m / fused_s) / loop_rate, "kernel_pairs_per_s": m * n / kernel_s,
           "compile_s": compile_s, "fused_equals_plain": identical(fused, plain), "loop_agrees": ok}
    cells = (f"{m:,}", f"{n} x {bank.shape[1]}", f"{loop_rate:,.0f}", f"{m / plain_s:,.0f}",
             f"{row['plain_speedup']:,.0f}x", f"{m / fused_s:,.0f}", f"{row['fused_speedup']:,.0f}x",
             f"{fused_s:.3f}", f"{row['kernel_pairs_per_s']:.3g}", f"{compile_s:.1f}",
             "yes" if row["fused_equals_plain"] else "NO",
             f"{'yes' if ok else 'NO'} ({same}+{ties} ties/{len(idx)})")
    return row, cells


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "mobilenet"], choices=sorted(MODELS))
    p.add_argument("--sample", type=int, default=2000,
                   help="targets the per-kernel loop runs on (default: 2000)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of plain, fused and loop; best counts")
    p.add_argument("--ckpt", default=None,
                   help="trained weights for the (single) model instead of random ones")
    p.add_argument("-C", "--cuda", action="store_true", help="search on CUDA (the loop stays on CPU)")
    p.add_argument("--cpu-kernel", choices=["c++", "inductor"], default=fused_mod.FUSED_CPU_KERNEL,
                   help="fused kernel on CPU: the hand-written C++ one (default) or torch.compile's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = select_device(args.cuda, [0])
    fused_mod.FUSED_CPU_KERNEL = args.cpu_kernel
    console = Console(highlight=False, width=int(os.environ.get("COLUMNS", 200)))
    console.print(f"search on {device} (fused kernel: {fused_mod._kernel_name(device)}): {machine(device)}")
    table = Table(title="MESS search: fused and plain vs the per-kernel loop (targets/s = kernels/s)")
    for col in ("model", "path", "targets", "bank x L", "loop k/s", "plain k/s", "plain x", "fused k/s",
                "fused x", "fused s", "kernel pairs/s", "compile s", "fused = plain", "loop agrees"):
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    results = []
    for name in args.models:
        arch, layers = MODELS[name]
        torch.manual_seed(args.seed)
        model = models.build_model(arch, "cifar10", layers)
        if args.ckpt:
            model.load_state_dict(load_checkpoint(args.ckpt)["model"])
        for kind, bank, tgt in path_vectors(model, arch):
            row, cells = measure(bank, tgt, device, args)
            results.append({"model": name, "path": kind, **row})
            table.add_row(name, kind, *cells)
    console.print(table)
    console.print(f"loop: tests/mess_reference.py, one target at a time against the whole bank, on a random "
                  f"sample of {args.sample} targets per row, scaled up; x = speed-up over it. Best of "
                  f"{args.repeats} alternating rounds. 'fused = plain': identical k, alpha, beta on every "
                  f"target. 'loop agrees': same k except exact ties, alpha/beta within 1e-5. "
                  f"Load average now: {load()}")
    return results


if __name__ == "__main__":
    main()
