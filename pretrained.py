"""Published pretrained weights: where they are, how they are checked, and how they become ours.

    from pretrained import find_source, fetch, convert_file
    src = find_source("cifar10", "resnet", 56, 1.0, False)
    path, digest = fetch(src, cache=None, mirror=None)

The library behind down_ckpt.py (download by model) and torchvision_to_ours.py (convert a
given file); neither CLI imports the other. It is not part of ``models/``: it downloads
(download.py) and reads and writes checkpoints (utils.py), which the model package never does.

ImageNet weights are torchvision's (IMAGENET1K_V1), CIFAR-10/100 weights the release files
of chenyaofo/pytorch-cifar-models, and CIFAR-10 ``resnet_a`` weights akamaster/pytorch_resnet_cifar10's.
Each file is checked against its full SHA-256 where one is known: pinned in this table, given
by hand (``pin_by_hand``, down_ckpt.py ``--sha256``) or pinned on first use in the cache
(``PINS_FILE``: every file this tool verified before); else against the 32-bit prefix in its
name (torch.hub's convention), with a warning, and its full SHA-256 is then pinned for next
time. It is renamed by the explicit table ``RENAMES``, checked key by key and shape by shape,
and saved as a docs/design.md §4 checkpoint (``model``, ``arch``, ``epoch``, ``best_acc1``,
``args``, ``source``). A file is only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.hub
import torch.nn as nn

from download import FULL_SHA256, download, mirror_url
from models import ModelError, build_model, model_name
from utils import (
    UserError,
    atomic_write,
    ckpt_dir_of,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
)

TORCHVISION_URL = "https://download.pytorch.org/models/"
CHENYAOFO_URL = "https://github.com/chenyaofo/pytorch-cifar-models/releases/download/"
AKAMASTER_URL = "https://raw.githubusercontent.com/akamaster/pytorch_resnet_cifar10/master/pretrained_models/"


@dataclass(frozen=True)
class Source:
    dataset: str
    arch: str
    layers: int
    width_mult: float
    bn: bool
    url: str
    acc1: float  # published top-1 accuracy, %
    layout: str  # key layout of the file: a key of RENAMES
    pinned_sha256: str = ""  # the file's full SHA-256 where known, checked in place of the name's prefix
    size: int = 0  # its size in bytes where known: the download's cap (else --max-bytes)

    @property
    def name(self) -> str:
        return model_name(self.arch, self.layers, self.width_mult, self.bn)

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def name_sha256(self) -> str:
        """The hex digits after the last '-' of the file name: a prefix of its SHA-256."""
        return re.search(r"-([0-9a-f]{8,})\.[^.]+$", self.file).group(1)

    @property
    def sha256(self) -> str:
        """What the file is checked against: its full SHA-256 where pinned, else the name's prefix
        (8 hex digits are 32 bits, which a made-up file can be ground to match; 256 cannot)."""
        return self.pinned_sha256 or self.name_sha256


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

# akamaster/pytorch_resnet_cifar10's pretrained_models/ (its README's table, branch master):
# CIFAR-10, option-A shortcuts (-a resnet_a), trained on inputs normalised with ImageNet's statistics.
# top-1 is 100 - the README's test error (8.27, 7.37, 6.90, 6.61, 6.32, 6.18 %). The full SHA-256
# and the size are those of the published files as measured (../shared/data/README.md); 110 and 1202:
# name prefix only.
# layers, file, top-1, full SHA-256 or "", bytes or 0
_AKAMASTER = [
    (20, "resnet20-12fca82f.th", 91.73, "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8",
     1099231),
    (32, "resnet32-d509ac18.th", 92.63, "d509ac1820d7f25398913559d7e81a13229b1e7adc5648e3bfa5e22dc137f850",
     1890043),
    (44, "resnet44-014dd654.th", 93.10, "014dd6541728a1c700b1642ab640e211dc6eb8ed507d70697458dc8f8a0ae2e4",
     2680855),
    (56, "resnet56-4bfd9763.th", 93.39, "4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367",
     3471733),
    (110, "resnet110-1d1ed7c2.th", 93.68, "", 0),
    (1202, "resnet1202-f3b1deed.th", 93.82, "", 0),
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
    for layers, file, acc, full, size in _AKAMASTER:
        s = Source("cifar10", "resnet_a", layers, 1.0, False, AKAMASTER_URL + file, acc, "akamaster",
                   full, size)
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
    elsewhere = [d for d, n in SOURCES if n == name]
    if f"{name}_bn" in available:
        hint = " (add --bn)"
    else:
        hint = f" (there are {', '.join(elsewhere)} weights for it)" if elsewhere else ""
    raise UserError(f"no published {dataset} weights for {name}{hint}; available: {', '.join(available)}")


def find_by_digest(sha256: str) -> Source | None:
    """The published file whose SHA-256 this is; one known by its name's prefix only says so."""
    src = next((s for s in SOURCES.values() if sha256.startswith(s.sha256)), None)
    if src and len(src.sha256) < FULL_SHA256:
        print(f"warning: taken for {src.file} by a {4 * len(src.sha256)}-bit SHA-256 prefix only "
              f"({src.sha256}), which a made-up file can match", file=sys.stderr)
    return src


