"""The packed ``.mess`` file: a network stored in the bits DESIGN.md section 5 counts, on disk.

    python find_similar_kernel.py cifar10 -a resnet --layers 56 -v v2qq --ckpt ckpt_best.pth  # + .mess
    python main.py cifar10 -a resnet --layers 56 -E --ckpt ckpt_best_v2qq_q888.mess
    python packed.py cifar10 -a resnet --layers 56 --ckpt ckpt_rt1_v2qq_q888_best.pth       # any checkpoint

One safetensors file, no pickle: two 1-D tensors, ``f32`` (every float32 value, scales included)
and ``bits`` (every integer code, bit-packed back to back, LSB first), and JSON metadata that
says what each state_dict tensor is made of. Indices take ``ceil(log2 N)`` bits, quantized
values ``b`` bits (the signed code plus ``2^(b-1)``) and one float32 scale per tensor. The
reader validates everything before it allocates: see ``read_mess`` and README.md.
"""
from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import OneLineParser, add_flags
from quantize import MAX_BITS, MIN_BITS
from utils import (
    UserError,
    atomic_write,
    build_model_from_args,
    check_arch,
    load_checkpoint,
    load_state_dict_checked,
    resolve_ckpt,
    run_cli,
)

FORMAT = "mess-packed"
FORMAT_VERSION = 1
SUFFIX = ".mess"
MAX_HEADER = 16 * 2**20  # safetensors JSON header; ours is a few KiB per hundred tensors
# Decoded tensors (state_dict and bank vectors) per file byte: a format limit. The tests' files need 7-31;
# a vector of L floats from 2 bits (v2nb, --qba 2, a bank of one) needs 16 L, so L = -pwd up to 256.
MAX_EXPANSION = 4096
MAX_NDIM = 8
CHUNK_BITS = 2**20  # bits (un)packed at a time: 8 MiB of uint64 temporaries at most
INFO_KEYS = ("epoch", "best_acc1", "n_retrain")  # plain numbers of the checkpoint kept in the metadata
ARCH_KEYS = {"arch": str, "layers": int, "width_mult": (int, float), "bn": bool, "dataset": str,
             "num_classes": int}  # DESIGN.md section 4


def _fail(name, why: str):
    raise UserError(f"cannot read {name}: {why}")


# ---------------------------------------------------------------- bit streams
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


# ---------------------------------------------------------------- what a tensor is made of
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
        return (self.bank_size - 1).bit_length()


