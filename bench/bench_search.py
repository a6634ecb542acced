"""Benchmark: the vectorized MESS search against the plain per-kernel loop, same weights, same run.

    python bench/bench_search.py                 # VGG-16 and MobileNet (CIFAR), CPU
    python bench/bench_search.py -C --sample 5000

For each model and path, the whole-model search runs once (all targets against the whole
bank, as find_similar_kernel.py does); the per-kernel loop of tests/mess_reference.py runs
on a random sample of the same targets and its time is scaled up to the whole model. Both
answers are compared on the sample: same k (ties excepted), alpha and beta within 1e-5.
Weights are the models' random (Kaiming) initialisation unless --ckpt gives trained ones.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from mess_reference import loop_search  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import find_similar_kernel as fsk  # noqa: E402
import models  # noqa: E402
from utils import load_checkpoint, select_device  # noqa: E402

MODELS = {"vgg16": ("vgg", 16), "mobilenet": ("mobilenet", 16), "resnet56": ("resnet", 56),
          "mobilenetv2": ("mobilenetv2", 16)}


def path_vectors(model, arch):
    """(kind, bank, targets) of each path, exactly as compress() builds them (v2: no quantization)."""
    sd = model.state_dict()
    out = []
    for kind, plan in fsk.plan_layers(model, arch).items():
        if plan is None:
            continue
        bank = fsk.bank_vectors(sd[f"{plan.bank}.weight"], kind, plan.bind, plan.transforms)
        tgt = torch.cat([fsk.target_vectors(sd[f"{t}.weight"], kind, plan.bind) for t in plan.targets])
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vgg16", "mobilenet"], choices=sorted(MODELS))
    p.add_argument("--sample", type=int, default=2000,
                   help="targets the per-kernel loop runs on (default: 2000)")
    p.add_argument("--ckpt", default=None,
                   help="trained weights for the (single) model instead of random ones")
    p.add_argument("-C", "--cuda", action="store_true", help="search on CUDA (the loop stays on CPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = select_device(args.cuda, [0])
    console = Console(highlight=False)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, search on {device}")
    table = Table(title="MESS search: vectorized vs per-kernel loop")
    for col in ("model", "path", "targets", "bank x L", "vectorized s", "vectorized k/s", "loop k/s (sample)",
                "loop s (scaled)", "speed-up", "same k / ties / sample", "identical"):
        table.add_column(col, justify="left" if col in ("model", "path") else "right")
    results = []
    for name in args.models:
        arch, layers = MODELS[name]
        torch.manual_seed(args.seed)
        model = models.build_model(arch, "cifar10", layers)
        if args.ckpt:
            model.load_state_dict(load_checkpoint(args.ckpt)["model"])
        for kind, bank, tgt in path_vectors(model, arch):
            m = len(tgt)
            fsk.search(bank, tgt[:4096], device=device)  # warm-up (thread pool, allocator, CUDA context)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = fsk.search(bank, tgt, device=device)
            fast_s = time.perf_counter() - t0
            g = torch.Generator().manual_seed(args.seed)
            idx = torch.randperm(m, generator=g)[:min(args.sample, m)]
            t0 = time.perf_counter()
            ref = loop_search(bank, tgt[idx])
            loop_s = time.perf_counter() - t0
            loop_rate = len(idx) / loop_s
            sub = fsk.SearchResult(res.k[idx], res.alpha[idx], res.beta[idx], res.residual[idx])
            same, ties, ok = compare(sub, ref, tgt[idx])
            speedup = (m / fast_s) / loop_rate
            results.append({"model": name, "path": kind, "targets": m, "fast_s": fast_s, "speedup": speedup,
                            "identical": ok})
            table.add_row(name, kind, f"{m:,}", f"{len(bank)} x {bank.shape[1]}", f"{fast_s:.2f}",
                          f"{m / fast_s:,.0f}", f"{loop_rate:,.0f}", f"{m / loop_rate:,.0f}",
                          f"{speedup:,.0f}x",
                          f"{same} / {ties} / {len(idx)}", "yes" if ok else "NO")
    console.print(table)
    console.print(f"The per-kernel loop (tests/mess_reference.py: one target at a time against the whole "
                  f"bank) ran on a random sample of {args.sample} targets per row; its whole-model time is "
                  f"that rate scaled up. 'identical': same k except exact ties, alpha/beta within 1e-5.")
    return results


if __name__ == "__main__":
    main()