def cache_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    return Path(torch.hub.get_dir()) / "checkpoints"  # shared with torchvision: no second download


# ---------------------------------------------------------------- pins: full SHA-256s known to the cache

# in the cache folder, in sha256sum's format ("HEX  NAME"): `sha256sum -c` reads it
PINS_FILE = "mess-pinned.sha256"


def read_pins(cache: str | None) -> dict[str, str]:
    """File name -> the full SHA-256 this tool verified for it before (pinned on first use)."""
    path = cache_dir(cache) / PINS_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    pins = {}
    for n, line in enumerate(text.splitlines(), 1):
        digest, _, name = line.strip().partition(" ")
        name = name.strip().lstrip("*")
        if not line.strip():
            continue
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
            raise UserError(f"{path} line {n} is not 'SHA256  NAME': {line.strip()[:80]!r}")
        pins[name] = digest
    return pins


def _write_pin(cache: str | None, name: str, digest: str) -> Path:
    pins = dict(read_pins(cache), **{name: digest})
    path = cache_dir(cache) / PINS_FILE
    text = "".join(f"{d}  {n}\n" for n, d in sorted(pins.items()))
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def pin_by_hand(src: Source, sha256: str, cache: str | None) -> Source:
    """``src`` checked against ``sha256`` (down_ckpt.py --sha256): a full hash of the published file."""
    digest = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UserError(f"--sha256 wants the full SHA-256 of {src.file}, 64 hex digits; got {sha256!r}")
    if not digest.startswith(src.name_sha256):
        raise UserError(f"--sha256 {digest[:16]}... is not {src.file}'s: its name says the SHA-256 "
                        f"starts with {src.name_sha256}")
    if src.pinned_sha256 and src.pinned_sha256 != digest:
        raise UserError(f"--sha256 {digest[:16]}... differs from {src.file}'s published SHA-256 "
                        f"{src.pinned_sha256[:16]}...")
    pinned = read_pins(cache).get(src.file)
    if pinned and pinned != digest:
        raise UserError(f"--sha256 {digest[:16]}... differs from the SHA-256 pinned for {src.file} on first "
                        f"use ({pinned[:16]}..., in {cache_dir(cache) / PINS_FILE}); delete that line there "
                        f"to pin another")
    return replace(src, pinned_sha256=digest)


