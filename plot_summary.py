"""Training curves (loss and top-1 per epoch, several runs overlaid) as one PNG.

    python plot_summary.py checkpoint/resnet20/digits/summary.csv checkpoint/vgg16_bn/digits -o curves.png
    python plot_summary.py runs/                  # every training run recorded under runs/
    python plot_summary.py runs/3 runs/5 --title "ResNet-20 vs VGG-16 on digits"

A SOURCE is a ``summary*.csv`` of main.py, a checkpoint folder holding them, a sacred run folder
(``runs/<id>`` with its ``metrics.json``) or a folder of such runs. One run: loss and top-1 side by
side, train solid and validation dashed. Several runs: train and validation in their own columns,
each run its own colour and line style, named in a legend beside the panels by model, version and
bits, dataset and run id (what all runs share is the legend's title). Loss is on a log axis. A
``summary.csv`` that holds several trainings (a run started again from epoch 1 appends to it) gives
one curve per training; a resumed run continues its training's curve.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from config import OneLineParser
from mess.checkpoint import atomic_write
from utils import UserError, run_cli

METRICS = ("train_loss", "val_loss", "train_top1", "val_top1")
MAX_EPOCH = 10**6  # far beyond any run; a larger one is a damaged table
DPI = 100  # pixels = inches * DPI, so --width/--height are the PNG's exact size
PANELS_PX = {1: (1000, 420), 2: (1000, 680)}  # the panels' area (without legend) by rows of panels
LEGEND_ROW_PX = 19  # one legend entry at fontsize "small", measured at DPI 100
LEGEND_MAX_ROWS = 30  # more runs: another legend column
MIN_PANEL_PX = (120, 80)  # a panel smaller than this is not readable: the size asked is too small
# a run's style: 10 colours, then each again with the next line style (40 distinct), then markers
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = (None, "o", "s", "^")


@dataclass
class Curve:
    label: str = ""
    series: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> {epoch: value}
    # what tells the run apart: model, dataset, tag (mode, version, bits: "rt1 v2qq q888"), run
    # (sacred's "run 3"), run_id (summary.csv's column), training (the n-th in a table without run ids)
    facts: dict[str, str] = field(default_factory=dict)

    def has_data(self) -> bool:
        return any(self.series.values())


# ---------------------------------------------------------------- reading
def read_summary_csv(path: Path, facts: dict | None = None) -> list[Curve]:
    """One curve per training in main.py's ``summary*.csv``; later rows of an epoch win (a resume)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if rows and "epoch" not in rows[0]:
        raise UserError(f"{path} is not a summary.csv of main.py (it has no 'epoch' column)")
    facts = facts if facts is not None else _facts_for_csv(path)
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
            trainings.append(Curve(facts=dict(facts)))
        run_id = r.get("run_id") or None
        if run_id:
            trainings[-1].facts["run_id"] = run_id
        for m in METRICS:
            v = _number(r.get(m))
            if v is not None:
                trainings[-1].series.setdefault(m, {})[epoch] = v
    if len(trainings) > 1:
        for i, c in enumerate(trainings, 1):
            if "run_id" not in c.facts:
                c.facts["training"] = f"training {i}"
    return [c for c in trainings if c.has_data()]


def read_sacred_run(run_dir: Path) -> Curve | None:
    """The curve of a sacred run folder (``metrics.json``), or None when it logged no training (a
    compression or evaluation run)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run_dir / 'metrics.json'}: {e}") from None
    curve = Curve(facts=_facts_for_run(run_dir))
    for m in METRICS:
        entry = metrics.get(m) if isinstance(metrics, dict) else None
        if isinstance(entry, dict):
            steps, values = entry.get("steps", []), entry.get("values", [])
            pts = {int(s): _number(v) for s, v in zip(steps, values)}
            curve.series[m] = {s: v for s, v in pts.items() if v is not None}
    # an evaluation (-E) logs validation figures once: a training logged train ones
    return curve if curve.series.get("train_loss") or curve.series.get("train_top1") else None


def summary_files(folder: Path) -> list[Path]:
    """A checkpoint folder's tables: ``summary.csv`` (training) first, then ``summary_<tag>.csv``."""
    return sorted(folder.glob("summary*.csv"), key=lambda p: (p.name != "summary.csv", p.name))


