"""Checks for the PNGs the tools write and the figures they build: a real image of the right size with
something drawn on it, and artists that lie inside the figure and off the data.

Imports no test module (tests/test_layout.py refuses import circles)."""
from pathlib import Path

import numpy as np


def check_png(path, size=None, min_colors: int = 8, min_ink: float = 0.01) -> np.ndarray:
    """Decode ``path`` (a PNG, not only its header) and return its RGB pixels. ``size``: (width, height)
    it must have. Blank or near-blank images fail: fewer than ``min_colors`` distinct colours, or less
    than ``min_ink`` of the pixels not white."""
    from PIL import Image

    path = Path(path)
    with Image.open(path) as img:
        assert img.format == "PNG", f"{path}: {img.format}, not a PNG"
        if size is not None:
            assert img.size == tuple(size), f"{path}: {img.size[0]} x {img.size[1]} pixels, not {size}"
        rgb = np.asarray(img.convert("RGB"))
    colors = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colors) >= min_colors, f"{path}: {len(colors)} colours, a blank image?"
    ink = float((rgb < 250).any(axis=-1).mean())
    assert ink >= min_ink, f"{path}: {ink:.2%} of its pixels drawn"
    return rgb


def extents(fig, *artists):
    """The artists' bounding boxes in the figure's pixels, after one draw (what the PNG shows)."""
    if not hasattr(fig.canvas, "get_renderer"):  # a bare Figure: draw it as savefig would, with Agg
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return [a.get_window_extent(r) for a in artists]


def assert_inside(fig, *artists, slack: float = 1.0) -> None:
    """Every artist (legend, title, axes) lies within the figure: nothing falls off the PNG."""
    box = fig.bbox
    for a, b in zip(artists, extents(fig, *artists)):
        assert (b.x0 >= box.x0 - slack and b.y0 >= box.y0 - slack and b.x1 <= box.x1 + slack
                and b.y1 <= box.y1 + slack), f"{a} at {b} is not inside the figure {box}"


def assert_apart(fig, artist, others) -> None:
    """``artist`` (a legend) covers none of the visible ``others`` (panels, a title)."""
    others = [a for a in others if a.get_visible()]
    b, *boxes = extents(fig, artist, *others)
    for p in boxes:
        assert not b.overlaps(p), f"{artist} at {b} covers the artist at {p}"
