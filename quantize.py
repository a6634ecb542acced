"""Plain linear quantization of every conv weight: the baseline MESS is compared against.

    python quantize.py cifar10 -a mobilenet --ckpt ckpt_best.pth --qb 8   # -> ckpt_best_q8.pth
    python main.py cifar10 -a mobilenet -E --ckpt ckpt_best_q8.pth

The quantizer is MESS's own (``mess.quant.linear_quantize``, docs/design.md §3), so MESS and the
baseline quantize the same way.
"""
from __future__ import annotations

from config import MESS_FLAGS, MODEL_FLAGS, OneLineParser, add_flags
from mess.account import print_account, storage_account
from mess.checkpoint import with_weights
from mess.compress import rel_error
from mess.names import quantized_name
from mess.quant import conv_layers, quantize_layers
from mess.settings import check_bits
from utils import UserError, load_model_checkpoint, run_cli, save_checkpoint


def get_args_parser():
    parser = OneLineParser(prog="quantize.py",
                           description="Plain linear quantization of every conv weight (the baseline "
                                       "MESS is compared against).")
    # the same flags as find_similar_kernel.py, so one command line serves both; only --qb matters here
    return add_flags(parser, MODEL_FLAGS + MESS_FLAGS)


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
    out = with_weights(ckpt, sd, quant={"bits": args.qb, "scales": scales})
    out_path = path.with_name(quantized_name(path.stem, args.qb))
    save_checkpoint(out, out_path)
    account = storage_account(sd, quant=out["quant"])
    rows = []
    for name in layers:
        w, wq = orig[f"{name}.weight"], sd[f"{name}.weight"]
        rows.append({"layer": name, "path": "conv", "targets": w.numel(),
                     "mean_residual": float((wq - w).abs().mean()), "rel_error": rel_error(wq, w)})
    print_account(account, rows, title=f"plain {args.qb}-bit quantization: {path.name}")
    print(f"wrote {out_path}")
    return {"path": out_path, "account": account, "ratio": account.ratio, "rows": rows, "quant": out["quant"]}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