def collect(sources) -> list[Curve]:
    curves: list[Curve] = []
    for src in map(Path, sources):
        if src.is_file():
            curves += read_summary_csv(src)
        elif (src / "metrics.json").is_file():
            c = read_sacred_run(src)
            if c is None:
                raise UserError(f"{src} is a run without training curves (a compression or evaluation run?)")
            curves.append(c)
        elif src.is_dir() and summary_files(src):
            for p in summary_files(src):
                curves += read_summary_csv(p)
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
    return curves


def _number(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None  # a diverged epoch (nan) is a gap in its curve, not an axis of inf


def _tag(summary_name: str) -> str:
    """``summary_rt1_v2qq_q888.csv`` -> ``rt1 v2qq q888`` (mode, version, bits); ``summary.csv`` -> ``""``."""
    stem = summary_name[:-len(".csv")] if summary_name.endswith(".csv") else summary_name
    return stem[len("summary_"):].replace("_", " ") if stem.startswith("summary_") else ""


def _facts_for_csv(path: Path) -> dict:
    # checkpoint/<model>/<dataset>/summary_<tag>.csv
    parts = path.resolve().parent.parts
    facts = {"model": parts[-2] if len(parts) >= 2 else "", "dataset": parts[-1] if parts else ""}
    facts["tag"] = _tag(path.name)
    return facts


def _facts_for_run(run_dir: Path) -> dict:
    """Model and dataset from the run's flags (config.json); mode, version and bits from the name of the
    summary table it recorded (run.json's artifacts), which main.py names after them."""
    cfg, info = _json_or_empty(run_dir / "config.json"), _json_or_empty(run_dir / "run.json")
    facts = {"model": _model_name(cfg), "dataset": str(cfg.get("dataset") or ""),
             "run": f"run {run_dir.name}"}
    tables = [a for a in info.get("artifacts") or []
              if isinstance(a, str) and re.fullmatch(r"summary.*\.csv", a)]
    if tables:
        facts["tag"] = _tag(tables[0])
    elif cfg.get("version"):  # a record without its table: the flags say the version and bits
        facts["tag"] = f"{cfg['version']} q{cfg.get('qb', '')}{cfg.get('qba', '')}{cfg.get('qbb', '')}"
    return facts


def _json_or_empty(path: Path) -> dict:
    try:
        v = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _model_name(cfg: dict) -> str:
    """The checkpoint folder's name of the run's model (``resnet20_w0.25``, ``vgg16_bn``)."""
    import models
    arch = cfg.get("arch")
    if not isinstance(arch, str) or not arch:
        return ""
    layers = cfg.get("layers") if isinstance(cfg.get("layers"), int) else None
    wm = cfg.get("width_mult") if isinstance(cfg.get("width_mult"), (int, float)) else 1.0
    try:
        if layers is None and models.uses_depth(arch):
            return arch  # a depth the record does not say
        return models.model_name(arch, layers, wm, bool(cfg.get("bn")))
    except KeyError:  # an architecture this version does not know: its name as given
        return arch


# ---------------------------------------------------------------- labels
def label_curves(curves: list[Curve]) -> str:
    """Give each curve a short label that no other curve has; return what all of them share (the
    legend's title), e.g. ``digits``. A run's sacred id always shows; a summary.csv's run id (long)
    only where two labels would otherwise be equal."""
    shared = [k for k in ("model", "dataset", "tag") if len(curves) > 1
              and len({c.facts.get(k, "") for c in curves}) == 1 and curves[0].facts.get(k)]
    for c in curves:
        own = [c.facts.get(k, "") for k in ("model", "tag", "dataset") if k not in shared]
        ids = [c.facts.get(k, "") for k in ("run", "training")]
        # nothing of its own left: a summary.csv is plain training (the others' tables are summary_<tag>.csv)
        c.label = (_join(own + ids) or ("" if c.facts.get("tag") else "float training")
                   or c.facts.get("run_id", "") or _join(c.facts.get(k, "") for k in shared))
    for c in _clashes(curves):  # the same model and run twice: what else differs
        if c.facts.get("run_id") and c.facts["run_id"] not in c.label:
            c.label = _join([c.label, c.facts["run_id"]])
    seen: dict[str, int] = {}
    for c in _clashes(curves):  # the very same source twice
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c.label = f"{c.label} #{seen[c.label]}"
    return _join(curves[0].facts.get(k, "") for k in ("model", "tag", "dataset") if k in shared)


def _join(parts) -> str:
    return " ".join(p for p in parts if p)


def _clashes(curves: list[Curve]) -> list[Curve]:
    count: dict[str, int] = {}
    for c in curves:
        count[c.label] = count.get(c.label, 0) + 1
    return [c for c in curves if count[c.label] > 1]


def run_style(i: int) -> dict:
    """The i-th run's colour, line style and marker: distinct for 160 runs."""
    return {"color": f"C{i % 10}", "ls": LINESTYLES[i // 10 % 4], "marker": MARKERS[i // 40 % 4]}


# ---------------------------------------------------------------- drawing
def figure(curves: list[Curve], width: int | None = None, height: int | None = None, title: str = ""):
    """The figure of ``curves`` (a matplotlib ``Figure``, labels set on the curves). ``width``/``height``
    None: the panels' size plus what the legend needs; given: exactly that many pixels, and a
    ``UserError`` when the legend and readable panels do not fit in them."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    legend_title = label_curves(curves)
    single = len(curves) == 1
    if single:  # its legend says train and validation; the run is its title
        legend_title = curves[0].label
    base_w, base_h = PANELS_PX[1 if single else 2]
    entries = 2 if single else len(curves)
    title_px = 40 if title else 0
    if height is None:
        ncol = -(-entries // LEGEND_MAX_ROWS)
        height = max(base_h + title_px, -(-entries // ncol) * LEGEND_ROW_PX + 90 + title_px)
    else:
        ncol = -(-entries // max(1, (height - 70 - title_px) // LEGEND_ROW_PX))
    fig = Figure(figsize=((width or base_w) / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    handles, labels, axes = _draw_single(fig, curves[0]) if single else _draw_runs(fig, curves)
    # centred beside the panels: at the top it would run into a title
    legend = fig.legend(handles, labels, loc="outside right center", ncols=ncol, fontsize="small",
                        title=legend_title or None, title_fontsize="small", alignment="left")
    if title:
        fig.suptitle(title)
    with warnings.catch_warnings(record=True) as caught:  # a collapsed layout is reported below, in one line
        warnings.simplefilter("always")
        fig.canvas.draw()
        if width is None:  # the legend's width is its text's, whatever the figure's
            fig.set_size_inches((base_w + legend.get_window_extent().width + 16) / DPI, height / DPI)
            caught.clear()
            fig.canvas.draw()
    _check_fits(fig, legend, axes, len(curves), collapsed=any("collapsed" in str(w.message) for w in caught))
    return fig


def _check_fits(fig, legend, axes, runs: int, collapsed: bool) -> None:
    box, r = fig.bbox, fig.canvas.get_renderer()
    lb = legend.get_window_extent(r)
    small = collapsed or any(b.width < MIN_PANEL_PX[0] or b.height < MIN_PANEL_PX[1]
                             for b in (a.get_window_extent(r) for a in axes))
    if fig._suptitle is not None and fig._suptitle.get_window_extent(r).overlaps(lb):
        small = True
    if small or lb.x0 < box.x0 - 1 or lb.y0 < box.y0 - 1 or lb.x1 > box.x1 + 1 or lb.y1 > box.y1 + 1:
        raise UserError(f"{box.width:.0f} x {box.height:.0f} pixels is too small for the panels and the "
                        f"legend of {runs} run{'s' if runs != 1 else ''}: give a larger --width/--height, "
                        f"or leave them out (the figure then grows with its legend)")


def _line(ax, series: dict, style: dict, **kw) -> None:
    pts = sorted(series.items())
    if pts:
        marker = style.get("marker") or ("o" if len(pts) < 3 else None)  # one epoch: a dot, not nothing
        ax.plot([e for e, _ in pts], [v for _, v in pts], color=style["color"], ls=style["ls"],
                marker=marker, markevery=max(1, len(pts) // 8), markersize=3, lw=1.5, **kw)


def _finish(ax, metric: str, curves: list[Curve], xlabel: bool) -> None:
    """Axis labels with units, integer epochs, and the loss on a log axis (train loss falls by orders of
    magnitude: on a linear axis its end is a flat line at zero)."""
    from matplotlib.ticker import MaxNLocator

    if metric.endswith("loss"):
        values = [v for c in curves for m in ("train_loss", "val_loss") for v in c.series.get(m, {}).values()]
        log = bool(values) and min(values) > 0
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)" if log else "loss")
    else:
        ax.set_ylabel("top-1 accuracy (%)")
    if xlabel:
        ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True))
    ax.grid(alpha=0.3, which="both" if metric.endswith("loss") else "major", lw=0.5)


def _draw_single(fig, c: Curve):
    """One run: loss and top-1 side by side, train solid and validation dashed."""
    from matplotlib.lines import Line2D

    axes = fig.subplots(1, 2)
    for ax, (train, val) in zip(axes, (("train_loss", "val_loss"), ("train_top1", "val_top1"))):
        _line(ax, c.series.get(train, {}), {"color": "C0", "ls": "-"})
        _line(ax, c.series.get(val, {}), {"color": "C1", "ls": "--"})
        _finish(ax, train, [c], xlabel=True)
    handles = [Line2D([], [], color="C0", ls="-"), Line2D([], [], color="C1", ls="--")]
    return handles, ["train", "validation"], list(axes)


def _draw_runs(fig, curves: list[Curve]):
    """Several runs: rows loss and top-1, columns train and validation (one scale per row)."""
    from matplotlib.lines import Line2D

    axes = fig.subplots(2, 2, sharex=True, sharey="row")
    styles = [run_style(i) for i in range(len(curves))]
    for row, metric in enumerate(("loss", "top1")):
        for col, split in enumerate(("train", "val")):
            ax = axes[row][col]
            for c, st in zip(curves, styles):
                _line(ax, c.series.get(f"{split}_{metric}", {}), st)
            _finish(ax, f"{split}_{metric}", curves, xlabel=row == 1)
            if col == 1:
                ax.set_ylabel("")  # the row shares the left panel's scale and label
            if row == 0:
                ax.set_title("train" if split == "train" else "validation", fontsize="medium")
    handles = [Line2D([], [], color=st["color"], ls=st["ls"], marker=st["marker"], markersize=3, lw=1.5)
               for st in styles]
    return handles, [c.label for c in curves], [a for r in axes for a in r]


def plot(curves: list[Curve], out: Path, width: int | None = None, height: int | None = None,
         title: str = ""):
    """Draw the curves to ``out`` (PNG; written whole or not at all); return the ``Figure``."""
    fig = figure(curves, width, height, title)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return fig


def get_args_parser():
    parser = OneLineParser(prog="plot_summary.py",
                           description="Training curves (loss, top-1 per epoch) of one or more runs, to PNG.")
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="summary*.csv, checkpoint folder, sacred run folder (runs/<id>) or runs/ folder")
    parser.add_argument("-o", "--output", default="curves.png", metavar="PATH",
                        help="PNG to write (default: curves.png)")
    parser.add_argument("--width", type=int, default=None, metavar="PX",
                        help="width in pixels (default: the panels' 1000 plus the legend's)")
    parser.add_argument("--height", type=int, default=None, metavar="PX",
                        help="height in pixels (default: 420 for one run, 680 for several, more for a long "
                             "legend)")
    parser.add_argument("--title", default="", metavar="T", help="figure title (default: none)")
    return parser


def main(args):
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v is not None and not 100 <= v <= 10000:
            raise UserError(f"{flag} must be between 100 and 10000 pixels, got {v}")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UserError(f"--output must end in .png, not {out.name!r}")
    curves = collect(args.sources)
    fig = plot(curves, out, args.width, args.height, args.title)
    print(f"wrote {out} ({len(curves)} run{'s' if len(curves) != 1 else ''}: "
          f"{'; '.join(c.label for c in curves)})")
    return {"path": out, "labels": [c.label for c in curves], "figure": fig}


if __name__ == "__main__":
    run_cli(main, get_args_parser())
