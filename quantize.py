"""Quantization baselines of every conv weight: what MESS is compared against, counted the same way.

    python quantize.py cifar10 -a mobilenet --ckpt ckpt_best.pth --qb 8                  # ckpt_best_q8.pth
    python quantize.py cifar10 -a mobilenet --ckpt ckpt_best.pth --method kmeans --qb 2  # ckpt_best_km2.pth
    python quantize.py cifar10 -a mobilenet --ckpt ckpt_best.pth --method kmeans --qb 2 --granularity channel
    python quantize.py cifar10 -a mobilenet --ckpt ckpt_best.pth --method vq --qb 6      # ckpt_best_vq6.pth
    python main.py cifar10 -a mobilenet -E --ckpt ckpt_best_q8.pth

``linear`` is MESS's own quantizer (``mess.quant.linear_quantize``, docs/design.md §3); ``kmeans`` and
``vq`` are the palettizations of ``mess.palette`` (§9). All three write the checkpoint and its packed
``.mess`` file and calibrate the BatchNorm statistics afterwards, as find_similar_kernel.py does (§8).
"""
from __future__ import annotations

import argparse

from config import BN_FLAGS, FLAGS, MODEL_FLAGS, TRACK_FLAGS, OneLineParser, add_flags
from find_similar_kernel import calibrate
from mess.account import print_account, storage_account
from mess.checkpoint import check_output_folder, checkpoint_writer, state_bytes, with_weights, write_together
from mess.compress import rel_error
from mess.names import packed_name, quantized_name
from mess.packed_write import size_line, write_mess
from mess.palette import check_palette, palettize
from mess.quant import conv_layers, quantize_layers
from mess.settings import check_bits
from utils import UserError, adopt_declared_arch, build_declared, load_model_checkpoint, run_cli


def get_args_parser():
    parser = OneLineParser(prog="quantize.py",
                           description="Quantize every conv weight: linear, k-means palettes or kernel "
                                       "codebooks (the baselines MESS is compared against).")
    add_flags(parser, MODEL_FLAGS + ("qb", "method", "granularity") + BN_FLAGS + TRACK_FLAGS)
    # not listed, still parsed: -Q (a no-op, the original's parser took it) and -v, refused in main with
    # a pointer to find_similar_kernel.py rather than argparse's bare "unrecognized arguments"
    for name in ("quant", "version"):
        flags, kw = FLAGS[name]
        parser.add_argument(*flags, **dict(kw, help=argparse.SUPPRESS))
    return parser.mark_required("ckpt")


def main(args):
    if args.version:
        raise UserError(f"quantize.py does plain quantization; -v {args.version} belongs to "
                        f"find_similar_kernel.py")
    if args.method == "linear":
        check_bits(args.qb)
    else:
        check_palette(args.method, args.qb, args.granularity)
    model, ckpt, path = load_model_checkpoint(args)
    # before the work: room beside the input for the checkpoint and its .mess (each at most float32 weights)
    check_output_folder(path.parent, 2 * state_bytes(model), "the compressed checkpoint and its .mess")
    if "mess" in ckpt:
        raise UserError(f"{path} is a MESS checkpoint ({ckpt['mess'].get('version')}); quantize the "
                        f"float checkpoint it came from instead")
    orig = model.state_dict()
    if args.method == "linear":
        sd = {k: v.detach().clone() for k, v in orig.items()}
        layers = conv_layers(model)
        entry = {"quant": {"bits": args.qb, "scales": quantize_layers(sd, layers, args.qb)}}
        title = f"plain {args.qb}-bit quantization: {path.name}"
    else:
        made = palettize(model, args.method, args.qb, args.granularity)
        sd, entry = made["model"], {"palette": made["palette"]}
        layers = list(made["palette"]["layers"])
        what = f"{2 ** args.qb} 3x3 kernels per layer" if args.method == "vq" else \
            f"{args.qb}-bit k-means per {'output channel' if args.granularity == 'channel' else 'layer'}"
        title = f"palette ({what}): {path.name}"
    bn = calibrate(args, model, sd)  # BatchNorm statistics of the quantized network (docs/design.md §8)
    out = with_weights(ckpt, sd, **entry, **bn)
    out_path = path.with_name(quantized_name(path.stem, args.qb, args.method, args.granularity))
    mess_path = out_path.with_name(packed_name(out_path.name))
    _, mess_bytes = write_together([(out_path, checkpoint_writer(out)),  # both, or neither
                                    (mess_path, lambda tmp: write_mess(tmp, out, build=build_declared))])
    account = storage_account(sd, quant=out.get("quant"), palette=out.get("palette"))
    rows = []
    for name in layers:
        w, wq = orig[f"{name}.weight"], sd[f"{name}.weight"]
        rows.append({"layer": name, "path": "conv", "targets": w.numel(),
                     "mean_residual": float((wq - w).abs().mean()), "rel_error": rel_error(wq, w)})
    print_account(account, rows, title=title)
    print(f"wrote {out_path} and {mess_path.name}")
    print(size_line(mess_path, mess_bytes, sd))
    return {"path": out_path, "account": account, "ratio": account.ratio, "rows": rows,
            "mess_path": mess_path, **entry}


if __name__ == "__main__":
    from tracking import Experiment, tracked_run
    # a sacred run like find_similar_kernel.py's, so that the peers sit beside MESS in Omniboard
    run_cli(lambda args: tracked_run(Experiment("quantize.py"), main, args, command="quantize",
                                     check=adopt_declared_arch), get_args_parser())
