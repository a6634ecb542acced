"""Benchmark: top-1 against whole-model compression ratio on real networks and images, MESS and its peers.

    python bench/bench_accuracy.py                                  # post-training, ResNet-20 and -56
    python bench/bench_accuracy.py --ft-epochs 8                    # plus a short fine-tune of some configs
    python bench/bench_accuracy.py --eval-data test.npz --json rows.json --png bench/accuracy.png
    python bench/bench_accuracy.py --replot bench/accuracy_post.json --png bench/accuracy.png  # redraw only

Networks: the pretrained CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10 (``--data`` holds them
under ``akamaster/``). Images: ``cifar10-train-subset.npz`` (5,085 real CIFAR-10 training images). The
last ``--eval`` of them are the evaluation set unless ``--eval-data FILE.npz`` (arrays ``x_test`` uint8
(N, 32, 32, 3) and ``y_test``) gives other images; the rest are the training images: the first
``--bn-images`` of them, through the training augmentation (pad 4, random crop, flip), calibrate the
BatchNorm statistics, all of them fine-tune. The pretrained weights saw every image of the subset in
training, so absolute top-1 on its held-out part is optimistic: compare methods at equal ratio.

Every method runs through the tool's own code (``mess.compress``, ``mess.palette``, ``mess.quant``,
``mess.bn``) and is counted by the same storage account (``mess.account``: every float the network
stores, BatchNorm and FC included) on the same images. Columns:

* ``top1_post``: compressed, statistics as the float network left them;
* ``top1_post_reest``: BatchNorm statistics re-estimated on the calibration images;
* ``top1_post_bn``: BatchNorm statistics corrected against the float network (``--bn-calib correct``,
  the tool's default after compressing);
* ``top1_ft``: after ``--ft-epochs`` of fine-tuning in compressed form (STE; k and palette indices fixed);
* ``mess_file``: the ``.mess`` file of the configuration, read back, gives the same logits (MESS rows).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mess  # noqa: E402
import pretrained  # noqa: E402
from mess.account import storage_account  # noqa: E402
from mess.bn import calibrate_bn  # noqa: E402
from mess.checkpoint import atomic_write  # noqa: E402
from mess.entry import check_representable  # noqa: E402
from mess.packed_read import read_mess  # noqa: E402
from mess.packed_write import write_mess  # noqa: E402
from mess.parametrize import MessWeight, latent, parametrize_quant, plain_state_dict  # noqa: E402
from mess.quant import conv_layers, quantize_layers  # noqa: E402
from models.registry import build_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
FILES = {20: "resnet20-12fca82f.th", 32: "resnet32-d509ac18.th", 44: "resnet44-014dd654.th",
         56: "resnet56-4bfd9763.th"}
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)  # what akamaster's weights expect
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


# ---------------------------------------------------------------- data
def to_tensor(x: np.ndarray) -> torch.Tensor:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise SystemExit(f"images must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
    return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The CIFAR training augmentation: pad 4, random 32x32 crop, random horizontal flip."""
    n = x.shape[0]
    p = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        o = p[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = o.flip(-1) if flip[i] else o
    return out


@dataclass
class Images:
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    calib: torch.Tensor  # augmented, for BatchNorm calibration
    source: str


def load_images(data: Path, n_eval: int, eval_data: str | None, n_calib: int) -> Images:
    sub = np.load(data / "cifar10-train-subset.npz")
    x, y = to_tensor(sub["x_train"]), torch.from_numpy(sub["y_train"]).long()
    if eval_data:
        ev = np.load(eval_data)
        ex, ey, src = to_tensor(ev["x_test"]), torch.from_numpy(np.asarray(ev["y_test"])).long(), eval_data
        tx, ty = x, y
    else:
        ex, ey, src = x[-n_eval:], y[-n_eval:], f"the last {n_eval} images of the training subset"
        tx, ty = x[:-n_eval], y[:-n_eval]
    calib = augment(tx[:n_calib], torch.Generator().manual_seed(0))
    return Images(tx, ty, ex, ey, calib, src)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])


def top1(model, im: Images) -> float:
    return 100.0 * float((logits(model, im.eval_x).argmax(1) == im.eval_y).float().mean())


