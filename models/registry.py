"""The model registry: architectures by name, their depths per input family, and the data sets.

Each family module registers its builder here (``@register_model``); ``models/__init__.py``
imports the families, so that importing ``models`` fills the registry.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn


class ModelError(ValueError):
    """A model that cannot be built from the given spec (user error)."""


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    depths: dict  # family -> tuple of supported depths, or () when depth is ignored
    uses_bn_flag: bool
    input_stats: tuple | None  # ((mean,) * 3, (std,) * 3) every input is normalised with, or None
    default_depth: dict  # family -> the depth --layers means when not given


_REGISTRY: dict[str, _Entry] = {}

# dataset -> (input family, number of classes). digits and tinyimagenet use CIFAR-style nets.
DATASET_FAMILY = {
    "cifar10": ("cifar", 10),
    "cifar100": ("cifar", 100),
    "digits": ("cifar", 10),
    "imagenet": ("imagenet", 1000),
    "tinyimagenet": ("cifar", 200),  # TinyImageNet-200: 64x64 inputs, CIFAR-style stems
}


LEGACY_LAYERS = 16  # the original's --layers default: what a depth-less architecture records


def register_model(name: str, depths: dict, uses_bn_flag: bool = False, input_stats: tuple | None = None,
                   default_depth: dict | None = None):
    """Decorator registering a builder under ``name``; duplicates are refused.

    ``input_stats``: the per-channel (mean, std) this architecture's inputs are always
    normalised with, in place of the data set's own (None: the data set's). ``default_depth``: per
    family, the depth built when --layers is not given (one of ``depths``)."""
    default_depth = default_depth or {}
    for family, d in default_depth.items():
        if d not in depths.get(family, ()):
            raise RuntimeError(f"model {name!r}: default depth {d} is not one of its {family} depths")
    def deco(fn):
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = _Entry(fn, depths, uses_bn_flag, input_stats, default_depth)
        return fn
    return deco


def default_depth(arch: str, dataset: str) -> int:
    """The depth ``arch`` builds for ``dataset`` when --layers is not given (resnet: 20 on CIFAR-style
    data, 18 on ImageNet); the original's 16 for a depth-less architecture, an unknown one or data set
    (whose build then fails with its own message)."""
    entry = _REGISTRY.get(arch)
    family = DATASET_FAMILY.get(dataset, (None,))[0]
    return entry.default_depth.get(family, LEGACY_LAYERS) if entry else LEGACY_LAYERS


def uses_bn_flag(arch: str) -> bool:
    return arch in _REGISTRY and _REGISTRY[arch].uses_bn_flag


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def supported_depths(arch: str, dataset: str) -> tuple:
    return _REGISTRY[arch].depths.get(dataset_family(dataset), ())


def has_variant(arch: str, dataset: str) -> bool:
    """Whether ``arch`` builds for ``dataset``'s input family (resnet_a is CIFAR-only)."""
    return dataset_family(dataset) in _REGISTRY[arch].depths


def input_stats(arch: str | None) -> tuple | None:
    """The (mean, std) ``arch`` declares for its inputs, or None where the data set's own apply."""
    entry = _REGISTRY.get(arch) if arch else None
    return entry.input_stats if entry else None


def dataset_family(dataset: str) -> str:
    if dataset not in DATASET_FAMILY:
        raise ModelError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASET_FAMILY)}")
    return DATASET_FAMILY[dataset][0]


def uses_depth(arch: str) -> bool:
    return any(_REGISTRY[arch].depths.values())


def model_name(arch: str, layers: int, width_mult: float = 1.0, bn: bool = False) -> str:
    """Canonical short name used for checkpoint folders: resnet56, vgg16_bn, mobilenet."""
    name = f"{arch}{layers}" if uses_depth(arch) else arch
    if bn and _REGISTRY[arch].uses_bn_flag:
        name += "_bn"
    if width_mult != 1.0:
        name += f"_w{width_mult:g}"
    return name


def build_model(arch: str, dataset: str, layers: int | None = None, width_mult: float = 1.0,
                bn: bool = False, num_classes: int | None = None) -> nn.Module:
    if layers is None:
        layers = default_depth(arch, dataset)
    if arch not in _REGISTRY:
        raise ModelError(f"unknown architecture {arch!r}; choose from {', '.join(list_models())}")
    family = dataset_family(dataset)
    if num_classes is None:
        num_classes = DATASET_FAMILY[dataset][1]
    entry = _REGISTRY[arch]
    if family not in entry.depths:
        raise ModelError(f"{arch} has no {family} variant")
    depths = entry.depths[family]
    if depths and layers not in depths:
        raise ModelError(f"{arch} has no depth {layers} for {dataset}; supported: "
                         f"{', '.join(map(str, depths))}")
    if not width_mult > 0:
        raise ModelError(f"--width-mult must be positive, got {width_mult}")
    return entry.builder(family=family, layers=layers, width_mult=width_mult, bn=bn,
                         num_classes=num_classes)


def scaled(channels: int, width_mult: float, divisor: int = 1) -> int:
    """Channels thinned by ``width_mult``; identity at 1.0 so published shapes hold."""
    if width_mult == 1.0:
        return channels
    return max(divisor, int(round(channels * width_mult / divisor)) * divisor)
