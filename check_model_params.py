"""Parameters and bits per layer of a model spec, a checkpoint, a MESS checkpoint or a .mess file.

    python check_model_params.py cifar10 -a resnet --layers 56                            # the float32 model
    python check_model_params.py cifar10 -a resnet --layers 56 --ckpt ckpt_best_v2qq_q888.mess --plot b.png
    python check_model_params.py cifar10 -a resnet --layers 56 --ckpt ckpt_best.pth -v v2qq --analysis f.png

Bits are docs/design.md §5's storage account (``mess.account.storage_account``). With
``-v`` on a float checkpoint (or a bare model spec) the search runs in memory and the table shows
what that version would store; nothing is written but the PNGs. ``--plot`` draws bits per layer
before and after; ``--analysis`` draws, for a few sampled covered vectors, the target against
its bank vector ``bank[k]`` and the fit ``alpha * bank[k] + beta``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

import models
from config import MESS_FLAGS, OneLineParser, add_flags
from mess.account import Account, storage_account, summarize
from mess.compress import compress
from mess.entry import Entry
from mess.layers import reconstruct, target_vectors
from mess.settings import Settings
from utils import UserError, load_model, run_cli

DPI = 100
PART_TOKENS = {"k": "k", "alpha": "a", "beta": "b", "quantized": "q"}  # "k4 a8 b8", "q8"


# ---------------------------------------------------------------- the table
def _kind(m: nn.Module | None) -> str:
    if isinstance(m, nn.Conv2d):
        k = "x".join(map(str, m.kernel_size))
        return f"conv {k}" + (" dw" if m.groups > 1 and m.groups == m.in_channels else "")
    if isinstance(m, nn.Linear):
        return "fc"
    return type(m).__name__ if m is not None else ""


def _stored(parts) -> str:
    """How a layer's tensors are stored: ``k4 a8 b8`` (a MESS target), ``q8`` (quantized), ``f32``."""
    tokens = []
    for t in parts:
        if t.part in PART_TOKENS:
            tok = f"{PART_TOKENS[t.part]}{t.bits}"
        elif t.part in ("float", "remainder"):
            tok = "f32"
        else:
            continue  # scales: one float each, in the bits
        if tok not in tokens:
            tokens.append(tok)
    return " ".join(tokens)


def layer_rows(model: nn.Module, account: Account) -> list[dict]:
    """One row per module holding float tensors, in state_dict order."""
    mods = dict(model.named_modules())
    parts: dict[str, list] = {}
    for t in account.tensors:
        parts.setdefault(t.layer, []).append(t)
    rows = []
    for layer in account.fp32_by_layer:
        m = mods.get(layer)
        before, after = account.layer_bits(layer)
        rows.append({"layer": layer or "(top level)", "type": _kind(m),
                     "params": sum(p.numel() for p in m.parameters(recurse=False)) if m is not None else 0,
                     "stored": _stored(parts.get(layer, [])), "bits_before": before, "bits_after": after})
    return rows


def print_table(rows: list[dict], account: Account, title: str) -> None:
    from rich.console import Console
    from rich.table import Table
    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 160))
    table = Table(title=title, show_footer=True, header_style="bold")
    for name, justify in (("layer", "left"), ("type", "left"), ("params", "right"), ("stored as", "left"),
                          ("bits before", "right"), ("bits after", "right"), ("ratio", "right")):
        table.add_column(name, justify=justify)
    for r in rows:
        ratio = r["bits_before"] / r["bits_after"] if r["bits_after"] else float("inf")
        table.add_row(r["layer"], r["type"], f"{r['params']:,}", r["stored"], f"{r['bits_before']:,}",
                      f"{r['bits_after']:,}", f"{ratio:.2f}x")
    table.columns[0].footer = "total"
    table.columns[2].footer = f"{sum(r['params'] for r in rows):,}"
    table.columns[4].footer = f"{account.fp32_bits:,}"
    table.columns[5].footer = f"{account.mess_bits:,}"
    table.columns[6].footer = f"{account.ratio:.2f}x"
    console = Console(highlight=False, width=width)
    console.print(table)


