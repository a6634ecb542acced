"""Writing the packed ``.mess`` file: a network in the bits the storage account counts.

The format: docs/packed-format.md.
"""
from __future__ import annotations

import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .bits import BitWriter
from .checkpoint import atomic_write
from .entry import Entry, LayerCode
from .errors import UserError
from .packed_format import (
    ARCH_KEYS,
    FORMAT,
    FORMAT_VERSION,
    INFO_KEYS,
    PathInfo,
    bank_of,
    learned_key,
    vectors_of,
)
from .packed_read import unpack


def _grid_codes(x: torch.Tensor, scale, bits: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 scale slot, unsigned codes) such that ``(code - 2^(b-1)) * slot == x`` exactly, as
    ``mess.quant.linear_quantize`` computed ``x``. A constant tensor (scale 0) stores its value as the
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


def _entry_meta(entry: Entry, sd: dict, how: dict) -> dict:
    """The metadata of a MESS entry; fills ``how`` with the encoding of its bank and target weights."""
    m = {"version": entry.version, "weight_bits": entry.weight_bits, "alpha_bits": entry.alpha_bits,
         "beta_bits": entry.beta_bits, "eps": entry.eps, "fc": entry.fc, "grid": entry.grid,
         "args": {k: _plain(v) for k, v in (entry.args or {}).items() if isinstance(k, str)},
         "kernel": None, "pointwise": None}
    for p in entry.paths():
        key = f"{p.bank}.weight"
        if key not in sd:
            raise UserError(f"cannot pack: the {p.kind} bank {p.bank} has no weight in the state_dict")
        sizes = bank_of(list(sd[key].shape), p.kind, p.bind, p.transforms)
        if p.learned is not None:
            sizes = (p.learned.shape[0] * p.transforms, p.learned.shape[1])
        if sizes is None:
            raise UserError(f"cannot pack: the {p.kind} bank {p.bank} holds no whole vector")
        info = PathInfo(p.kind, p.bank, p.bind, p.transforms, sizes[1], sizes[0])
        m[p.kind] = {"bank": info.bank, "bind": info.bind, "transforms": info.transforms,
                     "vector_length": info.vector_length, "bank_size": info.bank_size,
                     "index_bits": info.index_bits}
        wb = entry.weight_bits
        how[key] = ("q", wb, p.bank_scale, None, None) if wb else ("f32", None, None, None, None)
        if p.learned is not None:
            m[p.kind]["learned"] = list(p.learned.shape)
            how[learned_key(p.kind)] = ("q", wb, p.learned_scale, None, None) if wb else (
                "f32", None, None, None, None)
        for t, code in p.layers.items():
            if f"{t}.weight" not in sd or (code.beta is not None) != entry.spec.beta:
                raise UserError(f"cannot pack: target {t} of the {p.kind} path does not match the "
                                f"state_dict or the version {entry.version}")
            how[f"{t}.weight"] = (p.kind, None, None, info, code)
    return m


def _meta_of(ckpt: dict) -> tuple[dict, dict, Entry | None]:
    """(metadata without the tensor list, {state_dict key: (enc, bits, scale, path, code)}, entry)."""
    sd, quant, arch = ckpt["model"], ckpt.get("quant"), ckpt.get("arch")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "arch": {k: arch.get(k) for k in ARCH_KEYS} if isinstance(arch, dict) else None,
            "info": {k: ckpt[k] for k in INFO_KEYS if type(ckpt.get(k)) in (int, float)
                     and math.isfinite(ckpt[k])},
            "mess": None, "quant": None, "palette": None}
    how: dict[str, tuple] = {}
    entry = None
    if ckpt.get("mess"):
        try:
            entry = Entry.from_dict(ckpt["mess"])
        except UserError as e:
            raise UserError(f"cannot pack: {e}") from None
        meta["mess"] = _entry_meta(entry, sd, how)
    if ckpt.get("palette"):
        from .palette import Palette, PaletteError
        try:
            pal = Palette.from_dict(ckpt["palette"])
            pal.check(sd)
        except PaletteError as e:
            raise UserError(f"cannot pack: {e}") from None
        meta["palette"] = {"method": pal.method, "bits": pal.bits, "granularity": pal.granularity}
        for layer, p in pal.layers.items():
            how[f"{layer}.weight"] = ("pal", pal.bits, None, None, p)
    if quant:
        meta["quant"] = {"bits": int(quant["bits"])}
        for layer, scale in quant["scales"].items():
            how[f"{layer}.weight"] = ("q", int(quant["bits"]), scale, None, None)
    return meta, how, entry


