"""Pack a checkpoint into a ``.mess`` file, or check one: the network in the bits the account counts.

    python find_similar_kernel.py cifar10 -a resnet --layers 56 -v v2qq --ckpt ckpt_best.pth  # + .mess
    python main.py cifar10 -a resnet --layers 56 -E --ckpt ckpt_best_v2qq_q888.mess
    python packed.py cifar10 -a resnet --layers 56 --ckpt ckpt_rt1_v2qq_q888_best.pth       # any checkpoint

The CLI of ``mess.save`` / ``mess.load``; the format is docs/packed-format.md (a safetensors file,
no pickle, validated before anything is allocated).
"""
from __future__ import annotations

from pathlib import Path

from config import OneLineParser, add_flags
from mess.checkpoint import check_output_folder, state_bytes
from mess.packed_format import SUFFIX
from mess.packed_write import size_line, write_mess
from utils import UserError, build_declared, load_model, run_cli


def get_args_parser():
    parser = OneLineParser(prog="packed.py",
                           description="Write a checkpoint (float, plain-quantized or MESS) as a packed "
                                       ".mess file beside it; given a .mess file, check it and print sizes.")
    add_flags(parser, ("dataset", "arch", "layers", "bn", "width_mult", "ckpt"))
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="the .mess file to write (default: --ckpt with the suffix .mess)")
    return parser.mark_required("ckpt")


def main(args):
    if not args.ckpt:
        raise UserError("--ckpt PATH is required: the checkpoint to pack, or a .mess file to check")
    model, ckpt, path = load_model(args)  # a .mess file is read against the model, validated, loaded
    if path.suffix == SUFFIX:
        if args.output:
            raise UserError(f"{path.name} is packed already; -o/--output applies to a checkpoint")
        n, out = path.stat().st_size, path
    else:
        out = Path(args.output) if args.output else path.with_suffix(SUFFIX)
        if out.suffix != SUFFIX:
            raise UserError(f"-o/--output must end in {SUFFIX}, not {out.name!r}")
        check_output_folder(out.parent, state_bytes(model), out.name)  # at most the float32 weights
        n = write_mess(out, ckpt, build=build_declared)
        print(f"wrote {out}")
    print(size_line(out, n, ckpt["model"]))
    return {"path": out, "bytes": n}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
