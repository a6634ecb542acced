"""The storage account: bits of every stored tensor against float32 (docs/design.md §5).

    >>> acc = storage_account(c.state_dict, c.entry)    # or quant={"bits", "scales"} for -Q
    >>> acc.ratio, acc.mess_bits, acc.fp32_bits

The packed ``.mess`` file (``mess/packed.py``) stores exactly these bits plus a small header.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .entry import Entry
from .palette import Palette


@dataclass(frozen=True)
class TensorBits:
    """One stored tensor: ``count`` values of ``bits`` bits each."""
    name: str  # a state_dict key, or "<layer>.weight:<part>" for the parts of a covered weight
    layer: str  # the module it belongs to
    part: str  # float | quantized | scale | k | alpha | beta | remainder
    count: int
    bits: int

    @property
    def total(self) -> int:
        return self.count * self.bits


@dataclass
class Account:
    tensors: list[TensorBits]
    fp32_by_layer: dict[str, int]  # 32 bits per float value of the same state_dict, per module

    @property
    def mess_bits(self) -> int:
        return sum(t.total for t in self.tensors)

    @property
    def fp32_bits(self) -> int:
        return sum(self.fp32_by_layer.values())

    @property
    def ratio(self) -> float:
        return self.fp32_bits / max(self.mess_bits, 1)

    def layer_bits(self, layer: str) -> tuple[int, int]:
        """(fp32 bits, stored bits) of one module's tensors."""
        return self.fp32_by_layer.get(layer, 0), sum(t.total for t in self.tensors if t.layer == layer)


def _layer_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else ""


def storage_account(state_dict: dict, entry: Entry | dict | None = None,
                    quant: dict | None = None, palette: dict | None = None) -> Account:
    """Bits of every stored tensor (docs/design.md §5), in state_dict order.

    * a covered target weight: ``index_bits`` per vector (k), alpha and beta at their bits
      (32 for float) plus one 32-bit scale each when quantized, and the pointwise remainder
      (columns past ``I // d * d``) at 32 bits;
    * a bank layer's weight: ``weight_bits`` per value plus one 32-bit scale (32 bits per
      value and no scale in v2); a plain-quantized conv weight (``quant``) likewise; a learned
      bank (``--bank learned``) likewise, counted with its path's bank layer;
    * everything else that is a float tensor (BN parameters and running statistics, biases,
      FC, uncovered stems and convs): 32 bits per value. Integer buffers (BN's
      ``num_batches_tracked``) are not weights and count on neither side;
    * a palettized conv weight (``palette``, ``mess.palette``): its indices at the palette's bits and its
      LUT (or codebook) values at 16 bits (float16).

    Scales used only during the search (the targets' pre-search ``weight_scale``) are not
    needed to decode and are not counted. The packed ``.mess`` format stores exactly these.
    """
    entry = Entry.from_dict(entry) if entry else None
    targets, quantized = {}, {}
    if entry:
        for path, t, code in entry.targets():
            targets[t] = (path, code)
        for path in entry.paths():
            quantized[path.bank] = entry.weight_bits
    if quant:
        quantized.update({n: quant["bits"] for n in quant["scales"]})
    pal = Palette.from_dict(palette) if palette else None
    tensors, fp32 = [], {}
    for key, v in state_dict.items():
        if not v.is_floating_point():
            continue
        layer = _layer_of(key)
        fp32[layer] = fp32.get(layer, 0) + 32 * v.numel()
        is_weight = key.endswith(".weight")
        if is_weight and layer in targets:
            path, code = targets[layer]
            n = int(code.k.numel())
            tensors.append(TensorBits(f"{key}:k", layer, "k", n, path.index_bits))
            for part, present, bits in (("alpha", True, entry.alpha_bits),
                                        ("beta", code.beta is not None, entry.beta_bits)):
                if not present:
                    continue
                tensors.append(TensorBits(f"{key}:{part}", layer, part, n, bits or 32))
                if bits:
                    tensors.append(TensorBits(f"{key}:{part}_scale", layer, "scale", 1, 32))
            rest = v.numel() - n * path.vector_length
            if rest:
                tensors.append(TensorBits(f"{key}:remainder", layer, "remainder", rest, 32))
        elif is_weight and pal is not None and layer in pal.layers:
            p = pal.layers[layer]  # indices at the palette's bits, LUT values at 16 (float16)
            tensors.append(TensorBits(f"{key}:idx", layer, "palette index", p.idx.numel(), pal.bits))
            tensors.append(TensorBits(f"{key}:lut", layer, "palette", p.lut.numel(), 16))
        elif is_weight and quantized.get(layer):
            tensors.append(TensorBits(key, layer, "quantized", v.numel(), quantized[layer]))
            tensors.append(TensorBits(f"{key}:scale", layer, "scale", 1, 32))
        else:
            tensors.append(TensorBits(key, layer, "float", v.numel(), 32))
    for path in entry.paths() if entry else ():
        if path.learned is not None:  # stored once beside the bank layer, at the weight bits
            wb = entry.weight_bits
            tensors.append(TensorBits(f"{path.kind}:learned_bank", path.bank, "learned bank",
                                      path.learned.numel(), wb or 32))
            if wb:
                tensors.append(TensorBits(f"{path.kind}:learned_bank_scale", path.bank, "scale", 1, 32))
    return Account(tensors, fp32)


