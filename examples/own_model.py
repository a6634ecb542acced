"""MESS on a network of your own, from Python: train, compress, retrain in MESS form, pack, reload.

    python examples/own_model.py                 # scikit-learn's digits, a few seconds on a CPU
    python examples/own_model.py --epochs 1 --retrain-steps 20 --out /tmp/own.mess

Nothing here comes from the suite's model registry: the network is defined below, the training
loop is the caller's, and ``mess`` only sees an ``nn.Module``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import mess


class TinyNet(nn.Module):
    """3x3 convs (the kernel path), a 1x1 conv (the pointwise path), BatchNorm and a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = self.body(F.relu(self.bn0(self.stem(x))))
        return self.head(x.mean((2, 3)))


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (ships with the package: no download), 1,437 to train and 360 to test."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = (x - 0.3) / 0.4, y
    return x[perm[:1437]], y[perm[:1437]], x[perm[1437:]], y[perm[1437:]]


def train(model: nn.Module, x, y, steps: int, lr: float, batch: int = 64) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def top1(model: nn.Module, x, y) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="float training epochs (default: 3)")
    p.add_argument("--retrain-steps", type=int, default=60, help="MESS-form retraining steps (default: 60)")
    p.add_argument("--version", default="v2qq", help="MESS version (default: v2qq)")
    p.add_argument("--out", default="own_model.mess", help="the packed file (default: own_model.mess)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits()

    model = TinyNet()
    train(model, xtr, ytr, steps=args.epochs * len(ytr) // 64, lr=0.05)
    print(f"float32:          top-1 {top1(model, xte, yte):.2f}%")

    c = mess.compress(model, args.version, qb=6, qba=6, qbb=6, pw_bind_size=8)
    model.load_state_dict(c.state_dict)
    print(f"compressed {args.version}: top-1 {top1(model, xte, yte):.2f}% at "
          f"{mess.account(c).ratio:.2f}x (whole model)")

    mess.parametrize(model, c.entry)  # bank, alpha and beta train; k stays; the loop is ours
    train(model, xtr, ytr, steps=args.retrain_steps, lr=0.005)
    c = mess.export(model)  # plain weights again, exactly alpha * bank[k] + beta
    n = mess.save(c, args.out)
    after = top1(model, xte, yte)
    print(f"retrained:        top-1 {after:.2f}%; wrote {args.out} ({n:,} bytes)")

    fresh = TinyNet()
    mess.load(args.out, fresh)  # the architecture is ours; the file holds the weights
    same = torch.equal(fresh.eval()(xte), model.eval()(xte))
    print(f"reloaded:         top-1 {top1(fresh, xte, yte):.2f}%; logits identical: {same}")
    return {"bytes": n, "top1": after, "same": same}


if __name__ == "__main__":
    main()
