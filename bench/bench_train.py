"""Training throughput of main.py's loop against a bare PyTorch loop, same model and data.

    python bench/bench_train.py [--arch resnet --layers 20 --epochs 3 --repeats 3]

Both loops train a fresh copy of the same model on digits (in memory, so the data path
costs nothing); the rounds alternate and the best round of each counts. Prints images/s
and the ratio ours / bare (goal: at least 0.95).
"""
import argparse
import copy
import time

import torch
import torch.nn as nn

import main as mainmod
import models
from data import get_loaders


def bare_epoch(model, loader, criterion, optimizer):
    model.train()
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(fn, n_images):
    t0 = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - t0)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--epochs", type=int, default=2, help="epochs per timed round")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    args = mainmod.get_args_parser().parse_args(["digits", "-a", a.arch, "--layers", str(a.layers),
                                                 "--epochs", str(a.epochs), "-j", "0"])
    torch.manual_seed(0)
    base = models.build_model(a.arch, "digits", a.layers)
    loader, _, gen = get_loaders("digits", ".", args.batch_size, 0)
    criterion = nn.CrossEntropyLoss()
    n = len(loader.dataset) * a.epochs
    rt = mainmod.Runtime(torch.device("cpu"))
    best = {"ours": 0.0, "bare": 0.0}

    def fresh():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        return model, opt

    def ours():
        model, opt = fresh()
        for e in range(1, a.epochs + 1):
            gen.manual_seed(e)
            mainmod.train_one_epoch(model, loader, criterion, opt, rt, e, args)

    def bare():
        model, opt = fresh()
        for e in range(1, a.epochs + 1):
            gen.manual_seed(e)
            bare_epoch(model, loader, criterion, opt)

    bare()  # warm-up: allocator, thread pool
    for _ in range(a.repeats):
        best["ours"] = max(best["ours"], timed(ours, n))
        best["bare"] = max(best["bare"], timed(bare, n))
    print(f"model {models.model_name(a.arch, a.layers)} on digits, {a.epochs} epochs per round, "
          f"best of {a.repeats}, {torch.get_num_threads()} threads")
    print(f"bare PyTorch loop : {best['bare']:8.1f} images/s")
    print(f"main.py loop      : {best['ours']:8.1f} images/s")
    print(f"ratio ours/bare   : {best['ours'] / best['bare']:.3f}  (goal >= 0.95)")
    return best


if __name__ == "__main__":
    run()