def _vectors(shape, kind: str, bind: int) -> tuple[int, int, int]:
    """(vectors, vector length, remainder values) of a covered weight of ``shape`` (DESIGN.md section 2)."""
    numel = math.prod(shape)
    if kind == "kernel":
        return numel // (9 * bind), 9 * bind, numel % (9 * bind)
    rows = shape[0]
    cols = numel // rows
    return rows * (cols // bind), bind, rows * (cols % bind)


def _bank(shape, kind: str, bind: int, transforms: int) -> tuple[int, int] | None:
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


def _parts(enc: str, shape, bits, path: PathInfo | None, mess: dict | None):
    """The parts a tensor is stored as, in file order: ``(part, stream, count, width)`` with stream
    ``f`` (float32 values) or ``b`` (``width``-bit codes). Writer and reader both follow this list."""
    numel = math.prod(shape)
    if enc == "f32":
        return [("values", "f", numel, 32)]
    if enc == "i64":
        return []  # integer buffers live in the JSON metadata (BN's num_batches_tracked)
    if enc == "q":
        return [("codes_scale", "f", 1, 32), ("codes", "b", numel, bits)]
    n, _, rest = _vectors(shape, enc, path.bind)
    out = [("k", "b", n, path.index_bits)]
    for part, key in (("alpha", "alpha_bits"), ("beta", "beta_bits")):
        if part == "beta" and not mess["beta"]:
            continue
        b = mess[key]
        out += [(f"{part}_scale", "f", 1, 32), (part, "b", n, b)] if b else [(part, "f", n, 32)]
    if rest:
        out.append(("rest", "f", rest, 32))
    return out


# ---------------------------------------------------------------- writing
def _grid_codes(x: torch.Tensor, scale, bits: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale slot, unsigned codes) such that ``(code - 2^(b-1)) * slot == x`` exactly, as
    ``quantize.linear_quantize`` computed ``x``. A constant tensor (scale 0) stores its value as the
    slot, with codes for ``q = 1``."""
    x = x.detach().to("cpu", torch.float32).reshape(-1)
    half = 2 ** (bits - 1)
    if scale is None:
        raise UserError(f"cannot pack {what}: quantized to {bits} bits, but the checkpoint holds no scale")
    if float(scale) == 0.0:
        if x.numel() and not bool((x == x[0]).all()):
            raise UserError(f"cannot pack {what}: its scale is 0 but its values are not constant")
        slot = x[:1].clone() if x.numel() else torch.zeros(1)
        return slot.numpy(), np.full(x.numel(), half + 1, np.uint64)
    s = torch.tensor(float(scale), dtype=torch.float32)
    q = torch.round(x / s)
    if q.numel() and (q.min() < -half or q.max() > half - 1 or not torch.equal(q * s, x)):
        raise UserError(f"cannot pack {what}: its values are not on the {bits}-bit grid of scale "
                        f"{float(scale)!r}; the checkpoint does not hold what its entry says")
    return s.reshape(1).numpy(), (q.to(torch.int64) + half).numpy().astype(np.uint64)


def _plain(v):
    """JSON-safe copy of a flags dict value, or None when it is not plain data."""
    if isinstance(v, (str, bool, int)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)) and all(isinstance(x, (str, bool, int, float)) for x in v):
        return [x for x in v if not isinstance(x, float) or math.isfinite(x)]
    return None


def _meta_of(ckpt: dict) -> tuple[dict, dict]:
    """(metadata without the tensor list, {state_dict key: (enc, bits, scale, path, entry)})."""
    from find_similar_kernel import VERSION_SPECS

    sd, mess, quant = ckpt["model"], ckpt.get("mess"), ckpt.get("quant")
    arch = ckpt.get("arch")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "arch": {k: arch.get(k) for k in ARCH_KEYS} if isinstance(arch, dict) else None,
            "info": {k: ckpt[k] for k in INFO_KEYS if type(ckpt.get(k)) in (int, float)
                     and math.isfinite(ckpt[k])},
            "mess": None, "quant": None}
    how: dict[str, tuple] = {}
    if mess:
        if mess.get("version") not in VERSION_SPECS:
            raise UserError(f"cannot pack: unknown MESS version {mess.get('version')!r}")
        m = {k: mess.get(k) for k in ("version", "weight_bits", "alpha_bits", "beta_bits", "eps")}
        m["fc"] = bool(mess.get("fc", False))
        m["args"] = {k: _plain(v) for k, v in (mess.get("args") or {}).items() if isinstance(k, str)}
        beta = VERSION_SPECS[mess["version"]].beta
        for kind in ("kernel", "pointwise"):
            p = mess.get(kind)
            m[kind] = None
            if not p:
                continue
            key = f"{p['bank']}.weight"
            if key not in sd:
                raise UserError(f"cannot pack: the {kind} bank {p['bank']} has no weight in the state_dict")
            sizes = _bank(list(sd[key].shape), kind, int(p["bind"]), int(p["transforms"]))
            if sizes is None:
                raise UserError(f"cannot pack: the {kind} bank {p['bank']} holds no whole vector")
            info = PathInfo(kind, p["bank"], int(p["bind"]), int(p["transforms"]), sizes[1], sizes[0])
            m[kind] = {"bank": info.bank, "bind": info.bind, "transforms": info.transforms,
                       "vector_length": info.vector_length, "bank_size": info.bank_size,
                       "index_bits": info.index_bits}
            wb = mess.get("weight_bits")
            how[key] = ("q", wb, p.get("bank_scale"), None, None) if wb else ("f32", None, None, None, None)
            for t, e in p["layers"].items():
                if f"{t}.weight" not in sd or ("beta" in e) != beta:
                    raise UserError(f"cannot pack: target {t} of the {kind} path does not match the "
                                    f"state_dict or the version {mess['version']}")
                how[f"{t}.weight"] = (kind, None, None, info, e)
        meta["mess"] = m
    if quant:
        meta["quant"] = {"bits": int(quant["bits"])}
        for layer, scale in quant["scales"].items():
            how[f"{layer}.weight"] = ("q", int(quant["bits"]), scale, None, None)
    return meta, how


def pack(ckpt: dict) -> bytes:
    """The ``.mess`` bytes of a checkpoint (float, plain-quantized or MESS, DESIGN.md section 4)."""
    from safetensors.numpy import save

    from find_similar_kernel import VERSION_SPECS

    sd = ckpt.get("model")
    if not isinstance(sd, dict):
        raise UserError("cannot pack: the checkpoint has no 'model' state_dict")
    meta, how = _meta_of(ckpt)
    mess = meta["mess"]
    if mess:
        mess_spec = {"beta": VERSION_SPECS[mess["version"]].beta, "alpha_bits": mess["alpha_bits"],
                     "beta_bits": mess["beta_bits"]}
    floats, codes, tensors = [], BitWriter(), []
    for key, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"cannot pack {key}: not a tensor")
        v = v.detach().cpu()
        shape = list(v.shape)
        if v.dtype == torch.int64:
            tensors.append([key, shape, "i64", v.reshape(-1).tolist()])
            continue
        if v.dtype != torch.float32:
            raise UserError(f"cannot pack {key}: {v.dtype} (the packed format holds float32 weights and "
                            f"int64 buffers)")
        enc, bits, scale, path, entry = how.get(key, ("f32", None, None, None, None))
        tensors.append([key, shape, enc] + ([bits] if enc == "q" else []))
        if enc == "f32":
            floats.append(v.reshape(-1).numpy())
        elif enc == "q":
            slot, c = _grid_codes(v, scale, bits, key)
            floats.append(slot)
            codes.write(c, bits)
        else:
            _pack_target(key, v, enc, path, entry, mess_spec, floats, codes)
    meta["tensors"] = tensors
    f32 = np.concatenate(floats).astype("<f4") if floats else np.zeros(0, "<f4")
    bits = codes.getvalue()
    try:
        meta_json = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot pack: the checkpoint's metadata is not plain data ({e})") from None
    crc = zlib.crc32(bits.tobytes(), zlib.crc32(f32.tobytes(), zlib.crc32(meta_json.encode())))
    return save({"f32": f32, "bits": bits}, metadata={"mess": meta_json, "crc32": f"{crc:08x}"})


def _pack_target(key, v, kind, path: PathInfo, e: dict, mess: dict, floats: list, codes: BitWriter) -> None:
    n, _, rest = _vectors(list(v.shape), kind, path.bind)
    k = e["k"].detach().cpu()
    if k.dtype != torch.int64 or k.numel() != n or (n and (k.min() < 0 or k.max() >= path.bank_size)):
        raise UserError(f"cannot pack {key}: its k must be {n} int64 indices below the bank size "
                        f"{path.bank_size}")
    codes.write(k.numpy().astype(np.uint64), path.index_bits)
    for part, bkey in (("alpha", "alpha_bits"), ("beta", "beta_bits")):
        if part == "beta" and not mess["beta"]:
            continue
        x = e[part].detach().cpu()
        if x.dtype != torch.float32 or x.numel() != n:
            raise UserError(f"cannot pack {key}: its {part} must be {n} float32 values")
        if mess[bkey]:
            slot, c = _grid_codes(x, e.get(f"{part}_scale"), mess[bkey], f"{key} {part}")
            floats.append(slot)
            codes.write(c, mess[bkey])
        else:
            floats.append(x.reshape(-1).numpy())
    if rest:
        w = v.reshape(v.shape[0], -1)
        floats.append(w[:, w.shape[1] // path.bind * path.bind:].reshape(-1).numpy())


def write_mess(path, ckpt: dict) -> int:
    """Write ``ckpt`` as a ``.mess`` file (atomically); returns its size in bytes.

    The bytes are read back before the file is written and every tensor must come back equal
    to the checkpoint's: a MESS checkpoint whose weights are not ``alpha * bank[k] + beta``
    (DESIGN.md section 4) is refused with a ``UserError`` rather than packed into another network.
    """
    buf = pack(ckpt)
    back = unpack(buf, Path(path).name)["model"]
    for key, v in ckpt["model"].items():
        if not _same(back[key], v.detach().cpu()):
            raise UserError(f"cannot pack {key}: it differs from what its MESS entry rebuilds "
                            f"(alpha * bank[k] + beta); the checkpoint breaks DESIGN.md section 4")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buf)
    atomic_write(path, write)
    return len(buf)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values (NaN equal to itself; -0.0 equal to 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


# ---------------------------------------------------------------- reading: validation
def _int(x, name, what, lo=0, hi=2**62):
    if type(x) is not int or not lo <= x <= hi:
        _fail(name, f"bad {what}: {x!r:.60}")
    return x


def _bits(x, name, what, allow_none):
    if x is None and allow_none:
        return None
    return _int(x, name, what, MIN_BITS, MAX_BITS)


def _str(x, name, what):
    if not isinstance(x, str) or not 0 < len(x) <= 1000:
        _fail(name, f"bad {what}: {x!r:.60}")
    return x


def _no_constant(x):
    raise ValueError(f"{x} is not JSON")  # json.loads would take NaN and Infinity


def _pair(x, n: int) -> bool:
    return isinstance(x, list) and len(x) == n


def _safetensors_header(read, size: int, name) -> tuple[dict, int]:
    """The validated safetensors header of the file and where its data begins."""
    if size < 8:
        _fail(name, f"{size} bytes is too short for a {SUFFIX} file (truncated?)")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > min(MAX_HEADER, size - 8):
        _fail(name, f"its header claims {n:,} bytes, but the file has {size:,} (truncated, or not a "
                    f"{SUFFIX} file)")
    try:
        header = json.loads(read(8, n).decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        _fail(name, f"its header is not valid JSON (corrupt, or not a {SUFFIX} file)")
    if not isinstance(header, dict) or set(header) != {"__metadata__", "f32", "bits"}:
        _fail(name, f"not a {SUFFIX} file (a safetensors file, but not of MESS's packed format)"
              if isinstance(header, dict) else "its header is not a JSON object")
    data = size - 8 - n
    spans = []
    for key, dtype, itemsize in (("f32", "F32", 4), ("bits", "U8", 1)):
        t = header[key]
        if not isinstance(t, dict) or t.get("dtype") != dtype or not _pair(t.get("shape"), 1) \
                or not _pair(t.get("data_offsets"), 2):
            _fail(name, f"tensor {key!r} must be a 1-D {dtype} tensor")
        length = _int(t["shape"][0], name, f"length of {key}")
        a, b = (_int(o, name, f"data offsets of {key}") for o in t["data_offsets"])
        if b - a != length * itemsize:
            _fail(name, f"tensor {key!r}: data offsets {a}-{b} do not hold {length} values")
        spans.append((a, b))
    spans.sort()
    if spans[0][0] != 0 or spans[0][1] != spans[1][0] or spans[1][1] != data:
        _fail(name, f"its tensors take {spans[1][1]:,} bytes, but {data:,} follow the header (truncated or "
                    f"corrupt)")
    md = header["__metadata__"]
    if not isinstance(md, dict) or not all(isinstance(md.get(k), str) for k in ("mess", "crc32")):
        _fail(name, "its metadata has no MESS description")
    return header, 8 + n


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


def _plan(meta_json: str, name) -> _Plan:
    from find_similar_kernel import VERSION_SPECS
    try:
        meta = json.loads(meta_json, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        _fail(name, "its MESS metadata is not valid JSON")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        _fail(name, f"not a {SUFFIX} file (its metadata names no {FORMAT!r} format)")
    fv = meta.get("format_version")
    if fv != FORMAT_VERSION:
        _fail(name, f"format version {fv!r:.20}; this MESS reads version {FORMAT_VERSION} (written by a "
                    f"newer MESS?)")
    arch = meta.get("arch")
    if arch is not None:
        if not isinstance(arch, dict) or any(not isinstance(arch.get(k), t) for k, t in ARCH_KEYS.items()) \
                or any(isinstance(arch[k], bool) for k in ("layers", "width_mult", "num_classes")):
            _fail(name, "bad architecture entry")
    info = meta.get("info", {})
    if not isinstance(info, dict) or any(k not in INFO_KEYS or type(v) not in (int, float)
                                         for k, v in info.items()):
        _fail(name, "bad checkpoint info entry")
    tensors = meta.get("tensors")
    if not isinstance(tensors, list):
        _fail(name, "its metadata has no tensor list")

    mess, paths, spec = meta.get("mess"), {}, None
    if mess is not None:
        if not isinstance(mess, dict) or not isinstance(mess.get("version"), str) \
                or mess["version"] not in VERSION_SPECS:
            version = mess.get("version") if isinstance(mess, dict) else mess
            _fail(name, f"unknown MESS version {version!r:.40}")
        spec = VERSION_SPECS[mess["version"]]
        _bits(mess.get("weight_bits"), name, "weight bits", not spec.quant_weights)
        _bits(mess.get("alpha_bits"), name, "alpha bits", not spec.quant_ab)
        _bits(mess.get("beta_bits"), name, "beta bits", not (spec.quant_ab and spec.beta))
        for key, ok in (("weight_bits", spec.quant_weights), ("alpha_bits", spec.quant_ab),
                        ("beta_bits", spec.quant_ab and spec.beta)):
            if not ok and mess.get(key) is not None:
                _fail(name, f"{mess['version']} stores no {key.replace('_', ' ')}")
        eps = mess.get("eps")
        if not (eps is None or (type(eps) is float and math.isfinite(eps))) \
                or type(mess.get("fc")) is not bool:
            _fail(name, "bad eps or fc entry")
        if not isinstance(mess.get("args"), dict):
            _fail(name, "bad args entry")
        if not (mess.get("kernel") or mess.get("pointwise")):
            _fail(name, "a MESS entry without any path")
    quant = meta.get("quant")
    if quant is not None and (mess is not None or not isinstance(quant, dict)):
        _fail(name, "bad quantization entry")
    if quant is not None:
        _bits(quant.get("bits"), name, "quantization bits", False)

    # first pass: names, shapes and encodings
    seen, shapes = {}, {}
    for t in tensors:
        if not isinstance(t, list) or len(t) not in (3, 4):
            _fail(name, "bad tensor entry")
        key = _str(t[0], name, "tensor name")
        shape = t[1]
        if key in seen or not isinstance(shape, list) or len(shape) > MAX_NDIM:
            _fail(name, f"bad tensor entry {key!r:.60}")
        for d in shape:
            _int(d, name, f"shape of {key}")
        enc = t[2]
        if enc not in ("f32", "i64", "q", "kernel", "pointwise") or (len(t) == 4) != (enc in ("q", "i64")):
            _fail(name, f"bad encoding of {key}")
        seen[key], shapes[key] = enc, shape

    if mess is not None:
        for kind in ("kernel", "pointwise"):
            p = mess.get(kind)
            if p is None:
                continue
            if not isinstance(p, dict):
                _fail(name, f"bad {kind} path")
            bank = _str(p.get("bank"), name, f"{kind} bank")
            bind = _int(p.get("bind"), name, f"{kind} bind size", 1, 2**20)
            transforms = _int(p.get("transforms"), name, f"{kind} transforms", 1, 8)
            if kind == "kernel" and (transforms != spec.transforms or (bind > 1 and not spec.bind)
                                     or (transforms > 1 and bind > 1)):
                _fail(name, f"kernel path of bind {bind} and {transforms} transforms in {mess['version']}")
            if kind == "pointwise" and transforms != 1:
                _fail(name, "pointwise path with transforms")
            wb = mess.get("weight_bits")
            want = ("q", wb) if wb else ("f32", None)
            entry = next((t for t in tensors if t[0] == f"{bank}.weight"), None)
            if entry is None or (entry[2], entry[3] if len(entry) == 4 else None) != want:
                _fail(name, f"the {kind} bank {bank} is missing or not stored as the version says")
            sizes = _bank(shapes[f"{bank}.weight"], kind, bind, transforms)
            if sizes is None:
                _fail(name, f"the {kind} bank {bank} of shape {shapes[f'{bank}.weight']} holds no whole "
                            f"vector of bind size {bind}")
            info = PathInfo(kind, bank, bind, transforms, sizes[1], sizes[0])
            for key, value in (("vector_length", info.vector_length), ("bank_size", info.bank_size),
                               ("index_bits", info.index_bits)):
                if p.get(key) != value:
                    _fail(name, f"{kind} path: {key} {p.get(key)!r:.20} but the bank holds {value}")
            paths[kind] = info
    # second pass: the parts, with offsets and the decoded size
    items, nf, nb = [], 0, 0
    decoded = sum(4 * p.bank_size * p.vector_length for p in paths.values())
    mspec = None if mess is None else {"beta": spec.beta, "alpha_bits": mess.get("alpha_bits"),
                                       "beta_bits": mess.get("beta_bits")}
    banks = {f"{p.bank}.weight" for p in paths.values()}
    for t in tensors:
        key, shape, enc = t[0], t[1], t[2]
        numel = math.prod(shape)
        extra, path = (t[3] if len(t) == 4 else None), None
        if enc == "i64":
            if not isinstance(extra, list) or len(extra) != numel or any(
                    type(x) is not int or not -2**63 <= x < 2**63 for x in extra):
                _fail(name, f"bad integer values of {key}")
        elif enc == "q":
            _bits(extra, name, f"bits of {key}", False)
            if key not in banks and (quant is None or extra != quant["bits"]):
                _fail(name, f"{key} is quantized, but no bank or quantization entry says so")
        elif enc in ("kernel", "pointwise"):
            path = paths.get(enc)
            if path is None or not key.endswith(".weight") or key in banks or len(shape) < 2 or 0 in shape:
                _fail(name, f"{key} is a {enc} target, but there is no such path or it cannot be one")
            if _vectors(shape, enc, path.bind)[2] and enc == "kernel":
                _fail(name, f"{key} of shape {shape} does not split into kernel vectors of "
                            f"{path.vector_length}")
        parts = []
        for part, stream, count, width in _parts(enc, shape, extra, path, mspec):
            parts.append((part, stream, nf if stream == "f" else nb, count, width))
            if stream == "f":
                nf += count
            else:
                nb += count * width
        if path is not None:
            n = _vectors(shape, enc, path.bind)[0]
            decoded += 16 * n  # k, alpha, beta
        decoded += (8 if enc == "i64" else 4) * numel
        items.append((key, tuple(shape), enc, extra, path, parts))
    for kind in paths:
        if not any(it[2] == kind for it in items):
            _fail(name, f"the {kind} path has no target")
    return _Plan(meta, mess, paths, items, nf, nb, decoded)


# ---------------------------------------------------------------- reading: decoding
def unpack(buf: bytes, name="<bytes>") -> dict:
    """A checkpoint dict from ``.mess`` bytes (see ``read_mess``)."""
    view = memoryview(buf)
    return _decode(lambda off, n: bytes(view[off:off + n]), len(buf), name)


def read_mess(path) -> dict:
    """A checkpoint dict (``model``, ``arch``, ``mess`` or ``quant``) from a ``.mess`` file.

    Checked in this order, before anything larger than the file is allocated: the safetensors
    header (its length against the file, dtypes, shapes, offsets that tile the data exactly), the
    CRC-32 of metadata and data (so a damaged file reads as damaged), the format version, every
    tensor's shape and encoding against the metadata, the stream lengths against what the
    metadata implies, the decoded size (at most ``MAX_EXPANSION`` times the file); while decoding,
    every scale (finite) and every index (below its bank size). Any failure is one ``UserError``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        def read(off, n):
            f.seek(off)
            return f.read(n)
        return _decode(read, path.stat().st_size, path)


def _decode(read, size: int, name) -> dict:
    from find_similar_kernel import bank_vectors, put_vectors, reconstruct

    header, start = _safetensors_header(read, size, name)
    # the file's own bytes (no more than its size), checked first: corruption reads as corruption
    n_f32, n_u8 = header["f32"]["shape"][0], header["bits"]["shape"][0]
    raw_f = read(start + header["f32"]["data_offsets"][0], 4 * n_f32)
    raw_b = read(start + header["bits"]["data_offsets"][0], n_u8)
    if len(raw_f) != 4 * n_f32 or len(raw_b) != n_u8:
        _fail(name, "the file ended early")
    crc = zlib.crc32(raw_b, zlib.crc32(raw_f, zlib.crc32(header["__metadata__"]["mess"].encode())))
    if f"{crc:08x}" != header["__metadata__"]["crc32"]:
        _fail(name, "checksum mismatch (the file is corrupt)")
    plan = _plan(header["__metadata__"]["mess"], name)
    if n_f32 != plan.n_floats or n_u8 != (plan.n_bits + 7) // 8:
        _fail(name, f"its data holds {n_f32:,} floats and {n_u8:,} code bytes, but its metadata describes "
                    f"{plan.n_floats:,} and {(plan.n_bits + 7) // 8:,} (truncated or corrupt)")
    if plan.decoded_bytes > MAX_EXPANSION * size:
        _fail(name, f"it would decode to {plan.decoded_bytes:,} bytes, more than {MAX_EXPANSION} times its "
                    f"size")
    floats = torch.from_numpy(np.frombuffer(raw_f, dtype="<f4").astype(np.float32))
    codes = np.frombuffer(raw_b, dtype=np.uint8)
    if plan.n_bits % 8 and codes[-1] >> (plan.n_bits % 8):
        _fail(name, "nonzero padding bits after the last code")

    def values(parts, want):
        _, stream, off, count, width = next(p for p in parts if p[0] == want)
        if stream == "f":
            return floats[off:off + count]
        return read_bits(codes, off, count, width)

    def dequant(parts, part, bits):
        slot = values(parts, f"{part}_scale")
        if not torch.isfinite(slot).all():
            _fail(name, f"a non-finite scale ({part})")
        q = torch.from_numpy((values(parts, part).astype(np.int64) - 2 ** (bits - 1)).astype(np.float32))
        return q * slot[0], float(slot[0])  # q * scale in float32, as quantize.linear_quantize computes it

    sd, scales, targets = {}, {}, []
    for key, shape, enc, extra, path, parts in plan.items:
        if enc == "f32":
            sd[key] = values(parts, "values").clone().reshape(shape)
        elif enc == "i64":
            sd[key] = torch.tensor(extra, dtype=torch.int64).reshape(shape)
        elif enc == "q":
            w, scales[key] = dequant(parts, "codes", extra)
            sd[key] = w.reshape(shape)
        else:
            sd[key] = None  # rebuilt below, once every bank is decoded
            targets.append((key, shape, enc, path, parts))

    mess = None
    if plan.mess is not None:
        m = plan.mess
        mess = {k: m.get(k) for k in ("version", "weight_bits", "alpha_bits", "beta_bits", "eps", "fc")}
        mess["args"] = m["args"]
        banks = {}
        for kind in ("kernel", "pointwise"):
            p = plan.paths.get(kind)
            mess[kind] = None if p is None else {
                "bank": p.bank, "kind": kind, "bind": p.bind, "transforms": p.transforms,
                "vector_length": p.vector_length, "bank_size": p.bank_size, "index_bits": p.index_bits,
                "bank_scale": scales.get(f"{p.bank}.weight"), "layers": {}}
            if p is not None:
                banks[kind] = bank_vectors(sd[f"{p.bank}.weight"], kind, p.bind, p.transforms)
        ab, bb = m.get("alpha_bits"), m.get("beta_bits")
        for key, shape, kind, p, parts in targets:
            k = values(parts, "k")
            if k.size and int(k.max()) >= p.bank_size:
                _fail(name, f"{key}: index {int(k.max())} outside the bank of {p.bank_size}")
            k = torch.from_numpy(k.astype(np.int64))
            alpha, sa = dequant(parts, "alpha", ab) if ab else (values(parts, "alpha").clone(), None)
            beta = sb = None
            if any(x[0] == "beta" for x in parts):
                beta, sb = dequant(parts, "beta", bb) if bb else (values(parts, "beta").clone(), None)
            template = torch.zeros(shape)
            rest = [x for x in parts if x[0] == "rest"]
            if rest:
                w = template.reshape(shape[0], -1)
                w[:, w.shape[1] // p.bind * p.bind:] = values(parts, "rest").reshape(shape[0], -1)
            sd[key] = put_vectors(template, reconstruct(banks[kind], k, alpha, beta), kind, p.bind)
            e = {"k": k, "alpha": alpha}
            if beta is not None:
                e["beta"] = beta
            e.update(alpha_scale=sa, beta_scale=sb, weight_scale=None)
            mess[kind]["layers"][key[:-len(".weight")]] = e
    ckpt = {"model": sd, **plan.meta.get("info", {})}
    if plan.meta.get("arch") is not None:
        ckpt["arch"] = plan.meta["arch"]
    if mess is not None:
        ckpt["mess"] = mess
    if plan.meta.get("quant") is not None:
        q = plan.meta["quant"]
        ckpt["quant"] = {"bits": q["bits"], "scales": {k[:-len(".weight")]: s for k, s in scales.items()}}
    ckpt["packed"] = {"bytes": size, "header_bytes": start, "floats": plan.n_floats, "code_bits": plan.n_bits}
    return ckpt


def load_any_checkpoint(path) -> dict:
    """``read_mess`` for a ``.mess`` file, ``utils.load_checkpoint`` for anything else."""
    return read_mess(path) if str(path).endswith(SUFFIX) else load_checkpoint(path)


def load_model(args):
    """``(model, ckpt, path)``: the model the flags describe with ``--ckpt`` (any checkpoint or .mess
    file, a bare name looked up as main.py does) loaded into it; without ``--ckpt`` its freshly
    initialised float32 weights and ``path`` None."""
    model, spec, ckpt_dir = build_model_from_args(args)
    if not args.ckpt:
        return model, {"model": model.state_dict(), "arch": spec}, None
    path = resolve_ckpt(args.ckpt, ckpt_dir)
    ckpt = load_any_checkpoint(path)
    check_arch(ckpt, spec, path)
    load_state_dict_checked(model, ckpt["model"], path)
    return model, ckpt, path


# ---------------------------------------------------------------- sizes
def fp32_file_bytes(state_dict: dict) -> int:
    """Bytes of ``torch.save(state_dict)``, every float tensor in float32: the file MESS is compared with."""
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}, buf)
    return buf.tell()


