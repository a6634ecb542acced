"""Download published pretrained weights and convert them into this suite's checkpoints.

    python down_ckpt.py imagenet -a resnet --layers 50 -o pretrained_model.pth
    python down_ckpt.py cifar10 -a resnet --layers 56
    python down_ckpt.py cifar10 -a resnet_a --layers 20      # akamaster's option-A ResNet-20
    python down_ckpt.py cifar100 -a mobilenetv2 --width-mult 0.5 --mirror https://lab-server/weights/
    python down_ckpt.py cifar10 -a resnet --layers 20 --mirror http://lab-server/w/ --allow-http
    python down_ckpt.py imagenet -a resnet --layers 18 --sha256 <the file's 64 hex digits>
    python down_ckpt.py --list

ImageNet weights are torchvision's (IMAGENET1K_V1), CIFAR-10/100 weights the release files
of chenyaofo/pytorch-cifar-models, CIFAR-10 resnet_a weights akamaster/pytorch_resnet_cifar10's.
Each file is checked against its full SHA-256 where known (published, --sha256, or pinned in
the cache when this tool first verified it), else against the 32-bit prefix in its name
(torch.hub's convention) with a warning, converted key by key and saved where
``main.py DATA -a ARCH ... --ckpt ckpt_best.pth`` finds it. Downloads are https only unless
--allow-http, capped by --max-bytes (a file's own size where known) and --deadline. The table
of files, the checks and the conversion are pretrained.py's, shared with torchvision_to_ours.py.
"""
from __future__ import annotations

from config import FLAGS, OneLineParser, add_flags
from download import add_download_flags
from models import DATASET_FAMILY
from pretrained import (
    SOURCES,
    already_converted,
    build,
    convert_file,
    fetch,
    find_source,
    output_path,
    pin_by_hand,
    save_converted,
)
from utils import UserError, arch_spec, run_cli


def print_list() -> None:
    """One line per available checkpoint: the arguments for this script, then what it is."""
    for s in SOURCES.values():
        argv = f"{s.dataset} -a {s.arch}"
        argv += f" --layers {s.layers}" if s.arch != "mobilenetv2" else ""
        argv += " --bn" if s.bn else ""
        argv += f" --width-mult {s.width_mult:g}" if s.width_mult != 1.0 else ""
        print(f"{argv:<50} # {s.name}, top-1 {s.acc1:.2f}%, {s.file}")


def get_args_parser():
    parser = OneLineParser(prog="down_ckpt.py", description="Download pretrained weights as our checkpoints.")
    names, kw = FLAGS["dataset"]
    parser.add_argument(*names, **dict(kw, nargs="?", default=None,
                                       help="data set the weights were trained on: imagenet | cifar10 | "
                                            "cifar100"))
    add_flags(parser, ("arch", "layers", "bn", "width_mult"))
    parser.add_argument("-o", "--out", metavar="OUT", default=None,
                        help="output checkpoint; a bare file name goes into the run's checkpoint folder "
                             "(default: checkpoint/<model>/<DATA>/ckpt_best.pth)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it holds something else")
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help="fetch the same file names from this base URL (a lab mirror) instead of "
                             "download.pytorch.org / github.com; https unless --allow-http (default: none)")
    parser.add_argument("--sha256", metavar="HEX", default=None,
                        help="the file's full SHA-256 (64 hex digits), checked in place of the 32-bit "
                             "prefix in its name (default: the published one where known, else the one "
                             "pinned in the cache on first use)")
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", default=None,
                        help="where downloaded files are kept "
                             "(default: torch.hub's, $TORCH_HOME/hub/checkpoints)")
    add_download_flags(parser, max_bytes_for="a file whose size is not known", deadline=3600.0)
    parser.add_argument("--list", action="store_true", help="list the available weights and exit")
    return parser


def main(args):
    if args.list:
        print_list()
        return None
    if not args.dataset:
        raise UserError("give the data set the weights were trained on: imagenet | cifar10 | cifar100 "
                        "(or --list)")
    src = find_source(args.dataset, args.arch, args.layers, args.width_mult, args.bn)
    if args.sha256:
        src = pin_by_hand(src, args.sha256, args.cache_dir)
    spec = arch_spec(args, num_classes=DATASET_FAMILY[args.dataset][1])
    out = output_path(args.out, spec)
    if already_converted(out, src, args.force):
        print(f"{out} already holds {src.file}; nothing to do")
        return out
    path, digest = fetch(src, args.cache_dir, args.mirror, allow_http=args.allow_http,
                         max_bytes=args.max_bytes, deadline=args.deadline)
    model = build(args)
    convert_file(path, model, src.layout)
    save_converted(model, spec, out, src.acc1, {"url": src.url, "sha256": digest})
    print(f"saved {src.name} for {src.dataset} (published top-1 {src.acc1:.2f}%) to {out}")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