def pack(ckpt: dict) -> bytes:
    """The ``.mess`` bytes of a checkpoint (float, plain-quantized or MESS, docs/design.md §4)."""
    from safetensors.numpy import save

    sd = ckpt.get("model")
    if not isinstance(sd, dict):
        raise UserError("cannot pack: the checkpoint has no 'model' state_dict")
    meta, how, entry = _meta_of(ckpt)
    floats, codes, tensors = [], BitWriter(), []
    extra = {learned_key(p.kind): p.learned for p in entry.paths() if p.learned is not None} if entry else {}
    for key, v in {**sd, **extra}.items():
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
        enc, bits, scale, path, code = how.get(key, ("f32", None, None, None, None))
        tensors.append([key, shape, enc] + ([bits] if enc in ("q", "pal") else []))
        if enc == "pal":  # float16 LUT values as their 16-bit patterns, then the indices
            codes.write(code.lut.half().view(torch.int16).numpy().astype(np.uint16).astype(np.uint64), 16)
            codes.write(code.idx.reshape(-1).numpy().astype(np.uint64), bits)
        elif enc == "f32":
            floats.append(v.reshape(-1).numpy())
        elif enc == "q":
            slot, c = _grid_codes(v, scale, bits, key)
            floats.append(slot)
            codes.write(c, bits)
        else:
            _pack_target(key, v, path, code, entry, floats, codes)
    meta["tensors"] = tensors
    f32 = np.concatenate(floats).astype("<f4") if floats else np.zeros(0, "<f4")
    bits = codes.getvalue()
    try:
        meta_json = json.dumps(meta, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot pack: the checkpoint's metadata is not plain data ({e})") from None
    crc = zlib.crc32(bits.tobytes(), zlib.crc32(f32.tobytes(), zlib.crc32(meta_json.encode())))
    return save({"f32": f32, "bits": bits}, metadata={"mess": meta_json, "crc32": f"{crc:08x}"})


def _pack_target(key, v, path: PathInfo, code: LayerCode, entry: Entry, floats: list,
                 codes: BitWriter) -> None:
    n, _, rest = vectors_of(list(v.shape), path.kind, path.bind)
    k = code.k.detach().cpu()
    if k.numel() != n or (n and (k.min() < 0 or k.max() >= path.bank_size)):
        raise UserError(f"cannot pack {key}: its k must be {n} int64 indices below the bank size "
                        f"{path.bank_size}")
    codes.write(k.numpy().astype(np.uint64), path.index_bits)
    for part, x, bits, scale in (("alpha", code.alpha, entry.alpha_bits, code.alpha_scale),
                                 ("beta", code.beta, entry.beta_bits, code.beta_scale)):
        if x is None:
            continue
        x = x.detach().cpu()
        if x.numel() != n:
            raise UserError(f"cannot pack {key}: its {part} must be {n} float32 values")
        if bits:
            slot, c = _grid_codes(x, scale, bits, f"{key} {part}")
            floats.append(slot)
            codes.write(c, bits)
        else:
            floats.append(x.reshape(-1).numpy())
    if rest:
        w = v.reshape(v.shape[0], -1)
        floats.append(w[:, w.shape[1] // path.bind * path.bind:].reshape(-1).numpy())


def write_mess(path, ckpt: dict, *, build=None) -> int:
    """Write ``ckpt`` as a ``.mess`` file (atomically); returns its size in bytes. ``build`` is
    ``read_mess``'s: with it, a checkpoint whose ``arch`` builds another network is refused.

    The bytes are read back before the file is written and every tensor must come back equal
    to the checkpoint's: a MESS checkpoint whose weights are not ``alpha * bank[k] + beta``
    (docs/design.md §4) is refused with a ``UserError`` rather than packed into another network.
    """
    buf = pack(ckpt)
    try:  # read back as a caller with this model reads it: every tensor checked against it and the arch
        back = unpack(buf, Path(path).name, model=ckpt["model"], build=build)["model"]
    except UserError as e:  # e.g. an arch entry that builds another network: no reader would take the file
        raise UserError(f"cannot pack {Path(path).name}, the file would not read back: {e}") from None
    for key, v in ckpt["model"].items():
        if not same(back[key], v.detach().cpu()):
            raise UserError(f"cannot pack {key}: it differs from what its MESS entry rebuilds "
                            f"(alpha * bank[k] + beta); the checkpoint breaks docs/design.md §4")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(buf)
    atomic_write(path, write)
    return len(buf)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values (NaN equal to itself; -0.0 equal to 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


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
