"""BatchNorm statistics of a compressed network (docs/design.md §8).

    >>> from mess.bn import calibrate_bn
    >>> calibrate_bn(compressed_model, images, reference=float_model)             # "correct" (default)
    >>> calibrate_bn(compressed_model, images, method="reestimate")              # the classic way

Changing the weights leaves every BatchNorm's running mean and variance describing the *old*
network, so each layer normalises with stale statistics and the errors compound with depth. Two
ways to make them current, on a few hundred unlabelled training images:

* ``reestimate``: run the compressed network in train mode with cumulative averaging
  (``momentum=None``) and take the batch statistics as the running ones (as in "re-estimating BN
  statistics" after quantization). The new statistics are those of the calibration images, so the
  images should pass through the training augmentation.
* ``correct``: run the float ``reference`` and the compressed network, both in eval mode, on the same
  images, and at each BatchNorm (in forward order, earlier corrections applied) shift the running
  mean by the compressed network's extra mean and scale the running variance by its variance ratio
  (bias correction as in Nagel et al. 2019, "Data-Free Quantization"). What the float network learned
  is kept and only the change the compression made is taken out; measured in bench/README.md.

Both change only ``running_mean`` / ``running_var`` (floats the checkpoint already stores): the size
of the model does not change.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from .errors import UserError

METHODS = ("correct", "reestimate", "off")
DEFAULT_IMAGES = 1024
VAR_RATIO = (1e-4, 1e4)  # a variance ratio outside this is a dead channel, not a correction


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None]


def _batches(images, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
    else:
        for b in images:
            yield b[0] if isinstance(b, (tuple, list)) else b


def calibrate_bn(model: nn.Module, images, *, method: str = "correct", reference: nn.Module | None = None,
                 batch_size: int = 256, device: torch.device | None = None) -> int:
    """Make the running statistics of ``model``'s BatchNorms current (module docstring); returns the
    number of BatchNorm layers changed. ``images``: a (N, C, H, W) tensor, or an iterable of batches
    (or of (images, labels)). ``model`` is left in eval mode."""
    if method not in METHODS:
        raise UserError(f"--bn-calib must be one of {', '.join(METHODS)}, got {method!r}")
    bns = batchnorms(model)
    if method == "off" or not bns:
        return 0
    device = device or next(model.parameters()).device
    if method == "reestimate":
        return _reestimate(model, bns, images, batch_size, device)
    if reference is None:
        raise UserError("BatchNorm correction needs the float network as reference")
    return _correct(model, reference, bns, images, batch_size, device)


@torch.no_grad()
def _reestimate(model, bns, images, batch_size, device) -> int:
    saved = [(m.momentum, m.training) for _, m in bns]
    model.eval()
    for _, m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all calibration batches
        m.train()
    seen = 0
    for x in _batches(images, batch_size):
        model(x.to(device))
        seen += x.shape[0]
    for (_, m), (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.eval()
    if not seen:
        raise UserError("BatchNorm re-estimation got no images")
    return len(bns)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


@torch.no_grad()
def _correct(model, reference, bns, images, batch_size, device) -> int:
    # one batch of all calibration images, so that every correction is computed over all of them
    # before the next layer sees its input: two forward passes in all (float, then compressed)
    xs = [x for x in _batches(images, batch_size)]
    if not xs:
        raise UserError("BatchNorm correction got no images")
    x = torch.cat(xs).to(device)
    model.eval()
    reference.eval()
    ref: dict[str, tuple] = {}
    hooks = [reference.get_submodule(n).register_forward_pre_hook(
        lambda mod, inp, n=n: ref.__setitem__(n, _batch_stats(inp[0]))) for n, _ in bns]
    try:
        reference(x)
    finally:
        for h in hooks:
            h.remove()

    def fix(mod, inp, n):
        mc, vc = _batch_stats(inp[0])
        mf, vf = ref[n]
        mod.running_mean += (mc - mf).to(mod.running_mean)
        mod.running_var *= (vc / vf.clamp_min(1e-12)).clamp(*VAR_RATIO).to(mod.running_var)

    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: fix(mod, inp, n)) for n, m in bns]
    try:
        model(x)  # each BatchNorm is corrected by its hook just before it runs
    finally:
        for h in hooks:
            h.remove()
    return len(bns)
