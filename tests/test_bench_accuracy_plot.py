"""bench/bench_accuracy.py --replot: bench/accuracy.png redrawn from saved rows, its points numbered with
no number on another or on a marker, and a key that names every number's method and figures."""

import copy
import importlib.util
import json
import sys

import pytest
from conftest import ROOT
from matplotlib.text import Annotation
from png_checks import assert_inside, check_png, extents

ROWS = ROOT / "bench" / "accuracy_post.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "bench_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def with_fine_tuning(rows):
    """The saved rows, some fine-tuned as --ft-epochs would leave them: a second, hollow marker each."""
    rows = copy.deepcopy(rows)
    for r in rows:
        if any(s in r["method"] for s in ("N=512", "N=64", "k-means", "4-bit")):
            r["top1_ft"], r["ft_epochs"] = round(min(99.9, r["top1_post_bn"] + 1.7), 2), 8
    return rows


@pytest.mark.parametrize("fine_tuned", [False, True])
def test_numbers_apart_and_key_complete(bench, tmp_path, fine_tuned):
    rows = json.loads(ROWS.read_text())
    rows = with_fine_tuning(rows) if fine_tuned else rows
    png = tmp_path / "accuracy.png"
    fig = bench.plot(rows, png)
    check_png(png, size=fig.canvas.get_width_height())
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(":")[0] for ax in panels] == ["resnet20", "resnet56"]

    labels = [t for ax in panels for t in ax.texts if isinstance(t, Annotation)]
    n_markers = len(rows) + sum(r.get("top1_ft") is not None for r in rows)
    assert len(labels) == n_markers  # one number per marker
    boxes = extents(fig, *labels)
    for i, (a, b) in enumerate(zip(labels, boxes)):
        for c, d in zip(labels[:i], boxes[:i]):
            assert not b.overlaps(d), f"number {a.get_text()} at {b} overlaps {c.get_text()} at {d}"
    for ax in panels:  # no number covers a marker's centre, and none leaves its panel
        inner = ax.get_window_extent()
        own = [(t, b) for t, b in zip(labels, boxes) if t.axes is ax]
        centres = ax.transData.transform([xy for c in ax.collections for xy in c.get_offsets()])
        for t, b in own:
            assert inner.contains(b.x0, b.y0) and inner.contains(b.x1, b.y1), f"{t.get_text()} at {b}"
            assert not any(b.contains(x, y) for x, y in centres), f"number {t.get_text()} covers a marker"

    number = {m: str(i + 1) for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    keys = [ax for ax in fig.axes if not ax.get_title()]
    for ax, name in zip(keys, ("resnet20", "resnet56")):
        lines = [t.get_text() for t in ax.texts]
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: int(number[r["method"]]))
        assert len(lines) == len(mine)
        for line, r in zip(lines, mine):  # e.g. " 5  MESS v2qq learned N=512 q844  (97.15 %, 13.24x)"
            assert line.split()[0] == number[r["method"]] and r["method"] in line
            assert f"({r['top1_post_bn']:.2f} %, {r['ratio']:.2f}x" in line
            ft = r.get("top1_ft")
            assert ("fine-tuned" in line) == (ft is not None)
            assert ft is None or f"fine-tuned {ft:.2f} %" in line
    assert_inside(fig, *[t for ax in keys for t in ax.texts], *labels)
    for ax in panels:  # each number sits beside the point of the row the key gives it
        for t in (t for t in ax.texts if isinstance(t, Annotation)):
            model = ax.get_title().split(":")[0]
            r = next(r for r in rows if number[r["method"]] == t.get_text() and r["model"] == model)
            assert t.xy in ((r["ratio"], r["top1_post_bn"]), (r["ratio"], r.get("top1_ft")))


def test_replot_flag(bench, tmp_path, capsys):
    png = tmp_path / "a.png"
    rows = bench.main(["--replot", str(ROWS), "--png", str(png)])
    assert rows == json.loads(ROWS.read_text())
    check_png(png, min_colors=50)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"model": "resnet20"}]')
    for argv, why in ((["--replot", str(ROWS)], "--replot needs --png"),
                      (["--replot", str(bad), "--png", str(png)], "is not a list of rows"),
                      (["--replot", str(tmp_path / "none.json"), "--png", str(png)], "cannot read rows")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and why in err and len(err.strip().splitlines()) == 1, err