def size_line(mess_path, mess_bytes: int, state_dict: dict) -> str:
    fp32 = fp32_file_bytes(state_dict)
    return (f"sizes on disk: float32 state_dict {fp32:,} bytes (torch.save), {Path(mess_path).name} "
            f"{mess_bytes:,} bytes: {fp32 / max(mess_bytes, 1):.2f}x smaller")


# ---------------------------------------------------------------- CLI
def get_args_parser():
    parser = OneLineParser(prog="packed.py",
                           description="Write a checkpoint (float, plain-quantized or MESS) as a packed "
                                       ".mess file beside it; given a .mess file, check it and print sizes.")
    add_flags(parser, ("dataset", "arch", "layers", "bn", "width_mult", "ckpt"))
    parser.add_argument("-o", "--output", default=None, metavar="PATH",
                        help="the .mess file to write (default: --ckpt with the suffix .mess)")
    return parser


def main(args):
    if not args.ckpt:
        raise UserError("--ckpt PATH is required: the checkpoint to pack, or a .mess file to check")
    _, ckpt, path = load_model(args)  # a .mess file is read, validated and loaded into the model
    if path.suffix == SUFFIX:
        if args.output:
            raise UserError(f"{path.name} is packed already; -o/--output applies to a checkpoint")
        n, out = path.stat().st_size, path
    else:
        out = Path(args.output) if args.output else path.with_suffix(SUFFIX)
        if out.suffix != SUFFIX:
            raise UserError(f"-o/--output must end in {SUFFIX}, not {out.name!r}")
        n = write_mess(out, ckpt)
        print(f"wrote {out}")
    print(size_line(out, n, ckpt["model"]))
    return {"path": out, "bytes": n}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
