"""Checkpoint files: atomic writes, safe loads, unwrapped state_dicts (docs/design.md §4)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the ``module.`` / ``_orig_mod.`` prefixes wrappers add to keys."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj: dict, path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path) -> dict:
    """Load a checkpoint safely (``weights_only=True``) onto the CPU, or raise ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            # torch's own hint (reload with weights_only=False) is unsafe advice for a file from elsewhere
            first = "it holds Python objects besides tensors and is not loaded, for safety"
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    if isinstance(ckpt, dict) and "model" not in ckpt and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state_dict
    if isinstance(ckpt, dict) and "model" not in ckpt and isinstance(ckpt.get("state_dict"), dict):
        ckpt["model"] = ckpt.pop("state_dict")  # {"state_dict", "best_prec1"}: akamaster's .th files
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a model checkpoint (no 'model' state_dict)")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def load_state_dict_checked(model: nn.Module, state_dict: dict, path) -> None:
    """Load weights, turning a key or shape mismatch into a one-line ``UserError``."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad_shape = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or bad_shape:
        what = []
        if missing:
            what.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            what.append(f"{len(bad_shape)} shape mismatches (e.g. {k}: "
                        f"{tuple(state_dict[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"{path} does not fit this model: {'; '.join(what)}")
    model.load_state_dict(state_dict)


def with_weights(ckpt: dict, state_dict: dict, **extra) -> dict:
    """The checkpoint ``ckpt`` with new weights (and ``extra`` entries): optimizer and scheduler states
    of the old weights are dropped (they would resume training of weights that no longer exist), and
    so are the old ``mess`` / ``quant`` entries and a retraining run's resume state."""
    stale = ("model", "optimizer", "scheduler", "mess", "quant", "palette", "retrain", "bn_calib")
    out = {k: v for k, v in ckpt.items() if k not in stale}
    out["model"] = state_dict
    out.update(extra)
    return out
