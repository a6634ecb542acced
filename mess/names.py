"""Every file-name rule of the suite, once (docs/design.md §7): the original's names, kept exactly.

    python -m mess.names compressed ckpt_best -v v2qq --qb 4          # ckpt_best_v2qq_q488.pth
    python -m mess.names quantized ckpt_best --qb 4                    # ckpt_best_q4.pth
    python -m mess.names retrained ckpt_best_v2qq_q488.pth -s 1 --new  # ckpt_rt1_v2qq_q488_s1_best.pth

The shell sweeps call this CLI instead of spelling names themselves.
"""
from __future__ import annotations

import argparse
import re
import sys

from .settings import EPS, Settings

SUFFIX = ".pth"
PACKED_SUFFIX = ".mess"


def compressed_name(stem: str, s: Settings, *, pointwise_ran: bool | None = None) -> str:
    """``<stem>_<version>[_d<d>][_np | _pwd<n>][_q<qb>[<qba>[<qbb>]]][_eps1e-08][_fc].pth``, the original's
    names plus ``_fc`` (new: the original had no FC coverage). ``_pwd<n>`` only when the pointwise path
    ran (``pointwise_ran``; None: whenever it was asked for) with a -pwd other than the default 8."""
    spec = s.spec
    ran = s.pointwise if pointwise_ran is None else pointwise_ran
    name = f"{stem}_{s.version}"
    if spec.bind:
        name += f"_d{s.bind_size}"
    if not s.pointwise:
        name += "_np"
    elif ran and s.pw_bind_size != 8:
        name += f"_pwd{s.pw_bind_size}"
    if spec.quant_weights:
        name += f"_q{s.qb}"
        if spec.quant_ab:
            name += f"{s.qba}{s.qbb}" if spec.beta else f"{s.qba}"
    if spec.eps_mode:
        name += f"_eps{EPS}"
    if s.fc:
        name += f"_pwd{s.pw_bind_size}" if not s.pointwise and ran and s.pw_bind_size != 8 else ""
        name += "_fc"
    if s.learned:
        name += f"_L{s.bank_size}"
    if s.grid != "mse" and spec.quant_ab:
        name += f"_{s.grid}"
    return name + SUFFIX


def quantized_name(stem: str, bits: int, method: str = "linear", granularity: str = "tensor") -> str:
    """quantize.py's output: ``<stem>_q<bits>.pth`` (linear), ``<stem>_km<bits>[c].pth`` (k-means, ``c``
    per output channel), ``<stem>_vq<bits>.pth`` (a codebook of 2^bits kernels per layer)."""
    if method == "kmeans":
        return f"{stem}_km{bits}{'c' if granularity == 'channel' else ''}{SUFFIX}"
    if method == "vq":
        return f"{stem}_vq{bits}{SUFFIX}"
    return f"{stem}_q{bits}{SUFFIX}"


def parse_name(stem: str) -> tuple[int, str]:
    """``(n, tag)`` of a checkpoint name: ``ckpt_rt1_v2qq_q888_best`` -> ``(1, "v2qq_q888")``,
    ``ckpt_best_v2qq_q888`` -> ``(0, "v2qq_q888")``, ``ckpt_epoch_5`` -> ``(0, "")``."""
    s = stem[5:] if stem.startswith("ckpt_") else ("" if stem == "ckpt" else stem)
    n = 0
    m = re.match(r"rt(\d+)(?:_|$)", s)
    if m:
        n, s = int(m.group(1)), s[m.end():]
    tokens, out, i = s.split("_") if s else [], [], 0
    while i < len(tokens):
        if tokens[i] == "best":
            i += 1
        elif tokens[i] == "epoch" and i + 1 < len(tokens) and tokens[i + 1].isdigit():
            i += 2
        else:
            out.append(tokens[i])
            i += 1
    return n, "_".join(out)


def join(*parts: str) -> str:
    return "_".join(p for p in parts if p)


def extras(*, nl_scale: float | None = None, pl_scale: float | None = None, wclip: float | None = None,
           save_epoch: int | None = None) -> str:
    """What regularizers, clipping and -N's -s add to a run's names: ``_nl<s>_pl<s>_wclip<k>_s<S>``."""
    s = ""
    if nl_scale is not None:
        s += f"_nl{nl_scale:g}"
    if pl_scale is not None:
        s += f"_pl{pl_scale:g}"
    if wclip:
        s += f"_wclip{wclip:g}"
    if save_epoch is not None:
        s += f"_s{save_epoch}"  # the original's: ckpt_rt1_v2qq_q888_s5_best.pth
    return s


