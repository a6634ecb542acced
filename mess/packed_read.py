"""Reading the packed ``.mess`` file, all of it validated before anything is allocated.

The format: docs/packed-format.md.

Checked in this order: the safetensors header (its length against the file, dtypes, shapes, offsets
that tile the data exactly), the CRC-32 of metadata and data (so a damaged file reads as damaged),
the format version, every tensor's name, shape and kind against the model (the caller's, and the one
the file's ``arch`` builds), every tensor's encoding against the metadata, the stream lengths against
what the metadata implies, the decoded size (what the model's tensors and the settings need, and at
most ``MAX_EXPANSION`` times the file); while decoding, every allocation against that size, every
scale (finite) and every index (below its bank size). Any failure is one ``UserError``.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bits import read_bits
from .entry import Entry, LayerCode, PathEntry
from .errors import UserError
from .packed_format import (
    ARCH_KEYS,
    FORMAT,
    FORMAT_VERSION,
    INFO_KEYS,
    LEARNED_PREFIX,
    MAX_EXPANSION,
    MAX_HEADER,
    MAX_NDIM,
    SUFFIX,
    PathInfo,
    bank_of,
    fail,
    learned_key,
    parts,
    vectors_of,
)
from .packed_model import check_against_model
from .settings import GRIDS, MAX_BANK, MAX_BITS, MIN_BITS, VERSION_SPECS, Version


# ---------------------------------------------------------------- plain-value checks
def _int(x, name, what, lo=0, hi=2**62):
    if type(x) is not int or not lo <= x <= hi:
        fail(name, f"bad {what}: {x!r:.60}")
    return x


def _bits(x, name, what, allow_none):
    if x is None and allow_none:
        return None
    return _int(x, name, what, MIN_BITS, MAX_BITS)


def _str(x, name, what):
    if not isinstance(x, str) or not 0 < len(x) <= 1000:
        fail(name, f"bad {what}: {x!r:.60}")
    return x


def _no_constant(x):
    raise ValueError(f"{x} is not JSON")  # json.loads would take NaN and Infinity


def _pair(x, n: int) -> bool:
    return isinstance(x, list) and len(x) == n


# ---------------------------------------------------------------- the container
def _safetensors_header(read, size: int, name) -> tuple[dict, int]:
    """The validated safetensors header of the file and where its data begins."""
    if size < 8:
        fail(name, f"{size} bytes is too short for a {SUFFIX} file (truncated?)")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > size - 8:
        fail(name, f"its header claims {n:,} bytes, but the file has {size:,} (truncated, or not a "
                   f"{SUFFIX} file)")
    if n > MAX_HEADER:
        fail(name, f"its header claims {n:,} bytes, more than the {MAX_HEADER:,} a {SUFFIX} header may take")
    try:
        header = json.loads(read(8, n).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        fail(name, f"its header is not valid JSON (corrupt, or not a {SUFFIX} file)")
    if not isinstance(header, dict) or set(header) != {"__metadata__", "f32", "bits"}:
        fail(name, f"not a {SUFFIX} file (a safetensors file, but not of MESS's packed format)"
             if isinstance(header, dict) else "its header is not a JSON object")
    data = size - 8 - n
    spans = []
    for key, dtype, itemsize in (("f32", "F32", 4), ("bits", "U8", 1)):
        t = header[key]
        if not isinstance(t, dict) or t.get("dtype") != dtype or not _pair(t.get("shape"), 1) \
                or not _pair(t.get("data_offsets"), 2):
            fail(name, f"tensor {key!r} must be a 1-D {dtype} tensor")
        length = _int(t["shape"][0], name, f"length of {key}")
        a, b = (_int(o, name, f"data offsets of {key}") for o in t["data_offsets"])
        if b - a != length * itemsize:
            fail(name, f"tensor {key!r}: data offsets {a}-{b} do not hold {length} values")
        spans.append((a, b))
    spans.sort()
    if spans[0][0] != 0 or spans[0][1] != spans[1][0] or spans[1][1] != data:
        fail(name, f"its tensors take {spans[1][1]:,} bytes, but {data:,} follow the header (truncated or "
                   f"corrupt)")
    md = header["__metadata__"]
    if not isinstance(md, dict) or not all(isinstance(md.get(k), str) for k in ("mess", "crc32")):
        fail(name, "its metadata has no MESS description")
    return header, 8 + n


# ---------------------------------------------------------------- the metadata
@dataclass
class _Plan:
    """Everything the metadata says, validated, with every part's place in the streams."""
    meta: dict
    mess: dict | None
    paths: dict  # kind -> PathInfo
    items: list  # (key, shape, enc, bits_or_ints, path, [(part, stream, offset, count, width)])
    n_floats: int
    n_bits: int
    decoded_bytes: int


