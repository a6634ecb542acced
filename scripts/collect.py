"""Evaluate checkpoints and append one row each to a CSV table: accuracy and compression ratio side by side.

    python scripts/collect.py --table results/t.csv --sweep demo \\
        --ckpts ckpt_best.pth ckpt_best_v2qq_q888.pth -- digits -a resnet --layers 20
    python scripts/collect.py --show results/t.csv

Everything after ``--`` is main.py's flags for the model (and device); each checkpoint is evaluated
in this one process with ``main.py -E`` and sized with the storage account of docs/design.md §5.
The sweep scripts in this folder call it once per model.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

# this checkout's main.py and utils, as the sweeps run its other tools ("$ROOT/main.py"), not whichever
# `import main` an installed copy would give
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ["sweep", "dataset", "model", "ckpt", "stage", "format", "top1", "top5", "ratio", "bits",
           "fp32_bits"]


def describe(ckpt: dict) -> tuple[str, str]:
    """(stage, format) of a checkpoint: trained / compressed / quantized / retrained, and
    float32 / q<bits> / the MESS version with its bit widths."""
    if "mess" in ckpt:
        m = ckpt["mess"]
        bits = "".join(str(b) for b in (m.get("weight_bits"), m.get("alpha_bits"), m.get("beta_bits")) if b)
        fmt = f"{m['version']}" + (f" q{bits}" if bits else "")
    elif "quant" in ckpt:
        fmt = f"q{ckpt['quant']['bits']}"
    elif "palette" in ckpt:
        p = ckpt["palette"]
        fmt = f"vq{p['bits']}" if p["method"] == "vq" else f"km{p['bits']}" + (
            "c" if p.get("granularity") == "channel" else "")
    else:
        fmt = "float32"
    if "optimizer" not in ckpt:  # written by find_similar_kernel.py or quantize.py
        stage = "compressed" if "mess" in ckpt else "quantized" if "quant" in ckpt or "palette" in ckpt \
            else "weights"
    else:
        stage = "retrained" if ckpt.get("n_retrain") else "trained"
    return stage, fmt


def collect(table: Path, sweep: str, ckpts: list[str], main_argv: list[str]) -> list[dict]:
    import main
    from mess.account import storage_account
    from utils import append_csv, load_checkpoint, resolve_ckpt

    rows = []
    for name in ckpts:
        args = main.get_args_parser().parse_args([*main_argv, "-E", "--ckpt", name])
        out = main.main(args)
        ck = load_checkpoint(resolve_ckpt(name, out["ckpt_dir"]))
        acc = storage_account(ck["model"], ck.get("mess"), quant=ck.get("quant"), palette=ck.get("palette"))
        stage, fmt = describe(ck)
        rows.append({"sweep": sweep, "dataset": args.dataset, "model": Path(out["ckpt_dir"]).parent.name,
                     "ckpt": Path(name).name, "stage": stage, "format": fmt,
                     "top1": round(out["metrics"]["val_top1"], 2),
                     "top5": round(out["metrics"]["val_top5"], 2),
                     "ratio": round(acc.ratio, 2), "bits": acc.mess_bits, "fp32_bits": acc.fp32_bits})
    append_csv(table, rows, COLUMNS)
    return rows


def show(table: Path) -> None:
    """The table as aligned text: accuracy and compression ratio of every row side by side."""
    from rich.console import Console
    from rich.table import Table
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    t = Table(title=str(table), header_style="bold")
    cols = ["sweep", "dataset", "model", "ckpt", "stage", "format", "top1", "ratio"]
    for c in cols:
        t.add_column({"top1": "top-1 %", "ratio": "compression"}.get(c, c),
                     justify="right" if c in ("top1", "ratio") else "left")
    for r in rows:
        t.add_row(*[r[c] + ("x" if c == "ratio" else "") for c in cols])
    Console(highlight=False, width=200).print(t)


def get_args_parser():
    p = argparse.ArgumentParser(prog="collect.py", description=__doc__.split("\n")[0])
    p.add_argument("--table", type=Path, help="CSV file the rows are appended to")
    p.add_argument("--sweep", default="", help="label of the sweep (script name) in the table")
    p.add_argument("--ckpts", nargs="+", default=[], metavar="NAME", help="checkpoints to evaluate")
    p.add_argument("--show", type=Path, metavar="TABLE", help="print TABLE and exit")
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    main_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args = get_args_parser().parse_args(own)
    if args.show:
        show(args.show)
        return []
    if not args.table or not args.ckpts or not main_argv:
        get_args_parser().error("give --table, --ckpts and main.py's model flags after --")
    return collect(args.table, args.sweep, args.ckpts, main_argv)


if __name__ == "__main__":
    from utils import UserError
    try:
        main()
    except UserError as e:
        print(f"collect.py: error: {e}", file=sys.stderr)
        sys.exit(2)
