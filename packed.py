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
from mess.packed_format import SUFFIX
from mess.packed_read import read_mess
from mess.packed_write import size_line, write_mess
from utils import (
    UserError,
    build_model_from_args,
    check_arch,
    load_any_checkpoint,
    load_state_dict_checked,
    resolve_ckpt,
    run_cli,
)


def get_args_parser():
    parser = OneLineParser(prog="packed.py",
                           description="Write a checkpoint (float, plain-quantized or MESS) as a packed "
                                       ".mess file beside it; given a .mess file, check it and print sizes.")
    add_flags(parser, ("dataset", "arch", "layers", "bn", "width_mult", "ckpt"))
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="the .mess file to write (default: --ckpt with the suffix .mess)")
    return parser


def load(args):
    """``(ckpt, path)``: ``utils.load_model``, but a .mess file is read against the flags' model, so
    that one declaring other tensors is refused before anything of it is decoded."""
    model, spec, ckpt_dir = build_model_from_args(args)
    path = resolve_ckpt(args.ckpt, ckpt_dir)
    ckpt = read_mess(path, model=model) if path.suffix == SUFFIX else load_any_checkpoint(path)
    check_arch(ckpt, spec, path)
    load_state_dict_checked(model, ckpt["model"], path)
    return ckpt, path


def main(args):
    if not args.ckpt:
        raise UserError("--ckpt PATH is required: the checkpoint to pack, or a .mess file to check")
    ckpt, path = load(args)  # a .mess file is read, validated and loaded into the model
    if path.suffix == SUFFIX:
        if args.output:
            raise UserError(f"{path.name} is packed already; -o/--output applies to a checkpoint")
        n, out = path.stat().st_size, path
    else:
        out = Path(args.output) if args.output else path.with_suffix(SUFFIX)
        if out.suffix != SUFFIX:
            raise UserError(f"-o/--output must end in {SUFFIX}, not {out.name!r}")
        n = write_mess(out, ckpt)
        print(f"wrote {out}")
    print(size_line(out, n, ckpt["model"]))
    return {"path": out, "bytes": n}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
