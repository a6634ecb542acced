"""Convert a torchvision ImageNet checkpoint into this suite's checkpoint format.

    python torchvision_to_ours.py -a resnet --layers 152                  # download, convert
    python torchvision_to_ours.py -a vgg --layers 16 --bn --src vgg16_bn-6c64b313.pth -o vgg.pth -E

The result is a docs/design.md §4 checkpoint (``model``, ``arch``, ``epoch``,
``best_acc1``, ``args``, ``source``), by default where ``main.py --ckpt ckpt_best.pth``
finds it: ``checkpoint/<model>/imagenet/ckpt_best.pth``. Every key is renamed by the
explicit table below and every key and shape is checked against the model built here.
A file is only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from config import OneLineParser, add_flags
from models import DATASET_FAMILY, ModelError, build_model
from utils import (
    UserError,
    arch_spec,
    ckpt_dir_of,
    load_checkpoint,
    load_state_dict_checked,
    run_cli,
    save_checkpoint,
)

# Key renames, source layout -> ((regex, replacement), ...), applied in order to every key.
# Both tables are empty on purpose: models/ keeps torchvision's layer names for resnet, vgg,
# mobilenetv2 and wideresnet (ImageNet) and chenyaofo/pytorch-cifar-models' names for the CIFAR
# resnet, vgg*_bn and mobilenetv2, so that released weights load by key. tests/test_convert.py
# checks that claim for every published architecture; a model that renames a layer adds its row here.
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision": (),
    "chenyaofo": (),
}

# Files saved before PyTorch 0.4.1 (torchvision's vgg*_bn among them) have no BatchNorm
# ``num_batches_tracked``; PyTorch itself fills it with 0 when loading them, and so do we.
FILL_MISSING = ("num_batches_tracked",)


def convert_state_dict(state_dict: dict, model: nn.Module, layout: str, src) -> dict:
    """``state_dict`` in ``layout`` ("torchvision" | "chenyaofo") renamed to ``model``'s keys,
    checked key by key and shape by shape (``UserError`` naming ``src`` otherwise)."""
    rules = RENAMES[layout]
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        if new in out:
            raise UserError(f"{src}: two keys map onto {new!r}")
        out[new] = value
    for key, value in model.state_dict().items():
        if key not in out and key.rsplit(".", 1)[-1] in FILL_MISSING:
            out[key] = torch.zeros_like(value)
    load_state_dict_checked(model, out, src)
    return model.state_dict()


def output_path(out: str | None, spec: dict) -> Path:
    """Where the converted checkpoint goes: ``-o`` with a folder as given, a bare ``-o NAME``
    inside the run's checkpoint folder (as ``main.py --ckpt NAME`` looks it up), else ckpt_best.pth."""
    ckpt_dir = ckpt_dir_of(spec)
    if not out:
        return ckpt_dir / "ckpt_best.pth"
    p = Path(out)
    return p if p.is_absolute() or len(p.parts) > 1 else ckpt_dir / p


def build(args) -> nn.Module:
    try:
        return build_model(args.arch, args.dataset, args.layers, args.width_mult, args.bn)
    except ModelError as e:
        raise UserError(str(e)) from None


def save_converted(model: nn.Module, spec: dict, out: Path, best_acc1: float, source: dict) -> None:
    save_checkpoint({"model": model.state_dict(), "arch": spec, "epoch": 0, "best_acc1": float(best_acc1),
                     "args": {}, "source": source}, out)


def evaluate(args, out: Path) -> None:
    """``main.py DATA -E --ckpt OUT`` in-process, with this run's model and data flags."""
    import main
    argv = [args.dataset, "-a", args.arch, "--layers", str(args.layers), "--width-mult", str(args.width_mult),
            "--datapath", args.datapath, "-b", str(args.batch_size), "-j", str(args.workers),
            "-E", "--ckpt", str(out.resolve())]
    argv += ["--bn"] if args.bn else []
    argv += ["-C", "-g", *map(str, args.gpuids)] if args.cuda else []
    main.main(main.get_args_parser().parse_args(argv))


def get_args_parser():
    parser = OneLineParser(prog="torchvision_to_ours.py",
                           description="Convert a torchvision ImageNet checkpoint into ours.")
    add_flags(parser, ("arch", "layers", "bn", "width_mult"))
    parser.add_argument("--src", metavar="FILE", default=None,
                        help="torchvision checkpoint to convert (default: download the published one)")
    parser.add_argument("-o", "--out", metavar="OUT", default=None,
                        help="output checkpoint; a bare file name goes into the run's checkpoint folder "
                             "(default: checkpoint/<model>/imagenet/ckpt_best.pth)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it holds something else")
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help="fetch the same file name from this base URL instead (default: torchvision's)")
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", default=None,
                        help="where downloaded files are kept "
                             "(default: torch.hub's, $TORCH_HOME/hub/checkpoints)")
    add_flags(parser, ("evaluate", "datapath", "batch_size", "workers", "cuda", "gpuids"))
    parser.set_defaults(dataset="imagenet")
    return parser


def main(args) -> Path:
    import down_ckpt
    model = build(args)
    spec = arch_spec(args, num_classes=DATASET_FAMILY[args.dataset][1])
    out = output_path(args.out, spec)
    if args.src:
        src = Path(args.src)
        from download import file_digest
        if not src.is_file():
            raise UserError(f"--src file not found: {src}")
        digest = file_digest(src)
        known = down_ckpt.find_by_digest(digest)
        source = {"url": known.url if known else str(src.resolve()), "sha256": digest}
        acc1 = known.acc1 if known and known.dataset == "imagenet" else 0.0
        down_ckpt.refuse_overwrite(out, source, args.force)
    else:
        known = down_ckpt.find_source("imagenet", args.arch, args.layers, args.width_mult, args.bn)
        if down_ckpt.already_converted(out, known, args.force):
            print(f"{out} already holds {known.file}; nothing to do")
            if args.evaluate:
                evaluate(args, out)
            return out
        src, digest = down_ckpt.fetch(known, args.cache_dir, args.mirror)
        source, acc1 = {"url": known.url, "sha256": digest}, known.acc1
    convert_state_dict(load_checkpoint(src)["model"], model, "torchvision", src)
    save_converted(model, spec, out, acc1, source)
    print(f"converted {src} -> {out}")
    if args.evaluate:
        evaluate(args, out)
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
