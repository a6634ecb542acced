"""Linear quantization (DESIGN.md section 3) and the plain-quantization baseline.

    python quantize.py cifar10 -a mobilenet --ckpt ckpt_best.pth --qb 8   # -> ckpt_best_q8.pth
    python main.py cifar10 -a mobilenet -E --ckpt ckpt_best_q8.pth

The functions here are shared with find_similar_kernel.py (weights per layer before the
search, alphas and betas after it), so MESS and the baseline quantize the same way.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from config import MESS_FLAGS, MODEL_FLAGS, OneLineParser, add_flags
from utils import (
    UserError,
    run_cli,
    save_checkpoint,
)

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int, flag: str = "--qb") -> int:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"{flag} must be between {MIN_BITS} and {MAX_BITS} bits, got {bits}")
    return bits


def linear_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """The original's per-tensor linear quantization; returns ``(x', scale)``.

    ``scale = (max - min) / (2^b - 1)``, ``q = clamp(round(x / scale), -2^(b-1), 2^(b-1) - 1)``,
    ``x' = q * scale``, all in float32. The grid is centred on zero, so a tensor far from
    zero is clipped: that is the original's scheme, kept for comparable numbers. A tensor
    with ``max == min`` is returned unchanged with ``scale = 0.0`` (it still costs one
    scale: a packer stores the constant there, with ``q = 1``).
    """
    check_bits(bits)
    x = x.detach().float()
    if x.numel() == 0:
        return x.clone(), 0.0
    lo, hi = torch.aminmax(x)
    if hi == lo:
        return x.clone(), 0.0
    if not torch.isfinite(hi - lo):
        raise UserError("cannot quantize a tensor holding NaN or inf")
    scale = (hi - lo) / (2**bits - 1)
    q = torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q * scale, float(scale)


def quantize_layers(state_dict: dict, layers, bits: int) -> dict[str, float]:
    """Quantize ``<layer>.weight`` of each layer in place in ``state_dict``, one scale per layer."""
    scales = {}
    for name in layers:
        key = f"{name}.weight"
        state_dict[key], scales[name] = linear_quantize(state_dict[key], bits)
    return scales


def quantize_alpha_beta(alpha: torch.Tensor, beta: torch.Tensor | None, qba: int | None, qbb: int | None):
    """Alphas and betas of one layer, each with its own scale; ``None`` bits keep float32.

    Returns ``(alpha', alpha_scale, beta', beta_scale)``; a scale is ``None`` when not quantized.
    """
    sa = sb = None
    if qba is not None:
        alpha, sa = linear_quantize(alpha, qba)
    if beta is not None and qbb is not None:
        beta, sb = linear_quantize(beta, qbb)
    return alpha, sa, beta, sb


def conv_layers(model: nn.Module) -> list[str]:
    """Every Conv2d, in forward order: what ``-Q`` quantizes."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------- CLI
def get_args_parser():
    parser = OneLineParser(prog="quantize.py",
                           description="Plain linear quantization of every conv weight (the baseline "
                                       "MESS is compared against).")
    # the same flags as find_similar_kernel.py, so one command line serves both; only --qb matters here
    return add_flags(parser, MODEL_FLAGS + MESS_FLAGS)


def load_model_checkpoint(args):
    """Build the model the flags describe and load ``--ckpt`` into it; ``(model, ckpt, path)``."""
    if not args.ckpt:
        raise UserError("--ckpt PATH is required: the checkpoint to compress")
    from packed import load_model  # packed imports this module: import at call time
    model, ckpt, path = load_model(args)  # any checkpoint, or a .mess file
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path} holds NaN or inf in {k}; it cannot be compressed")
    return model, ckpt, Path(path)


def output_checkpoint(ckpt: dict, state_dict: dict, **extra) -> dict:
    """The input checkpoint with new weights: optimizer and scheduler states of the float
    weights are dropped (they would resume training of weights that no longer exist)."""
    out = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scheduler", "mess", "quant")}
    out["model"] = state_dict
    out.update(extra)
    return out


def main(args):
    if args.version:
        raise UserError(f"quantize.py does plain quantization; -v {args.version} belongs to "
                        f"find_similar_kernel.py")
    check_bits(args.qb)
    model, ckpt, path = load_model_checkpoint(args)
    if "mess" in ckpt:
        raise UserError(f"{path} is a MESS checkpoint ({ckpt['mess'].get('version')}); quantize the "
                        f"float checkpoint it came from instead")
    orig = model.state_dict()
    sd = {k: v.detach().clone() for k, v in orig.items()}
    layers = conv_layers(model)
    scales = quantize_layers(sd, layers, args.qb)
    out = output_checkpoint(ckpt, sd, quant={"bits": args.qb, "scales": scales})
    out_path = path.with_name(f"{path.stem}_q{args.qb}.pth")
    save_checkpoint(out, out_path)

    from find_similar_kernel import print_account, storage_account  # lazy: it imports this module
    account = storage_account(sd, quant=out["quant"])
    rows = []
    for name in layers:
        w, wq = orig[f"{name}.weight"], sd[f"{name}.weight"]
        rows.append({"layer": name, "path": "conv", "targets": w.numel(),
                     "mean_residual": float((wq - w).abs().mean()),
                     "rel_error": float((wq - w).abs().sum() / w.abs().sum().clamp_min(1e-30))})
    print_account(account, rows, title=f"plain {args.qb}-bit quantization: {path.name}")
    print(f"wrote {out_path}")
    return {"path": out_path, "account": account, "ratio": account.ratio, "rows": rows, "quant": out["quant"]}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