def float_net(depth: int, data: Path):
    m = build_model("resnet_a", "cifar10", depth)
    pretrained.convert_file(data / "akamaster" / FILES[depth], m, "akamaster")
    return m.eval()


# ---------------------------------------------------------------- methods
@dataclass
class Method:
    name: str  # the table's; MESS configurations contain "MESS"
    kind: str  # mess | palette | linear
    settings: dict = field(default_factory=dict)
    ft: bool = False  # fine-tuned with --ft-epochs


MESS_METHODS = [
    Method("MESS v2qq q888 (original: layer bank, minmax grid)", "mess", dict(version="v2qq", grid="minmax")),
    Method("MESS v2qq q888 (layer bank)", "mess", dict(version="v2qq")),
    Method("MESS v3 q888 (layer bank)", "mess", dict(version="v3")),
    Method("MESS v2qq learned N=1024 q844", "mess", dict(version="v2qq", bank="learned", bank_size=1024,
                                                        qba=4, qbb=4)),
    Method("MESS v2qq learned N=512 q844", "mess", dict(version="v2qq", bank="learned", bank_size=512,
                                                       qba=4, qbb=4), ft=True),
    Method("MESS v3 learned N=128x8 q844", "mess", dict(version="v3", bank="learned", bank_size=128,
                                                       qba=4, qbb=4)),
    Method("MESS v2qq learned N=256 q844", "mess", dict(version="v2qq", bank="learned", bank_size=256,
                                                       qba=4, qbb=4)),
    Method("MESS v2qq learned N=128 q834", "mess", dict(version="v2qq", bank="learned", bank_size=128,
                                                       qba=3, qbb=4), ft=True),
    Method("MESS v2qq learned N=64 q844", "mess", dict(version="v2qq", bank="learned", bank_size=64,
                                                      qba=4, qbb=4), ft=True),
]
PEER_METHODS = [
    Method("linear 8-bit per tensor (quantize.py --qb 8)", "linear", dict(bits=8)),
    Method("linear 4-bit per tensor (quantize.py --qb 4)", "linear", dict(bits=4), ft=True),
    Method("k-means 2-bit per tensor (Deep Compression / TF-MOT)", "palette",
           dict(method="kmeans", bits=2, granularity="tensor"), ft=True),
    Method("k-means 2-bit per output channel (coremltools)", "palette",
           dict(method="kmeans", bits=2, granularity="channel"), ft=True),
    Method("codebook of 64 3x3 kernels per layer (PQ)", "palette", dict(method="vq", bits=6)),
    Method("codebook of 256 3x3 kernels per layer (PQ)", "palette", dict(method="vq", bits=8)),
]


def compress(method: Method, model) -> dict:
    """The compressed checkpoint dict (``model`` plus its entry) of ``method``."""
    if method.kind == "mess":
        return mess.compress(model, mess.Settings(**method.settings), arch="resnet_a").checkpoint()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if method.kind == "linear":
        bits = method.settings["bits"]
        return {"model": sd, "quant": {"bits": bits, "scales": quantize_layers(sd, conv_layers(model), bits)}}
    from mess.palette import palettize
    return palettize(model, **method.settings)


def ratio(ckpt: dict) -> float:
    return storage_account(ckpt["model"], ckpt.get("mess"), quant=ckpt.get("quant"),
                           palette=ckpt.get("palette")).ratio


