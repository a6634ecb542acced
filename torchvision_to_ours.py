"""Convert a published checkpoint into this suite's checkpoint format.

    python torchvision_to_ours.py -a resnet --layers 152                  # download, convert
    python torchvision_to_ours.py -a vgg --layers 16 --bn --src vgg16_bn-6c64b313.pth -o vgg.pth -E
    python torchvision_to_ours.py -a resnet_a --layers 20 --src resnet20-12fca82f.th   # akamaster's

Torchvision's ImageNet files by default; a published --src file (torchvision's, chenyaofo's or
akamaster's, known by its SHA-256) brings its data set and key layout, which --dataset and
--layout give for any other file. The result is a docs/design.md §4 checkpoint (``model``,
``arch``, ``epoch``, ``best_acc1``, ``args``, ``source``), by default where ``main.py --ckpt
ckpt_best.pth`` finds it: ``checkpoint/<model>/<DATA>/ckpt_best.pth``. Every key is renamed by the
explicit table ``pretrained.RENAMES`` and every key and shape is checked against the model
built here. A file is only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from pathlib import Path

from config import DATASETS, OneLineParser, add_flags
from download import add_download_flags, file_digest
from models import DATASET_FAMILY
from pretrained import (
    RENAMES,
    Source,
    already_converted,
    build,
    convert_file,
    fetch,
    find_by_digest,
    find_source,
    output_path,
    refuse_overwrite,
    save_converted,
)
from utils import UserError, arch_spec, run_cli


def evaluate(args, out: Path) -> None:
    """``main.py DATA -E --ckpt OUT`` in-process, with this run's model and data flags."""
    import main  # here: a plain conversion needs none of the training stack
    argv = [args.dataset, "-a", args.arch, "--layers", str(args.layers), "--width-mult", str(args.width_mult),
            "--datapath", args.datapath, "-b", str(args.batch_size), "-j", str(args.workers),
            "-E", "--ckpt", str(out.resolve())]
    argv += ["--bn"] if args.bn else []
    argv += ["-C", "-g", *map(str, args.gpuids)] if args.cuda else []
    main.main(main.get_args_parser().parse_args(argv))


def get_args_parser():
    parser = OneLineParser(prog="torchvision_to_ours.py",
                           description="Convert a published checkpoint (torchvision, chenyaofo, akamaster) "
                                       "into ours.")
    add_flags(parser, ("arch", "layers", "bn", "width_mult"))
    parser.add_argument("--src", metavar="FILE", default=None,
                        help="checkpoint file to convert (default: download the published one)")
    parser.add_argument("--dataset", metavar="DATA", default=None, choices=DATASETS,
                        help="data set the weights were trained on (default: that of a published --src "
                             "file, else imagenet)")
    parser.add_argument("--layout", metavar="L", default=None, choices=tuple(RENAMES),
                        help=f"key layout of --src: {' | '.join(RENAMES)} (default: that of a published "
                             f"file, else torchvision)")
    parser.add_argument("-o", "--out", metavar="OUT", default=None,
                        help="output checkpoint; a bare file name goes into the run's checkpoint folder "
                             "(default: checkpoint/<model>/<DATA>/ckpt_best.pth)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it holds something else")
    parser.add_argument("--mirror", metavar="URL", default=None,
                        help="fetch the same file name from this base URL instead; https unless --allow-http "
                             "(default: the publisher's)")
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", default=None,
                        help="where downloaded files are kept "
                             "(default: torch.hub's, $TORCH_HOME/hub/checkpoints)")
    add_flags(parser, ("evaluate", "datapath", "batch_size", "workers", "cuda", "gpuids"))
    add_download_flags(parser, max_bytes_for="a file whose size is not known", deadline=3600.0)
    return parser


def given_file(args) -> tuple[Path, str, Source | None]:
    """``--src``: its path, its SHA-256 and the published file it is, if it is one."""
    src = Path(args.src)
    if not src.is_file():
        raise UserError(f"--src file not found: {src}")
    digest = file_digest(src)
    return src, digest, find_by_digest(digest)


def main(args) -> Path:
    src, digest, known = given_file(args) if args.src else (None, "", None)
    # a published file says what it was trained on and how its keys are laid out; flags override
    args.dataset = args.dataset or (known.dataset if known else "imagenet")
    if not args.src:
        known = find_source(args.dataset, args.arch, args.layers, args.width_mult, args.bn)
    layout = args.layout or (known.layout if known else "torchvision")
    model = build(args)
    spec = arch_spec(args, num_classes=DATASET_FAMILY[args.dataset][1])
    out = output_path(args.out, spec)
    if args.src:
        source = {"url": known.url if known else str(src.resolve()), "sha256": digest}
        acc1 = known.acc1 if known and known.dataset == args.dataset else 0.0
        refuse_overwrite(out, source, args.force)
    else:
        if already_converted(out, known, args.force):
            print(f"{out} already holds {known.file}; nothing to do")
            if args.evaluate:
                evaluate(args, out)
            return out
        src, digest = fetch(known, args.cache_dir, args.mirror, allow_http=args.allow_http,
                            max_bytes=args.max_bytes, deadline=args.deadline)
        source, acc1 = {"url": known.url, "sha256": digest}, known.acc1
    convert_file(src, model, layout)
    save_converted(model, spec, out, acc1, source)
    print(f"converted {src} -> {out}")
    if args.evaluate:
        evaluate(args, out)
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