def retrain_prefix(stem: str, *, n_prior: int = 0, quant_bits: int | None = None,
                   suffix: str = "") -> tuple[int, str]:
    """``(n, prefix)`` of a retraining run of the checkpoint named ``stem``: ``ckpt_rt<n>_<tag><suffix>``,
    n one more than the input's (from its name, else ``n_prior``); -Q replaces the tag's ``q<b>`` token."""
    n, tag = parse_name(stem)
    n = (n or n_prior) + 1
    if quant_bits is not None:
        tag = join(*[t for t in tag.split("_") if not re.fullmatch(r"q\d+", t)], f"q{quant_bits}")
    return n, join(f"ckpt_rt{n}", tag) + suffix


def new_prefix(s: Settings, suffix: str = "") -> str:
    """The prefix of an -N run from scratch: ``ckpt_new_<version>...``."""
    return compressed_name("ckpt_new", s)[:-len(SUFFIX)] + suffix


def epoch_file(prefix: str, epoch: int) -> str:
    return f"{prefix}_epoch_{epoch}{SUFFIX}"


def best_file(prefix: str) -> str:
    return f"{prefix}_best{SUFFIX}"


def summary_file(prefix: str) -> str:
    """A run's per-epoch CSV: ``summary.csv`` (plain training), else ``summary_<prefix[5:]>.csv``."""
    return "summary.csv" if prefix == "ckpt" else f"summary_{prefix[len('ckpt_'):]}.csv"


def packed_name(pth_name: str) -> str:
    """The ``.mess`` file beside a checkpoint."""
    return (pth_name[:-len(SUFFIX)] if pth_name.endswith(SUFFIX) else pth_name) + PACKED_SUFFIX


# ---------------------------------------------------------------- CLI, for the shell sweeps
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mess.names", description="Print a file name of the suite.")
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compressed", help="find_similar_kernel.py's output for STEM")
    c.add_argument("stem")
    c.add_argument("-v", "--version", required=True)
    for flag, dest, default in (("--qb", "qb", 8), ("--qba", "qba", 8), ("--qbb", "qbb", 8),
                                ("-d", "bind_size", 2), ("-pwd", "pw_bind_size", 8)):
        c.add_argument(flag, dest=dest, type=int, default=default)
    c.add_argument("--np", action="store_true")
    c.add_argument("--fc", action="store_true")
    c.add_argument("--bank", default="layer")
    c.add_argument("--bank-size", dest="bank_size", type=int, default=256)
    c.add_argument("--grid", default="mse")
    q = sub.add_parser("quantized", help="quantize.py's output for STEM")
    q.add_argument("stem")
    q.add_argument("--qb", type=int, default=8)
    q.add_argument("--method", default="linear")
    q.add_argument("--granularity", default="tensor")
    r = sub.add_parser("retrained", help="the best checkpoint main.py -T writes for the checkpoint NAME")
    r.add_argument("name")
    r.add_argument("-Q", "--quant-bits", dest="quant_bits", type=int, default=None)
    r.add_argument("-s", "--save-epoch", dest="save_epoch", type=int, default=1)
    r.add_argument("-N", "--new", action="store_true")
    return p


def main(argv=None) -> str:
    a = _parser().parse_args(argv)
    if a.what == "compressed":
        s = Settings(a.version, qb=a.qb, qba=a.qba, qbb=a.qbb, bind_size=a.bind_size,
                     pw_bind_size=a.pw_bind_size, pointwise=not a.np, fc=a.fc, bank=a.bank,
                     bank_size=a.bank_size, grid=a.grid)
        out = compressed_name(a.stem, s)
    elif a.what == "quantized":
        out = quantized_name(a.stem, a.qb, a.method, a.granularity)
    else:
        stem = a.name[:-len(SUFFIX)] if a.name.endswith(SUFFIX) else a.name
        suffix = extras(save_epoch=a.save_epoch if a.new else None)
        out = best_file(retrain_prefix(stem, quant_bits=a.quant_bits, suffix=suffix)[1])
    print(out)
    return out


if __name__ == "__main__":
    from .errors import UserError
    try:
        main()
    except UserError as e:
        print(f"python -m mess.names: error: {e}", file=sys.stderr)
        sys.exit(2)
