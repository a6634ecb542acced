"""-R: a run continues as it was (docs/usage.md, "Resuming a run").

Its own recorded flags apply unless the command line gives one again; every difference is named, and
one that would change the run is refused unless ``--change-flags`` says so. The checkpoint's resume
state is checked before anything uses it, and what a kill between two writes left behind is repaired
(the best checkpoint, the summary rows).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from config import FLAGS, given_flags
from mess.checkpoint import load_checkpoint, save_checkpoint
from mess.names import best_file, epoch_file
from utils import UserError, append_csv

# where and how the run computes, not what: free to differ on -R
FREE = frozenset({"workers", "print_freq", "cuda", "gpuids", "datapath", "pin_memory", "persistent_workers",
                  "channels_last", "ckpt", "resume", "evaluate", "change_flags", "overwrite",
                  "mongo_url", "mongo_db", "no_track"})
# taken from the run unless given; given, they are named but not refused: a longer run (the documented
# way to train on) and a moved folder
EXTEND = frozenset({"epochs", "ckpt_dir"})


def flag_name(dest: str) -> str:
    return FLAGS[dest][0][0] if dest in FLAGS else f"--{dest.replace('_', '-')}"  # the original's spelling


def _show(dest: str, value) -> str:
    if isinstance(value, bool) or value is None:
        return flag_name(dest) if value else f"no {flag_name(dest)}"
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    return f"{flag_name(dest)} {value}" if dest != "dataset" else f"dataset {value}"


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def apply_recorded_flags(args, ckpt: dict, path, console) -> None:
    """``args`` becomes the resumed run's own flags, except those the command line gives (``given_flags``);
    a given flag that differs from the run's and would change it is a ``UserError`` unless
    ``--change-flags``."""
    recorded = ckpt.get("args")
    if not isinstance(recorded, dict):
        console.print(f"note: {Path(path).name} records no flags; resuming with this command line's")
        return
    given = given_flags(args)
    taken, changed = [], []
    for dest, theirs in recorded.items():
        if dest in FREE or not hasattr(args, dest):
            continue
        ours = getattr(args, dest)
        if given is not None and dest not in given:
            if not _same(ours, theirs):
                setattr(args, dest, list(theirs) if isinstance(theirs, tuple) else theirs)
                taken.append(_show(dest, theirs))
        elif not _same(ours, theirs):
            changed.append(dest)
    if taken:
        console.print(f"-R: the run's own flags, not given here: {', '.join(taken)}")
    if not changed:
        return
    what = ", ".join(f"{_show(k, getattr(args, k))} (the run's: {_show(k, recorded[k])})" for k in changed)
    run_changing = [k for k in changed if k not in EXTEND]
    if run_changing and not getattr(args, "change_flags", False):
        raise UserError(f"{Path(path).name} was trained with other flags than this command gives: {what}; "
                        f"that would change the run: drop them to resume it as it was, or give "
                        f"--change-flags to resume with them")
    console.print(f"-R with flags that differ from the run's: {what}")


# ---------------------------------------------------------------- the resume state, checked
def check_resume_state(ckpt: dict, path) -> tuple[int, float]:
    """(epoch, best top-1) of a checkpoint that -R resumes, with its optimizer and RNG states checked for
    form: a damaged field is a one-line ``UserError`` before anything is read into the run."""
    name = Path(path).name
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"{name} has no optimizer state or epoch; it can be evaluated (-E) or retrained, "
                        f"not resumed")
    epoch = ckpt["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise UserError(f"{name} is damaged: its epoch {epoch!r} is not a whole number of epochs")
    best = ckpt.get("best_acc1", 0.0)
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
        raise UserError(f"{name} is damaged: its best top-1 {best!r} is not a number")
    opt = ckpt["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list) and opt["param_groups"]
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])):
        raise UserError(f"{name} is damaged: its optimizer state has no parameter groups")
    if "rng" in ckpt:
        problem = _rng_problem(ckpt["rng"])
        if problem:
            raise UserError(f"{name} is damaged: its random-number state {problem}")
    return epoch, float(best)


def _rng_problem(rng) -> str | None:
    if not isinstance(rng, dict):
        return "is not a table"
    t, size = rng.get("torch"), torch.get_rng_state().numel()
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.numel() == size):
        got = t.numel() if isinstance(t, torch.Tensor) else 0
        return f"of torch has {got} bytes, not {size}"
    n = rng.get("numpy")
    if not (isinstance(n, dict) and isinstance(n.get("keys"), torch.Tensor) and n["keys"].numel() == 624
            and isinstance(n.get("pos"), int) and 0 <= n["pos"] <= 624):
        return "of numpy is not a Mersenne Twister state"
    p = rng.get("python")
    if not (isinstance(p, dict) and isinstance(p.get("state"), torch.Tensor) and p["state"].numel() == 625):
        return "of Python's random is not a Mersenne Twister state"
    return None


def load_optimizer_state(optimizer, ckpt: dict, path) -> None:
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise UserError(f"{Path(path).name}'s optimizer state does not fit this run: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


# ---------------------------------------------------------------- after a kill between two writes
def repair(folder: Path, prefix: str, summary: Path, ckpt: dict, console) -> None:
    """-R of a run that was killed part-way through an epoch's writes: the rows its checkpoint holds but
    the summary lacks are appended, and a best checkpoint older than the run's best epoch is brought
    back from that epoch's file. main.save_epoch writes the best file first, so a run of this version
    needs this only after a crash of the disk; checkpoints of earlier versions may need it."""
    run_id = ckpt.get("run_id")
    history = ckpt.get("history")
    if isinstance(run_id, str) and isinstance(history, list):
        have = {(r.get("run_id"), r.get("epoch")) for r in _rows(summary)}
        missing = [r for r in history if isinstance(r, dict) and (run_id, str(r.get("epoch"))) not in have]
        if missing:
            append_csv(summary, missing)
            console.print(f"-R: appended {len(missing)} summary rows the interrupted run had not written "
                          f"(epochs {', '.join(str(r['epoch']) for r in missing)})")
    best_epoch = ckpt.get("best_epoch")
    if not isinstance(best_epoch, int) or isinstance(best_epoch, bool):
        return
    best_path = folder / best_file(prefix)
    theirs = _peek(best_path)
    if theirs is not None and theirs.get("run_id") == run_id and theirs.get("epoch") == best_epoch:
        return
    if best_epoch == ckpt.get("epoch"):
        source = ckpt
    else:
        source = _peek(folder / epoch_file(prefix, best_epoch))
        if source is None or source.get("run_id") != run_id or source.get("epoch") != best_epoch:
            console.print(f"note: {best_path.name} is not the best epoch ({best_epoch}) of this run and "
                          f"{epoch_file(prefix, best_epoch)} is gone; it is replaced when the run next "
                          f"improves on {ckpt.get('best_acc1', 0):.2f}%")
            return
    save_checkpoint(source, best_path)
    console.print(f"-R: {best_path.name} was stale; it is epoch {best_epoch} again, the run's best")


def _rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _peek(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path)
    except UserError:
        return None
