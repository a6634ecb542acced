"""Benchmark: the palettes' 1-D k-means (``mess.palette.kmeans_1d``) against a quantile start, real weights.

    python bench/bench_kmeans1d.py                    # akamaster ResNet-20 and -56, 1-8 bits, both ways
    python bench/bench_kmeans1d.py --models 56 --bits 2 4 --threads 1

For every conv weight of the pretrained CIFAR-10 ResNets (``../shared/data/akamaster``, as
bench_accuracy.py; Kaiming-initialised weights when the files are not there), per tensor and per
output channel: the total squared error of the float16 palette that ``kmeans_1d`` fits, against the
first version's k-means (quantile start, at most 30 Lloyd steps, an empty centroid left where it was),
and the seconds each takes for the whole network (one run each, after a warm-up layer).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import pretrained  # noqa: E402
from mess.palette import half, kmeans_1d, nearest_1d  # noqa: E402
from models.registry import build_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "akamaster"
FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
         56: "resnet56-4bfd9763.th"}


def quantile_kmeans(x: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """The first version's 1-D k-means: quantile start, Lloyd steps, empty centroids stay."""
    xs = x.float().sort(1).values
    q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    c = torch.quantile(xs, q, dim=1).T.contiguous()
    for _ in range(iters):
        idx = torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), xs)
        s = torch.zeros_like(c).scatter_add_(1, idx, xs)
        n = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(xs))
        new = torch.where(n > 0, s / n.clamp_min(1), c).sort(1).values
        if torch.equal(new, c):
            break
        c = new
    return c


def error(fit, weights, bits: int, granularity: str) -> tuple[float, float]:
    """(squared error of the float16 palettes, seconds) of ``fit`` over every conv weight."""
    total, t0 = 0.0, time.perf_counter()
    for w in weights:
        rows = w.reshape(w.shape[0], -1) if granularity == "channel" else w.reshape(1, -1)
        lut = half(fit(rows, 2**bits))
        total += float((lut.gather(1, nearest_1d(rows, lut)) - rows).double().square().sum())
    return total, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, nargs="+", default=[20, 56], choices=sorted(FILES))
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"{'model':>9} {'granularity':>11} {'bits':>4} {'error (kmeans_1d)':>18} {'quantile start':>15} "
          f"{'ratio':>7} {'seconds':>8} {'(quantile)':>10}")
    for depth in a.models:
        torch.manual_seed(0)
        m = build_model("resnet_a", "cifar10", depth)
        src = "akamaster"
        if (DATA / FILES[depth]).is_file():
            pretrained.convert_file(DATA / FILES[depth], m, "akamaster")
        else:
            src = "Kaiming init"
        weights = [mod.weight.detach() for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
        kmeans_1d(weights[1].reshape(1, -1), 4)  # warm-up
        for gran in ("tensor", "channel"):
            for bits in a.bits:
                ours, t_ours = error(kmeans_1d, weights, bits, gran)
                base, t_base = error(quantile_kmeans, weights, bits, gran)
                print(f"{f'r{depth}':>9} {gran:>11} {bits:>4} {ours:>18.4f} {base:>15.4f} "
                      f"{base / ours:>6.2f}x {t_ours:>8.2f} {t_base:>10.2f}  ({src})", flush=True)


if __name__ == "__main__":
    main()
