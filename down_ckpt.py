"""Download published pretrained weights and convert them into this suite's checkpoints.

    python down_ckpt.py imagenet -a resnet --layers 50 -o pretrained_model.pth
    python down_ckpt.py cifar10 -a resnet --layers 56
    python down_ckpt.py cifar100 -a mobilenetv2 --width-mult 0.5 --mirror http://lab-server/weights/
    python down_ckpt.py --list

ImageNet weights are torchvision's (IMAGENET1K_V1), CIFAR-10/100 weights the release files
of chenyaofo/pytorch-cifar-models. Each file is checked against the SHA-256 prefix in its
name (torch.hub's convention), converted key by key (torchvision_to_ours.py) and saved where
``main.py DATA -a ARCH ... --ckpt ckpt_best.pth`` finds it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from config import FLAGS, OneLineParser, add_flags
from models import DATASET_FAMILY, model_name
from utils import UserError, arch_spec, run_cli

TORCHVISION_URL = "https://download.pytorch.org/models/"
CHENYAOFO_URL = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/"


@dataclass(frozen=True)
class Source:
    dataset: str
    arch: str
    layers: int
    width_mult: float
    bn: bool
    url: str
    acc1: float  # published top-1 accuracy, %
    layout: str  # key layout of the file: "torchvision" | "chenyaofo"

    @property
    def name(self) -> str:
        return model_name(self.arch, self.layers, self.width_mult, self.bn)

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def sha256(self) -> str:
        """The hex digits after the last '-' of the file name: a prefix of its SHA-256."""
        return re.search(r"-([0-9a-f]{8,})\.[^.]+$", self.file).group(1)


# torchvision's IMAGENET1K_V1 weights and their published ImageNet top-1 (torchvision.models docs).
# arch, layers, width_mult (k for wideresnet), bn, file, top-1
_TORCHVISION = [
    ("resnet", 18, 1.0, False, "resnet18-f37072fd.pth", 69.758),
    ("resnet", 34, 1.0, False, "resnet34-b627a593.pth", 73.314),
    ("resnet", 50, 1.0, False, "resnet50-0676ba61.pth", 76.130),
    ("resnet", 101, 1.0, False, "resnet101-63fe2227.pth", 77.374),
    ("resnet", 152, 1.0, False, "resnet152-394f9c45.pth", 78.312),
    ("vgg", 11, 1.0, False, "vgg11-8a719046.pth", 69.020),
    ("vgg", 11, 1.0, True, "vgg11_bn-6002323d.pth", 70.370),
    ("vgg", 13, 1.0, False, "vgg13-19584684.pth", 69.928),
    ("vgg", 13, 1.0, True, "vgg13_bn-abd245e5.pth", 71.586),
    ("vgg", 16, 1.0, False, "vgg16-397923af.pth", 71.592),
    ("vgg", 16, 1.0, True, "vgg16_bn-6c64b313.pth", 73.360),
    ("vgg", 19, 1.0, False, "vgg19-dcbb9e9d.pth", 72.376),
    ("vgg", 19, 1.0, True, "vgg19_bn-c79401a0.pth", 74.218),
    ("mobilenetv2", 16, 1.0, False, "mobilenet_v2-b0353104.pth", 71.878),
    ("wideresnet", 50, 2.0, False, "wide_resnet50_2-95faca4d.pth", 78.468),
    ("wideresnet", 101, 2.0, False, "wide_resnet101_2-32ee1156.pth", 78.848),
]

# chenyaofo/pytorch-cifar-models release files (its README's model zoo): CIFAR-10 and CIFAR-100.
# The file is <release tag = arch>/<dataset>_<stem>-<hash>.pt.
# arch, layers, width_mult, bn, stem, CIFAR-10 hash, top-1, CIFAR-100 hash, top-1
_CHENYAOFO = [
    ("resnet", 20, 1.0, False, "resnet20", "4118986f", 92.60, "23dac2f1", 68.83),
    ("resnet", 32, 1.0, False, "resnet32", "ef93fc4d", 93.53, "84213ce6", 70.16),
    ("resnet", 44, 1.0, False, "resnet44", "2a3cabcb", 94.01, "ffe32858", 71.63),
    ("resnet", 56, 1.0, False, "resnet56", "187c023a", 94.37, "f2eff4c8", 72.63),
    ("vgg", 11, 1.0, True, "vgg11_bn", "eaeebf42", 92.79, "57d0759e", 70.78),
    ("vgg", 13, 1.0, True, "vgg13_bn", "c01e4a43", 94.00, "5ebe5778", 74.63),
    ("vgg", 16, 1.0, True, "vgg16_bn", "6ee7ea24", 94.16, "7d8c4031", 74.00),
    ("vgg", 19, 1.0, True, "vgg19_bn", "57191229", 93.91, "b98f7bd7", 73.87),
    ("mobilenetv2", 16, 0.5, False, "mobilenetv2_x0_5", "ca14ced9", 92.88, "9f915757", 70.88),
    ("mobilenetv2", 16, 0.75, False, "mobilenetv2_x0_75", "a53c314e", 93.72, "d7891e60", 73.61),
    ("mobilenetv2", 16, 1.0, False, "mobilenetv2_x1_0", "fe6a5b48", 93.79, "1311f9ff", 74.20),
    ("mobilenetv2", 16, 1.4, False, "mobilenetv2_x1_4", "3bbbd6e2", 94.22, "8a269f5e", 75.98),
]


def _sources() -> dict[tuple[str, str], Source]:
    table = {}
    for arch, layers, wm, bn, file, acc in _TORCHVISION:
        s = Source("imagenet", arch, layers, wm, bn, TORCHVISION_URL + file, acc, "torchvision")
        table[s.dataset, s.name] = s
    for dataset, column in (("cifar10", 0), ("cifar100", 2)):
        for arch, layers, wm, bn, stem, *published in _CHENYAOFO:
            digest, acc = published[column], published[column + 1]
            url = f"{CHENYAOFO_URL}{arch}/{dataset}_{stem}-{digest}.pt"
            s = Source(dataset, arch, layers, wm, bn, url, acc, "chenyaofo")
            table[s.dataset, s.name] = s
    return table


SOURCES = _sources()  # (dataset, model name) -> Source


def find_source(dataset: str, arch: str, layers: int, width_mult: float, bn: bool) -> Source:
    """The published weights for this model, or a one-line ``UserError`` listing what exists."""
    datasets = sorted({d for d, _ in SOURCES})
    if dataset not in datasets:
        raise UserError(f"no published weights for {dataset!r}; there are some for {', '.join(datasets)}")
    try:
        name = model_name(arch, layers, width_mult, bn)
    except KeyError:
        name = arch
    if (dataset, name) in SOURCES:
        return SOURCES[dataset, name]
    available = [n for d, n in SOURCES if d == dataset]
    hint = " (add --bn)" if f"{name}_bn" in available else ""
    raise UserError(f"no published {dataset} weights for {name}{hint}; available: {', '.join(available)}")


def find_by_digest(sha256: str) -> Source | None:
    return next((s for s in SOURCES.values() if sha256.startswith(s.sha256)), None)


def cache_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"  # shared with torchvision: no second download


def fetch(src: Source, cache: str | None, mirror: str | None) -> tuple[Path, str]:
    """Download (or find in the cache) and verify ``src``; returns its path and SHA-256."""
    from download import download, mirror_url
    dest = cache_dir(cache) / src.file
    digest = download(mirror_url(src.url, mirror), dest, sha256=src.sha256)
    return dest, digest


def _existing_source(out: Path) -> dict | None:
    import torch
    try:
        ckpt = torch.load(out, map_location="cpu", weights_only=True)
    except Exception:  # not a checkpoint of ours: refuse_overwrite says so
        return None
    return ckpt.get("source") if isinstance(ckpt, dict) else None


def already_converted(out: Path, src: Source, force: bool) -> bool:
    """True if ``out`` already holds ``src`` converted; refuses to overwrite anything else."""
    if not out.exists() or force:
        return False
    have = _existing_source(out) or {}
    if str(have.get("sha256", "")).startswith(src.sha256):
        return True
    refuse_overwrite(out, {"sha256": ""}, force)
    return False


def refuse_overwrite(out: Path, source: dict, force: bool) -> None:
    if force or not out.exists():
        return
    have = _existing_source(out) or {}
    if source.get("sha256") and have.get("sha256") == source["sha256"]:
        return  # the same file converted again: harmless
    raise UserError(f"{out} already exists and holds something else (a trained checkpoint?); "
                    f"choose another -o or pass --force to overwrite it")


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
                             "download.pytorch.org / github.com (default: none)")
    parser.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", default=None,
                        help="where downloaded files are kept "
                             "(default: torch.hub's, $TORCH_HOME/hub/checkpoints)")
    parser.add_argument("--list", action="store_true", help="list the available weights and exit")
    return parser


def main(args):
    if args.list:
        print_list()
        return None
    if not args.dataset:
        raise UserError("give the data set the weights were trained on: imagenet | cifar10 | cifar100 "
                        "(or --list)")
    from torchvision_to_ours import build, convert_state_dict, output_path, save_converted
    from utils import load_checkpoint
    src = find_source(args.dataset, args.arch, args.layers, args.width_mult, args.bn)
    spec = arch_spec(args, num_classes=DATASET_FAMILY[args.dataset][1])
    out = output_path(args.out, spec)
    if already_converted(out, src, args.force):
        print(f"{out} already holds {src.file}; nothing to do")
        return out
    path, digest = fetch(src, args.cache_dir, args.mirror)
    model = build(args)
    convert_state_dict(load_checkpoint(path)["model"], model, src.layout, path)
    save_converted(model, spec, out, src.acc1, {"url": src.url, "sha256": digest})
    print(f"saved {src.name} for {src.dataset} (published top-1 {src.acc1:.2f}%) to {out}")
    return out


if __name__ == "__main__":
    run_cli(main, get_args_parser())