# ---------------------------------------------------------------- fine-tuning
def fine_tune(method: Method, model, ckpt: dict, im: Images, epochs: int, lr: float, seed: int = 0) -> dict:
    """``epochs`` of SGD in compressed form (the tool's parametrizations, as main.py -T uses them);
    returns the exported checkpoint, checked to be exactly representable."""
    import retrain
    net = copy.deepcopy(model)
    net.load_state_dict(ckpt["model"])
    if method.kind == "mess":
        mess.parametrize(net, ckpt["mess"])
    elif method.kind == "linear":
        parametrize_quant(net, conv_layers(net), ckpt["quant"]["bits"], ckpt["quant"]["scales"])
    else:
        from mess.palette import parametrize_palette
        parametrize_palette(net, ckpt["palette"])
    banks = set()
    for m in net.modules():
        if isinstance(m, MessWeight):
            banks.add(id(m.bank.weight) if m.learned else id(latent(m.bank)))
    ab = {id(p) for m in net.modules() if isinstance(m, MessWeight)
          for p in (m.alpha, m.beta) if p is not None}
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in banks | ab]},
              {"params": [p for p in params if id(p) in ab], "weight_decay": 0.0},
              {"params": [p for p in params if id(p) in banks], "lr_scale": retrain.BANK_LR_SCALE}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    n, bs = len(im.train_x), 128
    steps = epochs * math.ceil(n / bs)
    step = 0
    for _ in range(epochs):
        net.train()
        x_all = augment(im.train_x, g)
        order = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            cur = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            for grp in opt.param_groups:
                grp["lr"] = cur * grp.get("lr_scale", 1.0)
            loss = F.cross_entropy(net(x_all[idx]), im.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    if method.kind == "mess":
        out = mess.export(net).checkpoint()
    else:
        out = {"model": plain_state_dict(net, list(model.state_dict()))}
        if method.kind == "linear":
            out["quant"] = {"bits": ckpt["quant"]["bits"], "scales": {
                n: quantize_layers({f"{n}.weight": latent(net.get_submodule(n))},
                                   [n], ckpt["quant"]["bits"])[n] for n in conv_layers(net)}}
        else:
            from mess.palette import export_palette
            out["palette"] = export_palette(net)
    check_representable(out)
    return out


# ---------------------------------------------------------------- one model
def run_model(depth: int, methods: list[Method], im: Images, a) -> list[dict]:
    model = float_net(depth, a.data)
    t_float = top1(model, im)
    print(f"\nResNet-{depth}: float top-1 {t_float:.2f}% on {len(im.eval_y)} images ({im.source})",
          flush=True)
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        try:
            ckpt = compress(method, model)
        except ImportError as e:  # a peer whose module is not there
            print(f"  skipped {method.name}: {e}")
            continue
        t_compress = time.perf_counter() - t0
        net = copy.deepcopy(model)
        net.load_state_dict(ckpt["model"])
        row = {"model": f"resnet{depth}", "method": method.name, "ratio": round(ratio(ckpt), 3),
               "top1_float": round(t_float, 2), "top1_post": round(top1(net, im), 2)}
        re = copy.deepcopy(net)
        calibrate_bn(re, im.calib, method="reestimate")
        row["top1_post_reest"] = round(top1(re, im), 2)
        calibrate_bn(net, im.calib, method="correct", reference=model)
        row["top1_post_bn"] = round(top1(net, im), 2)
        ckpt["model"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if method.kind == "mess":
            row["mess_file"] = same_logits_from_file(ckpt, model, im)
        row["top1_ft"], row["ft_epochs"] = None, 0
        if a.ft_epochs and method.ft:
            ft = fine_tune(method, model, ckpt, im, a.ft_epochs, a.lr)
            tuned = copy.deepcopy(model)
            tuned.load_state_dict(ft["model"])
            row["top1_ft"], row["ft_epochs"] = round(top1(tuned, im), 2), a.ft_epochs
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["compress_seconds"] = round(t_compress, 2)
        rows.append(row)
        ft = "" if row["top1_ft"] is None else f"  ft {row['top1_ft']:6.2f}"
        print(f"  {row['ratio']:6.2f}x  post {row['top1_post']:6.2f}  reest {row['top1_post_reest']:6.2f}  "
              f"bn {row['top1_post_bn']:6.2f}{ft}  {method.name}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def same_logits_from_file(ckpt: dict, model, im: Images) -> bool:
    """The configuration's .mess file, read back, gives the checkpoint's logits bit for bit."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "net.mess"
        write_mess(path, ckpt)
        back = read_mess(path)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a.load_state_dict(ckpt["model"])
    b.load_state_dict(back["model"])
    x = im.eval_x[:500]
    return bool(torch.equal(logits(a, x), logits(b, x)))


# ---------------------------------------------------------------- report
def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both ratio and top-1, by ratio."""
    out = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(out)


# Numbers sit this far (points) from their marker, in this order of preference: beside, then farther.
OFFSETS = [(dx * r, dy * r) for r in (4, 8, 13)
           for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]
GROUPS = (("MESS", "tab:red", "o"), ("peer", "tab:blue", "s"))
KEY_LINE = 9.0  # points between the key's lines


def plot(rows: list[dict], path: Path, column: str = "top1_post_bn"):
    """One panel per model: ``column`` against ratio, the Pareto front of MESS and of the peers, each point
    numbered, and below each panel a key of the numbers. Writes ``path``; returns the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models_ = list(dict.fromkeys(r["model"] for r in rows))
    number = {m: i + 1 for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}  # same in every panel
    n_key = max(sum(r["model"] == m for r in rows) for m in models_)
    key_h = (n_key + 1) * KEY_LINE / 72
    fig = Figure(figsize=(6.5 * len(models_), 5.2 + key_h), dpi=120)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, len(models_), height_ratios=(5.2, key_h))
    panels = []
    for i, name in enumerate(models_):
        rs = [r for r in rows if r["model"] == name]
        ax = fig.add_subplot(grid[0, i])
        panels.append((ax, panel(ax, rs, column, number)))
        key(fig.add_subplot(grid[1, i]), rs, column, number)
    fig.tight_layout()
    fig.canvas.draw()  # the final layout: labels are placed on the pixels the PNG will have
    for ax, (points, texts, colours) in panels:
        place_labels(ax, points, texts, colours)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=fig.dpi, format="png"))
    return fig


def panel(ax, rs: list[dict], column: str, number: dict):
    """Draw one model's points, fronts and float line; return the points to number (post-training and
    fine-tuned), their numbers and colours."""
    points, texts, colours = [], [], []
    for group, colour, marker in GROUPS:
        sel = [r for r in rs if ("MESS" in r["method"]) == (group == "MESS")]
        ax.scatter([r["ratio"] for r in sel], [r[column] for r in sel], c=colour, marker=marker, s=40,
                   label=f"{group} (post-training)", zorder=3)
        ft = [r for r in sel if r.get("top1_ft") is not None]
        if ft:
            ax.scatter([r["ratio"] for r in ft], [r["top1_ft"] for r in ft], facecolors="none",
                       edgecolors=colour, marker=marker, s=70, label=f"{group} after fine-tuning", zorder=3)
        front = pareto([(r["ratio"], r[column]) for r in sel])
        if front:
            ax.plot(*zip(*front), c=colour, lw=1, alpha=0.6)
        for r, y in [(r, r[column]) for r in sel] + [(r, r["top1_ft"]) for r in ft]:
            points.append((r["ratio"], y))
            texts.append(str(number[r["method"]]))
            colours.append(colour)
    ax.axhline(rs[0]["top1_float"], c="grey", ls="--", lw=1, label=f"float {rs[0]['top1_float']:.2f}%")
    ax.set_title(f"{rs[0]['model']}: top-1 vs whole-model compression (BN corrected)")
    ax.set_xlabel("whole-model compression ratio vs float32 (x)")
    ax.set_ylabel("top-1 (%) on the held-out images")
    lo = min(y for _, y in points)
    ax.set_ylim(max(0, lo - 5), 101.5)  # room above 100 % for a number
    ax.margins(x=0.08)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return points, texts, colours


def key(ax, rs: list[dict], column: str, number: dict) -> None:
    """The panel's key, one line per configuration: number, method, (top-1 %, ratio x)."""
    from matplotlib.transforms import offset_copy
    ax.axis("off")
    for i, r in enumerate(sorted(rs, key=lambda r: number[r["method"]])):
        ft = "" if r.get("top1_ft") is None else f", fine-tuned {r['top1_ft']:.2f} %"
        line = f"{number[r['method']]:>2}  {r['method']}  ({r[column]:.2f} %, {r['ratio']:.2f}x{ft})"
        colour = "tab:red" if "MESS" in r["method"] else "tab:blue"
        ax.text(0, 1, line, transform=offset_copy(ax.transAxes, ax.figure, y=-i * KEY_LINE, units="points"),
                va="top", fontsize=7, family="monospace", color=colour)


def place_labels(ax, points, texts, colours) -> None:
    """Annotate each point with its text at the first of OFFSETS whose box, on the drawn figure, stays in
    the axes and meets no other number, marker or the legend; among those, one that crosses no line if
    any does, else the one meeting the fewest (greedy, in the order given)."""
    from matplotlib.path import Path as MPath
    from matplotlib.transforms import Bbox
    fig = ax.figure
    r = fig.canvas.get_renderer()
    inside = ax.get_window_extent(r).padded(-2)
    h = 5 * fig.dpi / 72  # half a marker, and a margin
    hard = [Bbox.from_extents(x - h, y - h, x + h, y + h) for x, y in ax.transData.transform(points)]
    if ax.get_legend() is not None:
        hard.append(ax.get_legend().get_window_extent(r))
    lines = [MPath(ln.get_transform().transform(ln.get_xydata())) for ln in ax.get_lines()]
    for xy, text, colour in zip(points, texts, colours):
        a = ax.annotate(text, xy, xytext=(0, 0), textcoords="offset points", fontsize=7, color=colour)
        best = None
        for dx, dy in OFFSETS:
            a.xyann = (dx, dy)
            a.set_ha("left" if dx > 0 else "right" if dx < 0 else "center")
            a.set_va("bottom" if dy > 0 else "top" if dy < 0 else "center")
            b = a.get_window_extent(r).padded(1)
            cost = 1000 * (sum(b.overlaps(o) for o in hard) + (not inside.contains(b.x0, b.y0)
                                                               or not inside.contains(b.x1, b.y1)))
            cost += sum(ln.intersects_bbox(b, filled=False) for ln in lines)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, a.get_ha(), a.get_va())
            if cost == 0:
                break
        _, dx, dy, ha, va = best
        a.xyann = (dx, dy)
        a.set_ha(ha)
        a.set_va(va)
        hard.append(a.get_window_extent(r).padded(1))


def fail(prog: str, why: str):
    print(f"{prog}: error: {why}", file=sys.stderr)
    sys.exit(2)


def read_rows(path: str, prog: str) -> list[dict]:
    """The rows a --json run wrote, checked for what plot() reads."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(prog, f"cannot read rows from {path}: {e}")
    need = ("model", "method", "ratio", "top1_float", "top1_post_bn")
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and all(k in r for k in need) for r in rows):
        fail(prog, f"{path} is not a list of rows with {', '.join(need)} (what --json writes)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, nargs="+", default=[20, 56], choices=sorted(FILES))
    p.add_argument("--data", type=Path, default=DATA,
                   help="folder of the subset and akamaster/ (default: %(default)s)")
    p.add_argument("--eval", type=int, default=2000, help="held-out images of the subset (default: 2000)")
    p.add_argument("--eval-data", default=None, help="an .npz with x_test, y_test to evaluate on instead")
    p.add_argument("--bn-images", type=int, default=1024)
    p.add_argument("--ft-epochs", type=int, default=0,
                   help="fine-tune the configurations marked ft (default: 0)")
    p.add_argument("--lr", type=float, default=0.001, help="fine-tuning learning rate (default: 0.001)")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only methods whose name contains one of these")
    p.add_argument("--json", default=None, help="write one row per model and configuration here")
    p.add_argument("--png", default=None, help="the Pareto plot (default: none)")
    p.add_argument("--replot", metavar="ROWS.json", default=None,
                   help="redraw --png from the rows of an earlier --json, measuring nothing (default: none)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if a.replot:
        rows = read_rows(a.replot, p.prog) if a.png else fail(p.prog, "--replot needs --png FILE to draw")
        plot(rows, Path(a.png))
        return rows
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    im = load_images(a.data, a.eval, a.eval_data, a.bn_images)
    methods = [m for m in MESS_METHODS + PEER_METHODS if not a.only or any(s in m.name for s in a.only)]
    t0 = time.perf_counter()
    rows = []
    for depth in a.models:
        rows += run_model(depth, methods, im, a)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s; {torch.get_num_threads()} threads")
    if a.json:
        atomic_write(a.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    if a.png:
        plot(rows, Path(a.png))
    return rows


if __name__ == "__main__":
    main()