def _check_meta(meta_json: str, name) -> dict:
    """The metadata's format, version, architecture, info and tensor list."""
    try:
        meta = json.loads(meta_json, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        fail(name, "its MESS metadata is not valid JSON")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fail(name, f"not a {SUFFIX} file (its metadata names no {FORMAT!r} format)")
    fv = meta.get("format_version")
    if fv != FORMAT_VERSION:
        fail(name, f"format version {fv!r:.20}; this MESS reads version {FORMAT_VERSION} (written by a "
                   f"newer MESS?)")
    arch = meta.get("arch")
    if arch is not None:
        if not isinstance(arch, dict) or any(not isinstance(arch.get(k), t) for k, t in ARCH_KEYS.items()) \
                or any(isinstance(arch[k], bool) for k in ("layers", "width_mult", "num_classes")):
            fail(name, "bad architecture entry")
    info = meta.get("info", {})
    if not isinstance(info, dict) or any(k not in INFO_KEYS or type(v) not in (int, float)
                                         for k, v in info.items()):
        fail(name, "bad checkpoint info entry")
    if not isinstance(meta.get("tensors"), list):
        fail(name, "its metadata has no tensor list")
    quant = meta.get("quant")
    if quant is not None and (meta.get("mess") is not None or not isinstance(quant, dict)):
        fail(name, "bad quantization entry")
    if quant is not None:
        _bits(quant.get("bits"), name, "quantization bits", False)
    pal = meta.get("palette")
    if pal is not None:
        if not isinstance(pal, dict) or meta.get("mess") is not None or quant is not None \
                or pal.get("method") not in ("kmeans", "vq") or type(pal.get("bits")) is not int \
                or not 1 <= pal["bits"] <= 8 \
                or pal.get("granularity") not in (
                    ("tensor", "channel") if pal["method"] == "kmeans" else (None,)):
            fail(name, "bad palette entry")
    return meta


def _check_entry(mess, name) -> Version:
    """The MESS entry's version, bits, eps, fc and args; returns the version."""
    if not isinstance(mess, dict) or not isinstance(mess.get("version"), str) \
            or mess["version"] not in VERSION_SPECS:
        version = mess.get("version") if isinstance(mess, dict) else mess
        fail(name, f"unknown MESS version {version!r:.40}")
    spec = VERSION_SPECS[mess["version"]]
    for key, used in (("weight_bits", spec.quant_weights), ("alpha_bits", spec.quant_ab),
                      ("beta_bits", spec.quant_ab and spec.beta)):
        _bits(mess.get(key), name, key.replace("_", " "), not used)
        if not used and mess.get(key) is not None:
            fail(name, f"{mess['version']} stores no {key.replace('_', ' ')}")
    eps = mess.get("eps")
    if not (eps is None or (type(eps) is float and math.isfinite(eps))) or type(mess.get("fc")) is not bool:
        fail(name, "bad eps or fc entry")
    if not isinstance(mess.get("args"), dict):
        fail(name, "bad args entry")
    if mess.get("grid", "minmax") not in GRIDS:
        fail(name, "bad grid entry")
    if not (mess.get("kernel") or mess.get("pointwise")):
        fail(name, "a MESS entry without any path")
    return spec


def _check_tensors(tensors: list, name) -> dict:
    """First pass over the tensor list: names, shapes and encodings; returns {key: shape}."""
    shapes = {}
    for t in tensors:
        if not isinstance(t, list) or len(t) not in (3, 4):
            fail(name, "bad tensor entry")
        key = _str(t[0], name, "tensor name")
        shape = t[1]
        if key in shapes or not isinstance(shape, list) or len(shape) > MAX_NDIM:
            fail(name, f"bad tensor entry {key!r:.60}")
        for d in shape:
            _int(d, name, f"shape of {key}")
        enc = t[2]
        if enc not in ("f32", "i64", "q", "pal", "kernel", "pointwise") or (len(t) == 4) != (
                enc in ("q", "i64", "pal")):
            fail(name, f"bad encoding of {key}")
        shapes[key] = shape
    return shapes


def _check_path(kind: str, p, mess: dict, spec: Version, meta: dict, shapes: dict, name) -> PathInfo:
    """One path of the entry against the version and the bank tensor's shape and encoding."""
    if not isinstance(p, dict):
        fail(name, f"bad {kind} path")
    bank = _str(p.get("bank"), name, f"{kind} bank")
    bind = _int(p.get("bind"), name, f"{kind} bind size", 1, 2**20)
    transforms = _int(p.get("transforms"), name, f"{kind} transforms", 1, 8)
    if kind == "kernel" and (transforms != spec.transforms or (bind > 1 and not spec.bind)
                             or (transforms > 1 and bind > 1)):
        fail(name, f"kernel path of bind {bind} and {transforms} transforms in {mess['version']}")
    if kind == "pointwise" and transforms != 1:
        fail(name, "pointwise path with transforms")
    wb = mess.get("weight_bits")
    want = ("q", wb) if wb else ("f32", None)
    entry = next((t for t in meta["tensors"] if t[0] == f"{bank}.weight"), None)
    if entry is None or (entry[2], entry[3] if len(entry) == 4 else None) != want:
        fail(name, f"the {kind} bank {bank} is missing or not stored as the version says")
    sizes = bank_of(shapes[f"{bank}.weight"], kind, bind, transforms)
    learned = p.get("learned")
    if learned is not None:
        if not (isinstance(learned, list) and len(learned) == 2):
            fail(name, f"bad learned bank of the {kind} path")
        rows = _int(learned[0], name, f"{kind} learned bank rows", 1, MAX_BANK)  # --bank-size
        width = _int(learned[1], name, f"{kind} learned bank width", 1, 2**20)
        if width != (sizes[1] if sizes else (9 * bind if kind == "kernel" else bind)):
            fail(name, f"the {kind} path's learned bank rows are {width} long, its vectors are not")
        lk = learned_key(kind)
        t = next((t for t in meta["tensors"] if t[0] == lk), None)
        if t is None or t[1] != [rows, width] or (t[2], t[3] if len(t) == 4 else None) != want:
            fail(name, f"the {kind} path's learned bank is missing or not stored as the version says")
        sizes = (rows * transforms, width)
    if sizes is None:
        fail(name, f"the {kind} bank {bank} of shape {shapes[f'{bank}.weight']} holds no whole "
                   f"vector of bind size {bind}")
    info = PathInfo(kind, bank, bind, transforms, sizes[1], sizes[0])
    for key, value in (("vector_length", info.vector_length), ("bank_size", info.bank_size),
                       ("index_bits", info.index_bits)):
        if p.get(key) != value:
            fail(name, f"{kind} path: {key} {p.get(key)!r:.20} but the bank holds {value}")
    return info


def _check_item(t: list, paths: dict, quant, name, palette=None) -> PathInfo | None:
    """One tensor's encoding against the entry; returns its path when it is a MESS target."""
    key, shape, enc = t[0], t[1], t[2]
    extra = t[3] if len(t) == 4 else None
    banks = {f"{p.bank}.weight" for p in paths.values()}
    banks |= {learned_key(k) for k in paths}
    if key.startswith(LEARNED_PREFIX) and key not in banks:
        fail(name, f"{key}: a learned bank of no path")
    if enc == "i64":
        if not isinstance(extra, list) or len(extra) != math.prod(shape) or any(
                type(x) is not int or not -2**63 <= x < 2**63 for x in extra):
            fail(name, f"bad integer values of {key}")
    elif enc == "q":
        _bits(extra, name, f"bits of {key}", False)
        if key not in banks and (quant is None or extra != quant["bits"]):
            fail(name, f"{key} is quantized, but no bank or quantization entry says so")
    elif enc == "pal":
        if palette is None or extra != palette["bits"] or not key.endswith(".weight") or len(shape) != 4 \
                or 0 in shape or (palette["method"] == "vq" and shape[2:] != [3, 3]):
            fail(name, f"{key} is palettized, but no palette entry says so or its shape {shape} cannot be")
    elif enc in ("kernel", "pointwise"):
        path = paths.get(enc)
        if path is None or not key.endswith(".weight") or key in banks or len(shape) < 2 or 0 in shape:
            fail(name, f"{key} is a {enc} target, but there is no such path or it cannot be one")
        if vectors_of(shape, enc, path.bind)[2] and enc == "kernel":
            fail(name, f"{key} of shape {shape} does not split into kernel vectors of {path.vector_length}")
        return path
    return None


def _decoded_bytes(enc: str, shape, placed) -> int:
    """Bytes the decoded results of one tensor take: the tensor (float32, or int64), and for a target its
    int64 indices and float32 alphas and betas, for a palette its int64 indices and float32 LUT."""
    out = (8 if enc == "i64" else 4) * math.prod(shape)
    per = {"k": 8, "idx": 8, "alpha": 4, "beta": 4, "lut": 4}
    return out + sum(per.get(part, 0) * count for part, _, _, count, _ in placed)


def _plan(meta_json: str, name, model=None, build=None) -> _Plan:
    meta = _check_meta(meta_json, name)
    mess, paths, spec = meta.get("mess"), {}, None
    if mess is not None:
        spec = _check_entry(mess, name)
    shapes = _check_tensors(meta["tensors"], name)
    check_against_model(meta, model, build, name)
    if mess is not None:
        for kind in ("kernel", "pointwise"):
            if mess.get(kind) is not None:
                paths[kind] = _check_path(kind, mess[kind], mess, spec, meta, shapes, name)
    # second pass: the parts, with offsets and the decoded size
    items, nf, nb = [], 0, 0
    decoded = sum(4 * p.bank_size * p.vector_length for p in paths.values())  # the bank vectors
    mspec = None if mess is None else {"beta": spec.beta, "alpha_bits": mess.get("alpha_bits"),
                                       "beta_bits": mess.get("beta_bits")}
    for t in meta["tensors"]:
        key, shape, enc = t[0], t[1], t[2]
        extra = t[3] if len(t) == 4 else None
        path = _check_item(t, paths, meta.get("quant"), name, meta.get("palette"))
        placed = []
        for part, stream, count, width in parts(enc, shape, extra, path,
                                                meta.get("palette") if enc == "pal" else mspec):
            placed.append((part, stream, nf if stream == "f" else nb, count, width))
            if stream == "f":
                nf += count
            else:
                nb += count * width
        decoded += _decoded_bytes(enc, shape, placed)
        items.append((key, tuple(shape), enc, extra, path, placed))
    for kind in paths:
        if not any(it[2] == kind for it in items):
            fail(name, f"the {kind} path has no target")
    return _Plan(meta, mess, paths, items, nf, nb, decoded)


# ---------------------------------------------------------------- decoding
def unpack(buf: bytes, name="<bytes>", *, model=None, build=None) -> dict:
    """A checkpoint dict from ``.mess`` bytes (see ``read_mess``)."""
    view = memoryview(buf)
    return _decode(lambda off, n: bytes(view[off:off + n]), len(buf), name, model, build)


def read_mess(path, *, model=None, build=None) -> dict:
    """A checkpoint dict (``model``, ``arch``, ``mess`` or ``quant``) from a ``.mess`` file, validated as
    this module's docstring says.

    ``model`` (an ``nn.Module``, or a state_dict) is the network the file is meant for: every tensor the
    file declares must be one of its tensors, of its shape, before anything is decoded. ``build``
    (``arch`` dict -> ``(nn.Module, name)``; the CLIs pass the suite's ``models``) builds the network the
    file's ``arch`` declares, on the meta device, to check the tensors against (and the caller's model
    against it). With neither, a file is bound only by ``MAX_EXPANSION``."""
    path = Path(path)
    with _reader(path) as (read, size):
        return _decode(read, size, path, model, build)


def read_arch(path) -> dict | None:
    """The architecture a ``.mess`` file declares (its ``arch`` entry, validated), or None: read from the
    header alone, so that a command can build the network before the weights are decoded against it."""
    path = Path(path)
    with _reader(path) as (read, size):
        header, _ = _safetensors_header(read, size, path)
    return _check_meta(header["__metadata__"]["mess"], path).get("arch")


@contextmanager
def _reader(path: Path):
    """``(read(offset, n), size)`` of an open file, or a ``UserError`` where there is none."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        def read(off, n):
            f.seek(off)
            return f.read(n)
        yield read, path.stat().st_size


class _Budget:
    """The decoded bytes the plan allows, spent before each allocation of the decoder: a decoder that
    strayed from the plan fails instead of allocating what the file does not describe."""

    def __init__(self, total: int, name):
        self.total, self.spent, self.name = total, 0, name

    def take(self, nbytes: int, what: str) -> None:
        if self.spent + nbytes > self.total:
            fail(self.name, f"decoding {what} would pass the {self.total:,} bytes its metadata allows")
        self.spent += nbytes


class _Streams:
    """The file's float and code streams, and how to read one part of a tensor from them."""

    def __init__(self, raw_f: bytes, raw_b: bytes, name):
        self.floats = torch.from_numpy(np.frombuffer(raw_f, dtype="<f4").astype(np.float32))
        self.codes = np.frombuffer(raw_b, dtype=np.uint8)
        self.name = name

    @staticmethod
    def count(placed, want) -> int:
        return next(p[3] for p in placed if p[0] == want)

    def values(self, placed, want):
        _, stream, off, count, width = next(p for p in placed if p[0] == want)
        if stream == "f":
            return self.floats[off:off + count]
        return read_bits(self.codes, off, count, width)

    def indices(self, placed, want) -> np.ndarray:
        return self.values(placed, want).view(np.int64)  # codes of at most 63 bits: the same values

    def dequant(self, placed, part, bits):
        slot = self.values(placed, f"{part}_scale")
        if not torch.isfinite(slot).all():
            fail(self.name, f"a non-finite scale ({part})")
        q = self.indices(placed, part)
        q -= 2 ** (bits - 1)
        return torch.from_numpy(q.astype(np.float32)).mul_(slot[0]), float(slot[0])  # as linear_quantize does


def _open(read, size: int, name, model, build) -> tuple[_Plan, _Streams, int]:
    """The validated plan and the streams of a file, checked against each other."""
    header, start = _safetensors_header(read, size, name)
    # the file's own bytes (no more than its size), checked first: corruption reads as corruption
    n_f32, n_u8 = header["f32"]["shape"][0], header["bits"]["shape"][0]
    raw_f = read(start + header["f32"]["data_offsets"][0], 4 * n_f32)
    raw_b = read(start + header["bits"]["data_offsets"][0], n_u8)
    if len(raw_f) != 4 * n_f32 or len(raw_b) != n_u8:
        fail(name, "the file ended early")
    crc = zlib.crc32(raw_b, zlib.crc32(raw_f, zlib.crc32(header["__metadata__"]["mess"].encode())))
    if f"{crc:08x}" != header["__metadata__"]["crc32"]:
        fail(name, "checksum mismatch (the file is corrupt)")
    plan = _plan(header["__metadata__"]["mess"], name, model, build)
    if n_f32 != plan.n_floats or n_u8 != (plan.n_bits + 7) // 8:
        fail(name, f"its data holds {n_f32:,} floats and {n_u8:,} code bytes, but its metadata describes "
                   f"{plan.n_floats:,} and {(plan.n_bits + 7) // 8:,} (truncated or corrupt)")
    if plan.decoded_bytes > MAX_EXPANSION * size:
        fail(name, f"it would decode to {plan.decoded_bytes:,} bytes, more than {MAX_EXPANSION} times its "
                   f"size")
    streams = _Streams(raw_f, raw_b, name)
    if plan.n_bits % 8 and streams.codes[-1] >> (plan.n_bits % 8):
        fail(name, "nonzero padding bits after the last code")
    return plan, streams, start


def _decode_target(key, shape, p: PathInfo, placed, bank: torch.Tensor, m: dict, s: _Streams, b: _Budget):
    """(weight, layer code) of one MESS target."""
    n = s.count(placed, "k")
    b.take(8 * n, f"the indices of {key}")
    k = s.indices(placed, "k")
    if k.size and int(k.max()) >= p.bank_size:
        fail(s.name, f"{key}: index {int(k.max())} outside the bank of {p.bank_size}")
    k = torch.from_numpy(k)
    ab, bb = m.get("alpha_bits"), m.get("beta_bits")
    b.take(4 * n, f"the alphas of {key}")
    alpha, sa = s.dequant(placed, "alpha", ab) if ab else (s.values(placed, "alpha").clone(), None)
    beta = sb = None
    if any(x[0] == "beta" for x in placed):
        b.take(4 * n, f"the betas of {key}")
        beta, sb = s.dequant(placed, "beta", bb) if bb else (s.values(placed, "beta").clone(), None)
    b.take(4 * math.prod(shape), key)
    # reconstruct()'s alpha * bank[k] + beta in place: products and sums commute bit for bit, and the
    # weight is one tensor instead of four (bank[k], the product, the sum, put_vectors' copy)
    vec = bank[k].mul_(alpha[:, None])
    if beta is not None:
        vec.add_(beta[:, None])
    if not any(x[0] == "rest" for x in placed):
        weight = vec.reshape(shape)
    else:  # put_vectors: the first whole windows of each row, then the remainder
        weight = torch.empty(shape)
        w = weight.view(shape[0], -1)
        cut = w.shape[1] // p.bind * p.bind
        w[:, :cut] = vec.reshape(shape[0], cut)
        w[:, cut:] = s.values(placed, "rest").reshape(shape[0], -1)
    return weight, LayerCode(k, alpha, beta, sa, sb, None)


def _decode_palette(key, shape, bits: int, placed, pal: dict, s: _Streams, b: _Budget):
    """(weight, PaletteLayer) of one palettized conv: float16 LUT values from their bit patterns."""
    from .palette import PaletteLayer
    b.take(4 * s.count(placed, "lut"), f"the palette of {key}")
    lut = torch.from_numpy(s.values(placed, "lut").astype(np.uint16).view(np.float16).astype(np.float32))
    if not torch.isfinite(lut).all():
        fail(s.name, "a non-finite palette value")
    b.take(8 * s.count(placed, "idx"), f"the indices of {key}")
    idx = torch.from_numpy(s.indices(placed, "idx"))
    k = 2 ** bits
    if pal["method"] == "vq":
        layer = PaletteLayer(idx, lut.reshape(k, 9))
    elif pal["granularity"] == "channel":
        layer = PaletteLayer(idx.reshape(shape), lut.reshape(shape[0], k))
    else:
        layer = PaletteLayer(idx.reshape(shape), lut)
    b.take(4 * math.prod(shape), key)
    return layer.decode(shape, pal["method"], pal["granularity"]), layer


def _decode(read, size: int, name, model=None, build=None) -> dict:
    plan, s, start = _open(read, size, name, model, build)
    b = _Budget(plan.decoded_bytes, name)
    sd, scales, targets, palette = {}, {}, [], {}
    for key, shape, enc, extra, path, placed in plan.items:
        if enc == "f32":
            b.take(4 * math.prod(shape), key)
            sd[key] = s.values(placed, "values").clone().reshape(shape)
            scales[key] = None
        elif enc == "i64":
            b.take(8 * math.prod(shape), key)
            sd[key] = torch.tensor(extra, dtype=torch.int64).reshape(shape)
        elif enc == "q":
            b.take(4 * math.prod(shape), key)
            w, scales[key] = s.dequant(placed, "codes", extra)
            sd[key] = w.reshape(shape)
        elif enc == "pal":
            sd[key], palette[key[:-len(".weight")]] = _decode_palette(key, shape, extra, placed,
                                                                      plan.meta["palette"], s, b)
        else:
            sd[key] = None  # rebuilt below, once every bank is decoded
            targets.append((key, shape, path, placed))
    ckpt = {"model": sd, **plan.meta.get("info", {})}
    if plan.meta.get("arch") is not None:
        ckpt["arch"] = plan.meta["arch"]
    if plan.mess is not None:
        m = plan.mess
        entry = Entry(m["version"], m.get("weight_bits"), m.get("alpha_bits"), m.get("beta_bits"),
                      m.get("eps"), m.get("fc"), args=m["args"], grid=m.get("grid", "minmax"))
        banks = {}
        for kind, p in plan.paths.items():
            path = PathEntry(kind, p.bank, p.bind, p.transforms, p.vector_length, p.bank_size,
                             scales.get(f"{p.bank}.weight"))
            lk = learned_key(kind)
            if lk in sd:
                path.learned, path.learned_scale = sd.pop(lk), scales.pop(lk)
            setattr(entry, kind, path)
            b.take(4 * p.bank_size * p.vector_length, f"the {kind} bank")
            banks[kind] = path.bank_vectors(sd)
        for key, shape, p, placed in targets:
            sd[key], code = _decode_target(key, shape, p, placed, banks[p.kind], m, s, b)
            getattr(entry, p.kind).layers[key[:-len(".weight")]] = code
        ckpt["mess"] = entry.to_dict()
    if plan.meta.get("quant") is not None:
        q = plan.meta["quant"]
        ckpt["quant"] = {"bits": q["bits"], "scales": {k[:-len(".weight")]: v for k, v in scales.items()
                                                        if v is not None}}
    if plan.meta.get("palette") is not None:
        p = plan.meta["palette"]
        ckpt["palette"] = {**p, "layers": {n: {"idx": x.idx, "lut": x.lut} for n, x in palette.items()}}
    ckpt["packed"] = {"bytes": size, "header_bytes": start, "floats": plan.n_floats, "code_bits": plan.n_bits,
                      "decoded_bytes": b.spent}
    return ckpt
