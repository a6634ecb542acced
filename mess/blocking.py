"""How a search splits its work: blocks of targets bounded in memory, and threads on CPU.

On CPU the small row-wise ops run single-threaded, each thread taking whole blocks: intra-op
threads would meet at a barrier after every small op, which stalls whenever the cores are
shared (10-30x seen).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

BUDGET_BYTES = 256 * 2**20  # bound on the search's per-block temporaries, whatever the model
CPU_BLOCK_PAIRS = 2**18  # (target, bank row) pairs per block and thread on CPU: 1 MB temporaries, in cache
ROW_CHUNK = 2**16  # rows per task of the row-wise work on CPU


@contextmanager
def single_threaded_ops():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def block_size(n_bank: int, device: torch.device, budget_bytes: int = BUDGET_BYTES, *,
               fused: bool = False) -> int:
    """Targets per block: about four (block, N) float32 temporaries live at once. The fused
    kernel keeps no (block, N) temporary, only a residual and an index per target: its blocks
    are as large as the budget allows that, so that per-call overheads vanish."""
    if fused:
        return max(1, budget_bytes // 16)
    pairs = budget_bytes // 16
    if device.type == "cpu":
        pairs = min(pairs, CPU_BLOCK_PAIRS)
    return max(1, pairs // n_bank)


def by_rows(fn: Callable, workers: int, *xs: torch.Tensor):
    """``fn(*xs)`` for a row-wise ``fn``, by chunks of ROW_CHUNK rows on ``workers`` threads on CPU
    (each op single-threaded: call it under ``single_threaded_ops``). The same rows come out
    whatever the chunks: torch reduces each row alike, however many there are."""
    m = xs[0].shape[0]
    if workers <= 1 or m <= ROW_CHUNK or xs[0].device.type != "cpu":
        return fn(*xs)
    starts = range(0, m, ROW_CHUNK)
    with ThreadPoolExecutor(min(workers, len(starts))) as pool:
        parts = list(pool.map(lambda s: fn(*(x[s:s + ROW_CHUNK] for x in xs)), starts))
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))