# ---------------------------------------------------------------- pictures
def _png(path: str, flag: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise UserError(f"{flag} must end in .png, not {out.name!r}")
    return out


def _save(fig, out: Path) -> Path:
    from mess.checkpoint import atomic_write  # a PNG is written whole or not at all
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return out


def _wrap(text: str, width_px: float, char_px: float) -> str:
    """``text`` in lines that fit ``width_px`` (a long checkpoint name would run off the figure)."""
    import textwrap
    return textwrap.fill(text, max(20, int(width_px / char_px)), break_on_hyphens=False)


def bits_figure(rows: list[dict], account: Account, title: str):
    """Bits per layer before (float32) and after, side by side, on a log scale (a ``Figure``)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    rows = [r for r in rows if r["bits_before"]]
    n = len(rows)
    w = min(40.0, max(8.0, 0.16 * n + 3))
    fig = Figure(figsize=(w, 5.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    x = list(range(n))
    ax.bar([i - 0.2 for i in x], [r["bits_before"] for r in rows], 0.4, label="float32", color="0.6")
    ax.bar([i + 0.2 for i in x], [max(r["bits_after"], 1) for r in rows], 0.4, label="stored", color="C0")
    ax.set_yscale("log")
    ax.set_ylabel("bits per layer (log scale)")
    ax.set_xlabel("layer (state_dict order)")
    ax.set_xticks(x, [r["layer"] for r in rows], rotation=90, fontsize=6)
    ax.set_xlim(-0.7, n - 0.3)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")  # beside the bars, never over them
    mib = 8 * 2**20
    ax.set_title(_wrap(f"{title}: {account.fp32_bits / mib:.3f} MiB -> {account.mess_bits / mib:.3f} MiB "
                       f"({account.ratio:.2f}x)", w * DPI - 100, 7.5))
    return fig


def plot_bits(rows: list[dict], account: Account, out: Path, title: str) -> Path:
    return _save(bits_figure(rows, account, title), out)


def sample_fits(float_sd: dict, sd: dict, entry: Entry, samples: int, seed: int) -> list[dict]:
    """``samples`` covered vectors drawn uniformly over all targets: the target (from ``float_sd``),
    its bank vector and the fit (from ``sd`` and ``entry``)."""
    pools = []
    for path in entry.paths():
        B = path.bank_vectors(sd)
        for t, code in path.layers.items():
            W = target_vectors(float_sd[f"{t}.weight"], path.kind, path.bind)
            pools.append((path.kind, t, B, code, W))
    sizes = torch.tensor([len(p[3].k) for p in pools])
    total = int(sizes.sum())
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=g)[:samples].sort().values
    starts = torch.cumsum(sizes, 0) - sizes
    out = []
    for i in picks.tolist():
        j = int((starts <= i).nonzero().max())
        kind, t, B, code, W = pools[j]
        v = i - int(starts[j])
        k = code.k[v:v + 1]
        beta = code.beta[v:v + 1] if code.beta is not None else None
        fit = reconstruct(B, k, code.alpha[v:v + 1], beta)[0]
        out.append({"layer": t, "kind": kind, "index": v, "k": int(k), "alpha": float(code.alpha[v]),
                    "beta": None if beta is None else float(beta), "target": W[v], "bank": B[int(k)],
                    "fit": fit, "l1": float((fit - W[v]).abs().sum())})
    return out


def fits_figure(fits: list[dict], title: str):
    """One panel per sampled vector: the target, its bank vector and the fit, element by element."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(fits))
    rows = -(-len(fits) // cols)
    w = max(6.4, 3.2 * cols)  # one sample: wide enough for the title and the legend
    fig = Figure(figsize=(w, 2.7 * rows + 1.2), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, (ax, f) in enumerate(zip(axes.reshape(-1), fits)):
        x = list(range(len(f["target"])))
        ax.plot(x, f["target"].tolist(), "o-", color="k", ms=3, lw=1, label="target (the layer's weights)")
        ax.plot(x, f["bank"].tolist(), "s--", color="0.55", ms=3, lw=1, label="bank[k]")
        ax.plot(x, f["fit"].tolist(), "x-", color="C3", ms=4, lw=1, label="fit: alpha * bank[k] + beta")
        beta = "" if f["beta"] is None else f" b={f['beta']:.3g}"
        ax.set_title(f"{f['layer']}[{f['index']}] k={f['k']}\na={f['alpha']:.3g}{beta} L1={f['l1']:.3g}",
                     fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("weight value", fontsize=7)
        if i + cols >= len(fits):  # the lowest panel of its column
            ax.set_xlabel(f"element of the {f['kind']} vector", fontsize=7)
    for ax in axes.reshape(-1)[len(fits):]:
        ax.set_visible(False)
    # below the panels: a legend inside one would hide that panel's points
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=7)
    fig.suptitle(_wrap(title, w * DPI - 20, 7.5), fontsize=9)
    return fig


def plot_fits(fits: list[dict], out: Path, title: str) -> Path:
    return _save(fits_figure(fits, title), out)


# ---------------------------------------------------------------- CLI
def get_args_parser():
    parser = OneLineParser(prog="check_model_params.py",
                           description="Parameters and bits per layer of a model, checkpoint, MESS "
                                       "checkpoint or .mess file, with the compression ratio.")
    add_flags(parser, ("dataset", "arch", "layers", "bn", "width_mult", "ckpt") + MESS_FLAGS + ("fc", "seed"))
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="draw bits per layer before/after (default: none)")
    parser.add_argument("--analysis", default=None, metavar="PNG",
                        help="draw sampled covered vectors: target, bank[k] and the fit (needs a MESS "
                             "checkpoint or -v) (default: none)")
    parser.add_argument("--samples", type=int, default=8, metavar="N",
                        help="vectors --analysis draws (default: 8)")
    return parser


def main(args):
    plot = _png(args.plot, "--plot") if args.plot else None
    analysis = _png(args.analysis, "--analysis") if args.analysis else None
    if analysis and not 1 <= args.samples <= 64:
        raise UserError(f"--samples must be between 1 and 64, got {args.samples}")
    settings = Settings.from_args(args) if args.version else None
    model, ckpt, path = load_model(args)
    name = path.name if path else models.model_name(args.arch, args.layers, args.width_mult, args.bn)
    sd, float_sd = ckpt["model"], None
    entry = Entry.from_dict(ckpt["mess"]) if ckpt.get("mess") else None
    if settings:
        if entry or "quant" in ckpt:
            raise UserError(f"{name} is already compressed; -v {settings.version} applies to a float "
                            f"checkpoint")
        c = compress(model, settings, arch=args.arch)
        float_sd, sd, entry = sd, c.state_dict, c.entry
        ckpt = c.checkpoint()
        name += f" as {settings.version}"
    if analysis and not entry:
        raise UserError("--analysis draws covered vectors: give a MESS checkpoint (or .mess file), or -v "
                        "VERSION")
    account = storage_account(sd, entry, quant=ckpt.get("quant"), palette=ckpt.get("palette"))
    rows = layer_rows(model, account)
    print_table(rows, account, title=name)
    print(summarize(ckpt))
    if "packed" in ckpt:
        p = ckpt["packed"]
        print(f"{name}: {p['bytes']:,} bytes on disk = the account's {(account.mess_bits + 7) // 8:,} bytes "
              f"+ {p['bytes'] - (account.mess_bits + 7) // 8:,} bytes of header")
    result = {"rows": rows, "account": account, "ratio": account.ratio,
              "params": sum(r["params"] for r in rows), "plot": None, "analysis": None}
    if plot:
        result["plot"] = plot_bits(rows, account, plot, name)
        print(f"wrote {plot}")
    if analysis:
        fits = sample_fits(float_sd if float_sd is not None else sd, sd, entry, args.samples, args.seed)
        note = "" if float_sd is not None else (" (targets: the stored weights, which are their fits; give "
                                                "the float checkpoint and -v to see the search's residuals)")
        result["analysis"] = plot_fits(fits, analysis, f"{name}: {len(fits)} sampled vectors{note}")
        result["fits"] = fits
        print(f"wrote {analysis}")
    return result


if __name__ == "__main__":
    run_cli(main, get_args_parser())
