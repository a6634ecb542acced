"""Checkpoint files: atomic writes, safe loads, unwrapped state_dicts (docs/design.md §4)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


_TMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[A-Za-z0-9_]{8}\.tmp$")
_PIDLESS_STALE_S = 3600  # temporary files of versions before the pid was in the name


def clean_stale_tmp(folder, name: str | None = None) -> list[Path]:
    """Remove the temporary files of ``atomic_write`` (``.NAME.PID.xxxxxxxx.tmp``) left in ``folder`` by a
    process that is gone (SIGKILL, power loss), of target ``name`` or of any; returns those removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp"):
        m = _TMP.match(p.name)
        if not m or (name is not None and m["name"] != name):
            continue
        try:
            if m["pid"] is not None:
                if int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
                    continue
            elif time.time() - p.stat().st_mtime < _PIDLESS_STALE_S:
                continue
            p.unlink()
            removed.append(p)
        except OSError:  # gone meanwhile, or not ours to remove
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def atomic_write(path, write_fn):
    """Call ``write_fn(tmp_path)`` then rename onto ``path``: readers never see half a file. The file gets
    the mode the umask gives a new file (mkstemp's 0600 is for the temporary name only); stale temporary
    files of ``path`` from a killed process are removed first. Returns what ``write_fn`` returned."""
    return write_together([(path, write_fn)])[0]


def write_together(writes) -> list:
    """``atomic_write`` for files that belong together (a compressed checkpoint and its ``.mess``):
    ``writes`` is a list of ``(path, write_fn)``; each ``write_fn(tmp)`` writes its file under a temporary
    name, and only when all have succeeded are they renamed into place, so a failure leaves every old file
    as it was and no new one. Returns what each ``write_fn`` returned."""
    writes = [(Path(p), fn) for p, fn in writes]
    tmps, out, path = [], [], None
    try:
        for path, fn in writes:
            path.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_tmp(path.parent, path.name)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append(tmp)
            out.append(fn(tmp))
            os.chmod(tmp, 0o666 & ~_umask())
        for (path, _), tmp in zip(writes, tmps):
            os.replace(tmp, path)
    except OSError as e:  # disk full, quota, a folder made read-only meanwhile
        if len(writes) == 1:
            kept = f"{path.name} is as it was" if path.exists() else f"{path.name} was not written"
        else:
            kept = (f"none of {', '.join(p.name for p, _ in writes)} was written (files of those names "
                    f"already there are as they were)")
        raise UserError(f"cannot write {path}: {(e.strerror or str(e)).lower()}; {kept}") from None
    finally:
        for tmp in tmps:
            _unlink(tmp)  # those not renamed
    return out


def _unlink(p) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def check_output_folder(folder, need_bytes: int = 0, what: str = "the output") -> None:
    """Before the work starts: ``folder`` can be created and written, with ``need_bytes`` free in it;
    otherwise a one-line ``UserError`` (rather than a failure after an epoch, or a half-done job)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder for {what}, {folder}: {e.strerror or e}") from None
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; {what} cannot be written there")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write-probe.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write {what} in {folder}: {e.strerror or e}") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise UserError(f"not enough free space for {what} in {folder}: {_mb(free)} free, {_mb(need_bytes)} "
                        f"needed")


def state_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s weights and buffers as they are held."""
    tensors = [t for t in model.state_dict().values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def save_checkpoint(obj: dict, path) -> None:
    atomic_write(path, checkpoint_writer(obj))


def checkpoint_writer(obj: dict):
    """``write_fn`` of ``atomic_write`` for a checkpoint."""
    def write(tmp):
        # through a Python file: a full disk is then an OSError (ENOSPC), not torch's opaque
        # "unexpected pos" RuntimeError; fsync so that a power loss after the rename keeps the data
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    return write


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