def fetch(src: Source, cache: str | None, mirror: str | None, *, allow_http: bool = False,
          max_bytes: int | None = None, deadline: float | None = None) -> tuple[Path, str]:
    """Download (or find in the cache) and verify ``src``; returns its path and SHA-256.

    The file is checked against the first full SHA-256 known: ``src``'s pin (published or by
    hand), else the one pinned in the cache on first use, else its name's prefix, after which its
    full SHA-256 is pinned with a note. ``max_bytes`` caps a file of unknown size (a known one is
    capped at its size); ``allow_http`` and ``deadline`` go to ``download``."""
    dest = cache_dir(cache) / src.file
    pins = read_pins(cache)
    pinned = pins.get(src.file)
    pins_path = cache_dir(cache) / PINS_FILE
    if src.pinned_sha256:
        want, origin = src.pinned_sha256, ""
    elif pinned:
        want, origin = pinned, (f"pinned on first use in {pins_path}; if the publisher replaced the file, "
                                f"delete its line there")
    else:
        want, origin = src.name_sha256, f"only the {4 * len(src.name_sha256)}-bit prefix in its name is known"
    digest = download(mirror_url(src.url, mirror), dest, sha256=want, checksum_from=origin,
                      max_bytes=src.size or max_bytes, deadline=deadline, allow_http=allow_http)
    if pinned != digest:
        _write_pin(cache, src.file, digest)
        if len(want) < FULL_SHA256:
            print(f"note: pinned {src.file}'s SHA-256 in {pins_path} on first use: a different file under "
                  f"this name will be refused", file=sys.stderr)
    return dest, digest


# ---------------------------------------------------------------- conversion

# Key renames, source layout -> ((regex, replacement), ...), applied in order to every key.
# The first two are empty on purpose: models/ keeps torchvision's layer names for resnet, vgg,
# mobilenetv2 and wideresnet (ImageNet) and chenyaofo/pytorch-cifar-models' names for the CIFAR
# resnet, vgg*_bn and mobilenetv2, so that released weights load by key. tests/test_convert.py
# checks that claim for every published architecture; a model that renames a layer adds its row here.
# Every layout: the ``module.`` prefix of a DataParallel save is stripped by utils.load_checkpoint.
RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision": (),
    "chenyaofo": (),
    # akamaster's resnet.py -> resnet_a. conv1, bn1 and layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2} are
    # our names already; their shortcut (a LambdaLayer, or an empty nn.Sequential) and our
    # downsample (PadShortcut) hold no tensors, so there is no shortcut key to rename.
    "akamaster": (
        (r"^linear\.", "fc."),  # the classifier: their `linear`, torchvision's `fc`
    ),
}

# Files saved before PyTorch 0.4.1 (torchvision's vgg*_bn and akamaster's .th files among them)
# have no BatchNorm ``num_batches_tracked``; PyTorch itself fills it with 0 when loading them,
# and so do we.
FILL_MISSING = ("num_batches_tracked",)


def convert_state_dict(state_dict: dict, model: nn.Module, layout: str, src) -> dict:
    """``state_dict`` in ``layout`` (a key of RENAMES) renamed to ``model``'s keys, checked
    key by key and shape by shape (``UserError`` naming ``src`` otherwise)."""
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


def convert_file(path, model: nn.Module, layout: str) -> dict:
    """The weights of the file at ``path`` (read safely, ``module.`` prefixes stripped) in ``model``."""
    return convert_state_dict(load_checkpoint(path)["model"], model, layout, path)


def build(args) -> nn.Module:
    """The model the CLI flags (``dataset``, ``arch``, ``layers``, ``width_mult``, ``bn``) describe."""
    try:
        return build_model(args.arch, args.dataset, args.layers, args.width_mult, args.bn)
    except ModelError as e:
        raise UserError(str(e)) from None


def output_path(out: str | None, spec: dict) -> Path:
    """Where the converted checkpoint goes: ``-o`` with a folder as given, a bare ``-o NAME``
    inside the run's checkpoint folder (as ``main.py --ckpt NAME`` looks it up), else ckpt_best.pth."""
    ckpt_dir = ckpt_dir_of(spec)
    if not out:
        return ckpt_dir / "ckpt_best.pth"
    p = Path(out)
    return p if p.is_absolute() or len(p.parts) > 1 else ckpt_dir / p


def save_converted(model: nn.Module, spec: dict, out: Path, best_acc1: float, source: dict) -> None:
    save_checkpoint({"model": model.state_dict(), "arch": spec, "epoch": 0, "best_acc1": float(best_acc1),
                     "args": {}, "source": source}, out)


# ---------------------------------------------------------------- what is already there


def _existing_source(out: Path) -> dict | None:
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
