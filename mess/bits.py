"""Bit streams of the packed file: unsigned integers of any width back to back, LSB first."""
from __future__ import annotations

import numpy as np

CHUNK_BITS = 2**20  # bits (un)packed at a time: 8 MiB of uint64 temporaries at most


class BitWriter:
    """Unsigned integers of any width (0-63 bits) appended back to back, LSB first."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.pending = np.zeros(0, np.uint8)  # fewer than 8 bits not yet in a byte
        self.nbits = 0

    def write(self, values, width: int) -> None:
        values = np.asarray(values, dtype=np.uint64).reshape(-1)
        self.nbits += values.size * width
        if width == 0 or values.size == 0:
            return
        shifts = np.arange(width, dtype=np.uint64)
        step = max(1, CHUNK_BITS // width)
        for s in range(0, values.size, step):
            bits = ((values[s:s + step, None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(-1)
            bits = np.concatenate([self.pending, bits])
            full = bits.size // 8 * 8
            self.chunks.append(np.packbits(bits[:full], bitorder="little"))
            self.pending = bits[full:]

    def getvalue(self) -> np.ndarray:
        tail = [np.packbits(self.pending, bitorder="little")] if self.pending.size else []
        return np.concatenate(self.chunks + tail) if self.chunks or tail else np.zeros(0, np.uint8)


def read_bits(buf: np.ndarray, offset: int, count: int, width: int) -> np.ndarray:
    """``count`` unsigned ``width``-bit integers (uint64) from bit ``offset`` of the uint8 array ``buf``."""
    out = np.zeros(count, np.uint64)
    if width == 0 or count == 0:
        return out
    shifts = np.arange(width, dtype=np.uint64)
    step = max(1, CHUNK_BITS // width)
    for s in range(0, count, step):
        c = min(step, count - s)
        start = offset + s * width
        b0 = start >> 3
        bits = np.unpackbits(buf[b0:(start + c * width + 7) >> 3], bitorder="little")
        bits = bits[start - 8 * b0:start - 8 * b0 + c * width].reshape(c, width).astype(np.uint64)
        out[s:s + c] = (bits << shifts).sum(1, dtype=np.uint64)
    return out
