"""The network a ``.mess`` file's tensors belong to (docs/packed-format.md, "The model"): every tensor the
file declares is checked against it, by name, shape and kind, before anything is decoded, so that the
decoded size is what that network needs and no more.

The library knows no architectures: the caller gives its ``model``, and/or a ``build`` that turns the
file's ``arch`` entry into ``(nn.Module, name)`` (the CLIs pass the suite's ``models``, utils.py).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch.overrides import TorchFunctionMode

from .packed_format import ARCH_KEYS, LEARNED_PREFIX, fail


def _tensors_of(model) -> dict:
    """{key: (shape, integer)} of a caller's model: an ``nn.Module`` or a state_dict."""
    sd = model.state_dict() if isinstance(model, torch.nn.Module) else model
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TypeError("model must be an nn.Module or a state_dict of tensors")
    return {k: (tuple(v.shape), not v.is_floating_point()) for k, v in sd.items()}


class _NoFill(TorchFunctionMode):
    """Initialisers skipped on meta tensors: there are no values to fill, and ``normal_`` on one loads
    torch's Python meta kernels (~150 MB and 2 s, once per process)."""
    FILLS = {"normal_", "uniform_", "fill_", "zero_", "zeros_", "ones_", "constant_", "kaiming_normal_",
             "kaiming_uniform_", "xavier_normal_", "xavier_uniform_", "trunc_normal_", "orthogonal_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor as a keyword
        if getattr(func, "__name__", None) in self.FILLS and isinstance(t, torch.Tensor) and t.is_meta:
            return t
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=16)
def _built(build, arch: tuple) -> tuple[Mapping, str]:
    """(tensors, name) of the model an ``arch`` entry describes, built by ``build`` on the meta device: no
    memory, no random numbers drawn. Raises whatever building raises."""
    with torch.device("meta"), _NoFill():
        m, label = build(dict(zip(ARCH_KEYS, arch)))
    return MappingProxyType(_tensors_of(m)), label


def _declared(arch: dict, build, name, required: bool) -> tuple[Mapping, str] | None:
    """(tensors, name) of the file's ``arch``; None when it cannot be built and the caller's model
    (``required`` False) is the one the tensors are checked against."""
    try:
        return _built(build, tuple(arch[k] for k in ARCH_KEYS))
    except Exception as e:  # an unknown name, depth or dataset, an absurd width: models raises many kinds
        if not required:
            return None
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        fail(name, f"it declares the architecture {arch['arch']!r:.40} (layers {arch['layers']}, width "
                   f"{arch['width_mult']:g}, {arch['dataset']!r:.40}), which this MESS cannot build: {why}")


def _check_model(tensors: list, ref: Mapping, what: str, name) -> None:
    """Every tensor of the file is one of ``ref``'s, of its shape and kind, and none is missing: the
    file decodes to that network and no other, so its decoded size is what that network needs."""
    for t in tensors:
        key, shape, enc = t[0], t[1], t[2]
        if key.startswith(LEARNED_PREFIX):
            continue  # a path's learned bank: no state_dict key, its size bounded by _check_path
        want = ref.get(key)
        if want is None:
            fail(name, f"{key!r:.80} is no tensor of {what}")
        if tuple(shape) != want[0]:
            fail(name, f"{key} has shape {list(shape)}, but {what} has {list(want[0])}")
        if (enc == "i64") != want[1]:
            fail(name, f"{key} is stored as {enc!r}, but is {'an integer' if want[1] else 'a float'} "
                       f"tensor in {what}")
    present = {t[0] for t in tensors}
    missing = [k for k in ref if k not in present]
    if missing:
        fail(name, f"it lacks {len(missing)} tensor(s) of {what} (e.g. {missing[0]})")


def check_against_model(meta: dict, model, build, name) -> None:
    """The tensor list against the caller's model and the network ``build`` makes of the file's ``arch``."""
    own = None if model is None else _tensors_of(model)
    declared = None
    if meta.get("arch") is not None and build is not None:
        declared = _declared(meta["arch"], build, name, own is None)
    if own is not None and declared is not None and dict(declared[0]) != own:
        diff = next(k for k in {**own, **declared[0]} if own.get(k) != declared[0].get(k))
        fail(name, f"it declares a {declared[1]}, not the model it is read into (they differ in {diff})")
    if own is not None:
        _check_model(meta["tensors"], own, "the model it is read into", name)
    elif declared is not None:
        _check_model(meta["tensors"], declared[0], f"the {declared[1]} it declares", name)
