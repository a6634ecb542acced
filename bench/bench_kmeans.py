"""Benchmark: fitting a learned bank, faiss's k-means against scikit-learn's, same data, same start.

    python bench/bench_kmeans.py                       # VGG-16 (CIFAR), K = 256 and 1024, 10 iterations
    python bench/bench_kmeans.py --k 256 --iters 20 --threads 2

The data is what ``mess.bank.fit_bank`` clusters: every 3x3 kernel of VGG-16's covered layers
(1.6 M), centred, normalised, sign made canonical, weighted by its squared centred norm. Both libraries
start from the same centroids (the k-means++ seeding of ``mess.bank.kmeans_pp``), run the same number
of Lloyd iterations on all points (no subsampling), and are scored by the same weighted inertia
``sum u ||s - c_k||^2`` computed here, not by their own reports. faiss runs spherical k-means, as
fit_bank does (centroids renormalised each step); sklearn cannot, so it is also given faiss in plain
mode (``spherical=False``), the exact same problem. Weights are VGG-16's random (Kaiming)
initialisation unless --ckpt gives trained ones: the timing does not depend on them.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from mess.bank import canonical_sign, kmeans_faiss, kmeans_pp, shapes  # noqa: E402
from mess.layers import plan_layers, target_vectors  # noqa: E402


def vgg_kernels(ckpt: str | None) -> torch.Tensor:
    torch.manual_seed(0)
    model = models.build_model("vgg", "cifar10", 16, bn=True)
    if ckpt:
        from utils import load_any_checkpoint
        model.load_state_dict(load_any_checkpoint(ckpt)["model"])
    plan = plan_layers(model, "vgg")["kernel"]
    sd = model.state_dict()
    return torch.cat([target_vectors(sd[f"{t}.weight"], "kernel") for t in [plan.bank, *plan.targets]])


def inertia(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> float:
    """Weighted sum of squared distances to the nearest centroid, in float64, in blocks."""
    total, cc = 0.0, (c.astype(np.float64) ** 2).sum(1)
    for i in range(0, len(x), 200_000):
        xb = x[i:i + 200_000].astype(np.float64)
        d = (xb ** 2).sum(1)[:, None] - 2 * xb @ c.T.astype(np.float64) + cc[None]
        total += float((w[i:i + 200_000] * d.min(1).clip(min=0)).sum())
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt", default=None)
    a = p.parse_args(argv)
    import faiss
    import sklearn
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    s, u = shapes(vgg_kernels(a.ckpt))
    s = canonical_sign(s)
    x, w = np.ascontiguousarray(s.numpy()), np.ascontiguousarray(u.numpy())
    print(f"{platform.processor() or platform.machine()}, {a.threads} threads, faiss {faiss.__version__}, "
          f"scikit-learn {sklearn.__version__}; VGG-16 kernels: {len(x):,} x {x.shape[1]}, "
          f"{a.iters} iterations, same k-means++ start")
    print(f"{'K':>5} {'method':<26} {'seconds':>8} {'inertia':>12} {'vs sklearn':>11}")
    for k in a.k:
        init = kmeans_pp(s, u, k, torch.Generator().manual_seed(0))
        rows = {}
        with threadpool_limits(a.threads):
            t = time.perf_counter()
            km = KMeans(k, init=init.numpy().astype(np.float32), n_init=1, max_iter=a.iters, tol=0.0,
                        algorithm="lloyd").fit(x, sample_weight=w)
            rows["scikit-learn KMeans"] = (time.perf_counter() - t, inertia(x, w, km.cluster_centers_))
        for name, spherical in (("faiss Kmeans", False), ("faiss Kmeans spherical", True)):
            t = time.perf_counter()
            c, _ = kmeans_faiss(s, k, u, iters=a.iters, spherical=spherical, max_points=len(x), init=init)
            rows[name] = (time.perf_counter() - t, inertia(x, w, c.numpy()))
        ref_t, ref_i = rows["scikit-learn KMeans"]
        for name, (sec, ine) in rows.items():
            print(f"{k:>5} {name:<26} {sec:>8.2f} {ine:>12.2f} {ref_t / sec:>10.2f}x"
                  f"  (inertia {ine / ref_i:.4f} of sklearn's)")


if __name__ == "__main__":
    main()
