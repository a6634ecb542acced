"""The folder a training run writes into (docs/usage.md, "Run folders"): one run at a time (a lock),
never over another run's checkpoints by surprise, with room to write, and an id for every run.

    python main.py digits -a resnet --layers 20 --epochs 8            # checkpoint/resnet20/digits
    python main.py digits -a resnet --layers 20 --epochs 8            # refused: a run is there
    python main.py digits -a resnet --layers 20 --epochs 8 --overwrite  # from scratch over it
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from pathlib import Path

import torch

from mess.checkpoint import check_output_folder, clean_stale_tmp, state_bytes
from mess.names import best_file, epoch_file
from utils import Dist, UserError

LOCK_NAME = ".mess-run.lock"
CSV_ROOM = 1 << 20  # a summary/eval CSV's rows, generously


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxx``: sortable, readable in a CSV, unique among runs started in one second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one checkpoint of ``model`` takes: its weights, the optimizer's momentum buffers and, in
    the retraining modes, the float tensors behind the reconstructed weights (three copies)."""
    return 3 * state_bytes(model)


def check_room(folder: Path, model: torch.nn.Module, evaluate: bool) -> None:
    """Before any data is read: ``folder`` writable, with room for an epoch's checkpoints (the epoch file,
    the best one, and a temporary copy while one is written) or, for -E, for eval.csv."""
    if evaluate:
        check_output_folder(folder, CSV_ROOM, "eval.csv")
    else:
        check_output_folder(folder, 3 * checkpoint_bytes(model) + CSV_ROOM, "this run's checkpoints")
    clean_stale_tmp(folder)  # what a killed run left behind


def earlier_run_files(folder: Path, prefix: str) -> list[Path]:
    """The checkpoints of ``prefix`` (its epoch files and best file) already in ``folder``."""
    epochs = sorted(folder.glob(epoch_file(prefix, "*")), key=_epoch_of)
    best = folder / best_file(prefix)
    return epochs + ([best] if best.is_file() else [])


def _epoch_of(p: Path) -> int:
    tail = p.name.rsplit("_epoch_", 1)[-1].split(".", 1)[0]
    return int(tail) if tail.isdigit() else -1


def refuse_or_clear(folder: Path, prefix: str, overwrite: bool, console) -> None:
    """A run from scratch (no -R) writes ``prefix``'s files: refuse when an earlier run's are there, or with
    --overwrite remove that run's epoch files now (its best file is replaced at the first epoch), so that
    the two runs' epochs never mix."""
    have = earlier_run_files(folder, prefix)
    if not have:
        return
    epochs = [p for p in have if "_epoch_" in p.name]
    if not overwrite:
        latest = f"-R --ckpt {epochs[-1].name}" if epochs else "-R --ckpt <an epoch file>"
        raise UserError(f"{folder} already holds a run's checkpoints ({_listing(have)}); resume it with "
                        f"{latest}, or give --overwrite to train from scratch over it")
    for p in epochs:
        p.unlink()
    if epochs:
        console.print(f"--overwrite: removed the {len(epochs)} epoch files of the earlier run in {folder}")


def _listing(files: list[Path]) -> str:
    names = [p.name for p in files]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]}, ..., {names[-1]}: {len(names)} files"


def on_main(fn, d: Dist) -> None:
    """``fn()`` on rank 0 (the one that writes), its ``UserError`` raised on every rank of a torchrun job,
    so that none waits for the others at the first collective."""
    error = None
    if d.is_main:
        try:
            fn()
        except UserError as e:
            error = str(e)
    if d.enabled:
        import torch.distributed as dist
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(error if d.is_main else f"rank 0 refused the run: {error}")


@contextlib.contextmanager
def folder_lock(folder: Path, run_id: str):
    """Hold ``folder`` for this run while it trains; a second run into the same folder is refused at once.
    An ``flock``: the system releases it when the process ends, however."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{folder} is in use by another run ({holder}); two runs never share a "
                            f"folder: wait for it, or give this one its own with --ckpt-dir DIR") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, run {run_id}")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock; the file stays (removing it would race a run that waits on it)