def summarize(ckpt: dict) -> str:
    """Two lines on a compressed checkpoint: what it is, and its size against float32."""
    sd = ckpt["model"]
    if "mess" in ckpt:
        m = Entry.from_dict(ckpt["mess"])
        acc = storage_account(sd, m)
        paths = [f"{p.kind} bank {p.bank} ({p.bank_size} vectors, {p.index_bits}-bit index) "
                 f"for {len(p.layers)} layers" for p in m.paths()]
        parts = [("weights", m.weight_bits), ("alpha", m.alpha_bits)]
        parts += [("beta", m.beta_bits)] if m.spec.beta else []
        bits = ", ".join(f"{what} {b}-bit" if b else f"{what} float32" for what, b in parts)
        head = f"MESS {m.version}: {'; '.join(paths)}; {bits}"
    elif "palette" in ckpt:
        pal = Palette.from_dict(ckpt["palette"])
        acc = storage_account(sd, palette=ckpt["palette"])
        per = "output channel" if pal.granularity == "channel" else "layer"
        what = (f"{2 ** pal.bits} 3x3 kernels per layer" if pal.method == "vq"
                else f"{pal.bits}-bit k-means per {per}")
        head = f"palette ({what}) of {len(pal.layers)} conv layers"
    elif "quant" in ckpt:
        acc = storage_account(sd, quant=ckpt["quant"])
        head = f"plain {ckpt['quant']['bits']}-bit quantization of {len(ckpt['quant']['scales'])} conv layers"
    else:
        acc = storage_account(sd)
        head = "float32 checkpoint"
    return (f"{head}\nsize {acc.mess_bits:,} bits vs {acc.fp32_bits:,} bits float32: "
            f"compression ratio {acc.ratio:.2f}x")


# ---------------------------------------------------------------- report
def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def print_account(account: Account, rows: list[dict], title: str = "") -> None:
    """The per-layer table (rich) with totals."""
    from rich.console import Console
    from rich.table import Table
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160))
    table = Table(title=title or None, show_footer=True, header_style="bold")
    for name, justify in (("layer", "left"), ("path", "left"), ("targets", "right"), ("bank", "right"),
                          ("idx bits", "right"), ("mean L1 res", "right"), ("rel err", "right"),
                          ("bits before", "right"), ("bits after", "right")):
        table.add_column(name, justify=justify)
    shown = set()
    for r in rows:
        before, after = account.layer_bits(r["layer"])
        shown.add(r["layer"])
        table.add_row(r["layer"], r["path"], _fmt(r.get("targets"), ","), _fmt(r.get("bank"), ","),
                      _fmt(r.get("index_bits"), "d"), _fmt(r.get("mean_residual"), ".4g"),
                      _fmt(r.get("rel_error"), ".3%"), f"{before:,}", f"{after:,}")
    other_before = sum(v for k, v in account.fp32_by_layer.items() if k not in shown)
    other_after = sum(t.total for t in account.tensors if t.layer not in shown)
    table.add_row("everything else", "float32", "", "", "", "", "", f"{other_before:,}", f"{other_after:,}",
                  end_section=True)
    table.columns[0].footer = "total"
    table.columns[7].footer = f"{account.fp32_bits:,}"
    table.columns[8].footer = f"{account.mess_bits:,}"
    console = Console(highlight=False, width=width)
    console.print(table)
    console.print(f"fp32 {account.fp32_bits / 8 / 2**20:.3f} MiB -> {account.mess_bits / 8 / 2**20:.3f} MiB: "
                  f"compression ratio {account.ratio:.2f}x")
