"""Benchmark: bytes on disk of a float32 state_dict, the same file zipped, and the packed .mess files.

    python bench/bench_size.py                                  # every model below, CPU, random weights
    python bench/bench_size.py --models resnet20 resnet56 --versions v2qq v2nb
    python bench/bench_size.py -C --out results/size.md         # the search on a GPU; the table to a file

For each model: ``torch.save(state_dict)`` (float32), that file deflated into a zip (what generic
compression gets from float weights), and the ``.mess`` file written by packed.py after the search
of each version (``+fc``: with --fc, fully connected layers covered too), with the ratio of the
float32 file to each. Weights are the models' random initialisation (seeded, BN statistics
perturbed): file sizes depend on shapes and bit widths, not on the values. Every ``.mess`` is read
back and checked against the storage account (docs/design.md §5) before its size is reported.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

import models
from mess.account import storage_account
from mess.compress import compress
from mess.packed_read import read_mess
from mess.packed_write import write_mess
from mess.settings import get_version
from utils import select_device

# name: (arch, layers, bn, dataset)
MODELS = {
    "resnet20": ("resnet", 20, False, "cifar10"),
    "resnet56": ("resnet", 56, False, "cifar10"),
    "vgg16_bn": ("vgg", 16, True, "cifar10"),
    "mobilenet": ("mobilenet", 16, False, "cifar10"),
    "mobilenetv2": ("mobilenetv2", 16, False, "cifar10"),
    "resnet50-imagenet": ("resnet", 50, False, "imagenet"),
    "mobilenetv2-imagenet": ("mobilenetv2", 16, False, "imagenet"),
}
VERSIONS = ("v2qq", "v2nb", "v2qq+fc")


def random_model(arch, layers, bn, dataset, seed=0):
    torch.manual_seed(seed)
    m = models.build_model(arch, dataset, layers, 1.0, bn)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def fp32_sizes(sd: dict, tmp: Path) -> tuple[int, int]:
    """(bytes of torch.save(state_dict), bytes of that file in a deflated zip)."""
    pth, zp = tmp / "fp32.pth", tmp / "fp32.zip"
    torch.save(sd, pth)
    with zipfile.ZipFile(zp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(pth, "fp32.pth")
    return pth.stat().st_size, zp.stat().st_size


def mess_size(model, arch, spec, version, tmp: Path, device) -> tuple[int, float]:
    """(bytes of the .mess file, seconds of the search) of one version; checked against the account."""
    fc = version.endswith("+fc")
    t0 = time.perf_counter()
    c = compress(model, version.removesuffix("+fc"), arch=arch, fc=fc, device=device)
    seconds = time.perf_counter() - t0
    path = tmp / f"{version}.mess"
    n = write_mess(path, {**c.checkpoint(), "arch": spec})
    back = read_mess(path)
    account_bytes = math.ceil(storage_account(c.state_dict, c.entry).mess_bits / 8)
    assert n - back["packed"]["header_bytes"] == account_bytes, (version, n, account_bytes)
    return n, seconds


def mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def run(names, versions, device) -> list[dict]:
    rows = []
    for name in names:
        arch, layers, bn, dataset = MODELS[name]
        model = random_model(arch, layers, bn, dataset)
        spec = {"arch": arch, "layers": layers, "width_mult": 1.0, "bn": bn, "dataset": dataset,
                "num_classes": models.DATASET_FAMILY[dataset][1]}
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            fp32, zipped = fp32_sizes(model.state_dict(), tmp)
            row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "fp32": fp32,
                   "zip": zipped, "mess": {}, "seconds": {}}
            for v in versions:
                row["mess"][v], row["seconds"][v] = mess_size(model, arch, spec, v, tmp, device)
                print(f"{name} {v}: {row['mess'][v]:,} bytes (search {row['seconds'][v]:.1f}s)",
                      file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def markdown(rows: list[dict], versions) -> str:
    head = ["model", "params", "fp32 .pth MiB", "zip MiB", "zip ratio"]
    for v in versions:
        head += [f".mess {v} MiB", f"ratio {v}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['params']:,}", mib(r["fp32"]), mib(r["zip"]),
                 f"{r['fp32'] / r['zip']:.2f}x"]
        for v in versions:
            cells += [mib(r["mess"][v]), f"{r['fp32'] / r['mess'][v]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args_parser():
    p = argparse.ArgumentParser(description="File sizes: float32 state_dict, zip, .mess per MESS version.")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="NAME",
                   help=f"models to size: {' | '.join(MODELS)} (default: all)")
    p.add_argument("--versions", nargs="+", default=list(VERSIONS), metavar="V",
                   help="MESS versions, '+fc' for --fc (default: v2qq v2nb v2qq+fc)")
    p.add_argument("-C", "--cuda", action="store_true", help="run the search on the GPU (default: CPU)")
    p.add_argument("--out", default=None, metavar="PATH", help="also write the markdown table here")
    return p


def main(args):
    for v in args.versions:
        get_version(v.removesuffix("+fc"))
    device = select_device(args.cuda, [0])
    rows = run(args.models, args.versions, device)
    table = markdown(rows, args.versions)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
