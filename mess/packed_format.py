"""The packed ``.mess`` format: constants and what each stored tensor is made of (docs/packed-format.md).

One safetensors file, no pickle: two 1-D tensors, ``f32`` (every float32 value, scales included)
and ``bits`` (every integer code, bit-packed back to back, LSB first), and JSON metadata that
says what each state_dict tensor is made of. Indices take ``ceil(log2 N)`` bits, quantized
values ``b`` bits (the signed code plus ``2^(b-1)``) and one float32 scale per tensor. Writer
(``mess/packed_write.py``) and reader (``mess/packed_read.py``) both follow ``parts``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UserError
from .settings import index_bits

FORMAT = "mess-packed"
FORMAT_VERSION = 1
SUFFIX = ".mess"
# safetensors JSON header; ours is a few KiB per hundred tensors (ResNet-152: 42 KiB). Parsing JSON takes
# up to ~22 bytes of Python objects per byte: 1 MiB bounds that to ~25 MB
MAX_HEADER = 2**20
# Decoded tensors (state_dict and bank vectors) per file byte: a format limit. The tests' files need 7-31;
# a vector of L floats from 2 bits (v2nb, --qba 2, a bank of one) needs 16 L, so L = -pwd up to 256.
MAX_EXPANSION = 4096
MAX_NDIM = 8
INFO_KEYS = ("epoch", "best_acc1", "n_retrain")  # plain numbers of the checkpoint kept in the metadata
ARCH_KEYS = {"arch": str, "layers": int, "width_mult": (int, float), "bn": bool, "dataset": str,
             "num_classes": int}  # docs/design.md §4


LEARNED_PREFIX = "mess:learned:"  # the tensor entry of a path's learned bank (never a state_dict key)


def learned_key(kind: str) -> str:
    return f"{LEARNED_PREFIX}{kind}"


def fail(name, why: str):
    raise UserError(f"cannot read {name}: {why}")


@dataclass(frozen=True)
class PathInfo:
    """One MESS path as the file describes it, with the sizes derived from the bank's shape."""
    kind: str  # kernel | pointwise
    bank: str  # module name
    bind: int
    transforms: int
    vector_length: int
    bank_size: int

    @property
    def index_bits(self) -> int:
        return index_bits(self.bank_size)


def vectors_of(shape, kind: str, bind: int) -> tuple[int, int, int]:
    """(vectors, vector length, remainder values) of a covered weight of ``shape`` (docs/design.md §2)."""
    numel = math.prod(shape)
    if kind == "kernel":
        return numel // (9 * bind), 9 * bind, numel % (9 * bind)
    rows = shape[0]
    cols = numel // rows
    return rows * (cols // bind), bind, rows * (cols % bind)


def bank_of(shape, kind: str, bind: int, transforms: int) -> tuple[int, int] | None:
    """(bank size N, vector length L) of a bank weight of ``shape``, as ``bank_vectors`` builds them;
    None when it holds no whole vector."""
    numel = math.prod(shape)
    if len(shape) < 2 or numel == 0:
        return None
    if kind == "kernel":
        if numel % (9 * bind):
            return None
        return numel // (9 * bind) * transforms, 9 if transforms > 1 else 9 * bind
    cols = numel // shape[0]
    return (shape[0] * (cols - bind + 1), bind) if cols >= bind else None


def parts(enc: str, shape, bits, path: PathInfo | None, mess: dict | None):
    """The parts a tensor is stored as, in file order: ``(part, stream, count, width)`` with stream
    ``f`` (float32 values) or ``b`` (``width``-bit codes). Writer and reader both follow this list."""
    numel = math.prod(shape)
    if enc == "f32":
        return [("values", "f", numel, 32)]
    if enc == "pal":  # mess is the palette's metadata here: {"method", "bits", "granularity"}
        k = 2 ** bits
        if mess["method"] == "vq":
            return [("lut", "b", 9 * k, 16), ("idx", "b", numel // 9, bits)]
        luts = shape[0] if mess["granularity"] == "channel" else 1
        return [("lut", "b", luts * k, 16), ("idx", "b", numel, bits)]
    if enc == "i64":
        return []  # integer buffers live in the JSON metadata (BN's num_batches_tracked)
    if enc == "q":
        return [("codes_scale", "f", 1, 32), ("codes", "b", numel, bits)]
    n, _, rest = vectors_of(shape, enc, path.bind)
    out = [("k", "b", n, path.index_bits)]
    for part, key in (("alpha", "alpha_bits"), ("beta", "beta_bits")):
        if part == "beta" and not mess["beta"]:
            continue
        b = mess[key]
        out += [(f"{part}_scale", "f", 1, 32), (part, "b", n, b)] if b else [(part, "f", n, 32)]
    if rest:
        out.append(("rest", "f", rest, 32))
    return out
