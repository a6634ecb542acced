"""Data-parallel scaling on CPU: images/s of main.py under torchrun with 1 and 2 processes.

    python bench/bench_ddp.py [--epochs 3] [--arch resnet --layers 20]

Both runs train the same model on digits with the same total batch size, gloo backend,
one thread per process; throughput is train samples / wall seconds of the epochs after
the first (start-up excluded). Prints both and the scaling ratio (2-process / 1-process).
"""
import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def throughput(nproc, a):
    with tempfile.TemporaryDirectory() as d:
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(ROOT / "main.py"), "digits", "-a", a.arch, "--layers", str(a.layers), "-j", "0",
                "-b", str(a.batch_size), "--epochs", str(a.epochs)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(argv, cwd=d, env=env, check=True, capture_output=True)
        summary = next(Path(d).glob("checkpoint/*/digits/summary.csv"))
        rows = list(csv.DictReader(open(summary)))[1:]
        return sum(int(r["train_samples"]) for r in rows) / sum(float(r["seconds"]) for r in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    a = p.parse_args()
    one = throughput(1, a)
    two = throughput(2, a)
    print(f"{a.arch}{a.layers} on digits, total batch {a.batch_size}, gloo, 1 thread per process, "
          f"{os.cpu_count()} CPU cores")
    print(f"1 process  : {one:8.1f} images/s")
    print(f"2 processes: {two:8.1f} images/s")
    print(f"scaling    : {two / one:.2f}x (ideal 2.00x)")


if __name__ == "__main__":
    main()
