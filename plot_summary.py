"""Training curves (loss and top-1 per epoch, several runs overlaid) as one PNG.

    python plot_summary.py checkpoint/resnet20/digits/summary.csv checkpoint/vgg16_bn/digits -o curves.png
    python plot_summary.py runs/                  # every training run recorded under runs/
    python plot_summary.py runs/3 runs/5 --title "ResNet-20 vs VGG-16 on digits"

A SOURCE is a ``summary.csv`` of main.py, a checkpoint folder holding one, a sacred run folder
(``runs/<id>`` with its ``metrics.json``) or a folder of such runs. Solid lines are training,
dashed lines validation; each run has its own colour. A ``summary.csv`` that holds several
trainings (a run started again from epoch 1 appends to it) gives one curve per training; a
resumed run continues its training's curve.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from config import OneLineParser
from utils import UserError, run_cli

PANELS = (("loss", "train_loss", "val_loss"), ("top-1 (%)", "train_top1", "val_top1"))
METRICS = tuple(m for _, *ms in PANELS for m in ms)
MAX_EPOCH = 10**6  # far beyond any run; a larger one is a damaged table
DPI = 100  # pixels = inches * DPI, so --width/--height are the PNG's exact size


@dataclass
class Curve:
    label: str
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {epoch: value}

    def has_data(self) -> bool:
        return any(self.series.values())


# ---------------------------------------------------------------- reading
def read_summary_csv(path: Path, label: str | None = None) -> list[Curve]:
    """One curve per training in main.py's ``summary.csv``; later rows of an epoch win (a resume)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if rows and "epoch" not in rows[0]:
        raise UserError(f"{path} is not a summary.csv of main.py (it has no 'epoch' column)")
    label = label or _label_for_csv(path)
    trainings: list[Curve] = []
    run_id = None
    for r in rows:
        try:
            epoch = float(r["epoch"])
        except (TypeError, ValueError):
            raise UserError(f"{path}: bad epoch {r.get('epoch')!r}") from None
        if not (math.isfinite(epoch) and epoch == int(epoch) and 1 <= epoch <= MAX_EPOCH):
            raise UserError(f"{path}: bad epoch {r.get('epoch')!r} (a whole number from 1 to {MAX_EPOCH})")
        epoch = int(epoch)
        # a new training: another run's id, or (tables without run_id) epoch 1 again
        if not trainings or epoch == 1 or (r.get("run_id") or None) != run_id:
            trainings.append(Curve(label))
        run_id = r.get("run_id") or None
        for m in METRICS:
            v = _number(r.get(m))
            if v is not None:
                trainings[-1].series.setdefault(m, {})[epoch] = v
    if len(trainings) > 1:
        for i, c in enumerate(trainings, 1):
            c.label = f"{label} ({i})"
    return [c for c in trainings if c.has_data()]


def read_sacred_run(run_dir: Path) -> Curve | None:
    """The curve of a sacred run folder (``metrics.json``), or None when it logged no training."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run_dir / 'metrics.json'}: {e}") from None
    curve = Curve(_label_for_run(run_dir))
    for m in METRICS:
        entry = metrics.get(m)
        if isinstance(entry, dict):
            steps, values = entry.get("steps", []), entry.get("values", [])
            curve.series[m] = {int(s): float(v) for s, v in zip(steps, values)}
    return curve if curve.has_data() else None


def collect(sources) -> list[Curve]:
    curves: list[Curve] = []
    for src in map(Path, sources):
        if src.is_file():
            curves += read_summary_csv(src)
        elif (src / "metrics.json").is_file():
            c = read_sacred_run(src)
            if c is None:
                raise UserError(f"{src} is a run without training curves (a compression run?)")
            curves.append(c)
        elif (src / "summary.csv").is_file():
            curves += read_summary_csv(src / "summary.csv")
        elif src.is_dir():
            runs = sorted((d for d in src.iterdir() if d.name.isdigit() and (d / "metrics.json").is_file()),
                          key=lambda d: int(d.name))
            found = [c for c in map(read_sacred_run, runs) if c is not None]
            if not found:
                raise UserError(f"{src} holds no summary.csv and no sacred run with training curves")
            curves += found
        else:
            raise UserError(f"no such file or folder: {src}")
    if not curves:
        raise UserError("no training curves in " + ", ".join(map(str, sources)))
    seen: dict[str, int] = {}
    for c in curves:  # the same model twice: tell the legends apart
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} #{seen[c.label]}"
    return curves


def _number(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None  # a diverged epoch (nan) is a gap in its curve, not an axis of inf


def _label_for_csv(path: Path) -> str:
    # checkpoint/<model>/<dataset>/summary.csv -> "<model>/<dataset>"
    parts = path.resolve().parent.parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else path.stem


def _label_for_run(run_dir: Path) -> str:
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    what = cfg.get("arch", "")
    if what in ("resnet", "vgg", "wideresnet") and cfg.get("layers"):
        what += str(cfg["layers"])
    if cfg.get("width_mult") not in (None, 1, 1.0):
        what += f"_w{cfg['width_mult']:g}"
    if cfg.get("dataset"):
        what += f" {cfg['dataset']}"
    return f"run {run_dir.name}" + (f": {what.strip()}" if what.strip() else "")


# ---------------------------------------------------------------- drawing
def plot(curves: list[Curve], out: Path, width: int = 1200, height: int = 480, title: str = "") -> Path:
    """Draw the loss and top-1 panels to ``out`` (PNG, exactly ``width`` x ``height`` pixels)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    colors = [f"C{i % 10}" for i in range(len(curves))]
    for ax, (ylabel, train, val) in zip(axes, PANELS):
        for c, color in zip(curves, colors):
            for metric, style in ((train, "-"), (val, "--")):
                pts = sorted(c.series.get(metric, {}).items())
                if pts:
                    ax.plot([e for e, _ in pts], [v for _, v in pts], style, color=color,
                            marker="o" if len(pts) < 3 else None, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend([Line2D([], [], color="k", ls="-"), Line2D([], [], color="k", ls="--")],
                   ["train", "val"], loc="upper right", fontsize="small")
    axes[-1].legend([Line2D([], [], color=col) for col in colors], [c.label for c in curves],
                    loc="lower right", fontsize="small")
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI)
    return out


def get_args_parser():
    parser = OneLineParser(prog="plot_summary.py",
                           description="Training curves (loss, top-1 per epoch) of one or more runs, to PNG.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="summary.csv, checkpoint folder, sacred run folder (runs/<id>) or runs/ folder")
    parser.add_argument("-o", "--output", default="curves.png", metavar="PATH",
                        help="PNG to write (default: curves.png)")
    parser.add_argument("--width", type=int, default=1200, metavar="PX",
                        help="width in pixels (default: 1200)")
    parser.add_argument("--height", type=int, default=480, metavar="PX",
                        help="height in pixels (default: 480)")
    parser.add_argument("--title", default="", metavar="T", help="figure title (default: none)")
    return parser


def main(args):
    if not (100 <= args.width <= 10000 and 100 <= args.height <= 10000):
        raise UserError("--width and --height must be between 100 and 10000 pixels")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UserError(f"--output must end in .png, not {out.name!r}")
    curves = collect(args.sources)
    plot(curves, out, args.width, args.height, args.title)
    print(f"wrote {out} ({len(curves)} run{'s' if len(curves) != 1 else ''}: "
          f"{', '.join(c.label for c in curves)})")
    return {"path": out, "labels": [c.label for c in curves]}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
