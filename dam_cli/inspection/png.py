"""The PNG of `dam inspect P --png`: every head's true mask as a tile, and the density heatmap at --length.

Takes a `Summary` made with `tile=PNG_TILE` and only draws it; matplotlib is imported inside
`write_png`, so it costs nothing unless asked. Text from the file (the model name) is escaped,
`$` included, so it is never read as mathtext.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from dam_cli.inspection.render import CLASS_SHORT, pct
from dam_cli.text import safe_text

if TYPE_CHECKING:
    from dam_cli.inspection.summary import Summary

PNG_DPI = 100
PNG_TILE = 48  # cells a side of each head's tile (with the 2-unit gap: 50 px at full tile size)
_TILE_GAP = 2
# Margins of the PNG in inches: left (head labels), right (colour bars), and vertical space for
# the title, each panel's title and x labels.
_LEFT, _RIGHT, _TOP, _MID, _BOTTOM = 0.7, 1.3, 0.95, 0.95, 0.55


_MIN_PANEL_W = 8.0  # inches: small profiles get wider tiles so the titles fit


def _png_cell(n_layers: int, n_heads: int) -> float:
    """Inches per head tile: 0.5 (one pixel per tile cell) unless the figure would pass ~24 x 14 in."""
    return min(0.5, 22.0 / n_layers, 5.5 / n_heads)


def _panel(n_layers: int, n_heads: int) -> tuple[float, float]:
    """Width and height of each panel in inches."""
    cell = _png_cell(n_layers, n_heads)
    return max(n_layers * cell, _MIN_PANEL_W), n_heads * cell


def png_size(n_layers: int, n_heads: int) -> tuple[int, int]:
    """Pixel size `(width, height)` of the PNG for a profile shape.

    Layers run along x and heads along y in both panels, each tile 0.5 in (50 px) unless the
    figure would pass about 24 x 14 in; then tiles shrink. Panels are at least 8 in wide.
    E.g. 30 layers x 9 heads: 1700 x 1145; 2 layers x 2 heads: 1000 x 445.
    """
    pw, ph = _panel(n_layers, n_heads)
    w = _LEFT + pw + _RIGHT
    h = _TOP + 2 * ph + _MID + _BOTTOM
    return round(w * PNG_DPI), round(h * PNG_DPI)


def agg_pyplot():
    """`matplotlib.pyplot` on the Agg backend: never a window from a CLI, and no display needed. MPLBACKEND is
    set aside while matplotlib is first imported (then restored): it names an interactive backend dam never
    uses, and a name this matplotlib does not know (a typo, another version's backend) fails that import."""
    import sys

    saved = os.environ.pop("MPLBACKEND", None) if "matplotlib" not in sys.modules else None
    try:
        import matplotlib
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(value: object) -> str:
    """Text from a file for a matplotlib title: escaped, and `$` never starting mathtext."""
    return safe_text(value).replace("$", r"\$")


def write_png(s: Summary, path: str | os.PathLike, force: bool = False) -> tuple[int, int]:
    """Write every head's true mask (one tile per head) and the density heatmap at --length as a PNG.

    Needs `s.tiles` (`summarize(..., tile=PNG_TILE)`). Written atomically (an existing file is
    replaced only with `force`, a special file never); returns the pixel
    size, which is always `png_size(n_layers, n_heads)`.
    """
    import io

    plt = agg_pyplot()
    from matplotlib.colors import LinearSegmentedColormap, PowerNorm

    from dam_cli.atomic import atomic_write_bytes

    assert s.tiles is not None, "summarize(..., tile=PNG_TILE) makes the tiles"
    NL, H, t, _ = s.tiles.shape
    gap = _TILE_GAP
    mosaic = np.full((H * (t + gap) - gap, NL * (t + gap) - gap), np.nan)
    upper = np.triu(np.ones((t, t), dtype=bool), 1)  # cells holding only non-causal pairs
    for lyr in range(NL):
        for h in range(H):
            tile = s.tiles[lyr, h].copy()
            tile[upper] = -1.0  # drawn light grey by set_under: the causal triangle stands out
            r0, c0 = h * (t + gap), lyr * (t + gap)
            mosaic[r0:r0 + t, c0:c0 + t] = tile
    dens = 100 * np.array([[s.head(lyr, h).density_length for lyr in range(NL)] for h in range(H)])  # [H, NL] %

    wpx, hpx = png_size(NL, H)
    W, Hin = wpx / PNG_DPI, hpx / PNG_DPI
    cell = _png_cell(NL, H)
    pw, ph = _panel(NL, H)

    def box(left: float, bottom: float, width: float, height: float) -> tuple[float, float, float, float]:
        return (left / W, bottom / Hin, width / W, height / Hin)

    fig = plt.figure(figsize=(W, Hin), dpi=PNG_DPI)
    rc = s.meta["recipe"]
    fig.suptitle(f"DAM profile of {_plain(s.meta['model'].get('name', '?'))}: PCL {s.pcl}, tau {rc['tau']}, "
                 f"lam {rc['lam']}, mu {rc['mu']}  ({_plain(s.meta['calibration'].get('samples', '?'))} calibration "
                 "samples)",
                 fontsize=13, fontweight="bold", y=1 - 0.2 / Hin, va="top")
    y2 = _BOTTOM
    y1 = _BOTTOM + ph + _MID
    ax1 = fig.add_axes(box(_LEFT, y1, pw, ph))
    ax2 = fig.add_axes(box(_LEFT, y2, pw, ph))
    cax1 = fig.add_axes(box(_LEFT + pw + 0.15, y1, 0.15, ph))
    cax2 = fig.add_axes(box(_LEFT + pw + 0.15, y2, 0.15, ph))

    # White = nothing allowed, darker = more; gamma 0.35 keeps one-pair-wide lines visible.
    cmap = LinearSegmentedColormap.from_list("dam", ["#ffffff", "#6baed6", "#08306b", "#000000"]).with_extremes(
        under="#e6e6e6", bad="#ffffff")
    im1 = ax1.imshow(mosaic, cmap=cmap, norm=PowerNorm(0.35, vmin=0, vmax=1), interpolation="nearest",
                     aspect="auto")
    ax1.set_title(f"true mask M of each head ({s.pcl} x {s.pcl}; query down, key right; grey: not causal; "
                  "corner label: head class, docs/guides/inspect.md)", fontsize=10)
    if cell >= 0.3:  # room for a label in each tile's grey corner
        for lyr in range(NL):
            for h in range(H):
                ax1.text(lyr * (t + gap) + t - 2, h * (t + gap) + 1, CLASS_SHORT[s.head(lyr, h).head_class],
                         ha="right", va="top", fontsize=6, color="#444444")
    im2 = ax2.imshow(dens, cmap="viridis", vmin=0, vmax=max(float(dens.max()), 1e-9), aspect="auto",
                     interpolation="nearest")
    ax2.set_title(f"Stage-2 density at S = {s.length}: % of causal pairs computed (mean {pct(s.density_length, 2)}); "
                  f"at PCL {s.pcl}: mean {pct(s.density_pcl, 2)}", fontsize=10)
    centres_x = np.arange(NL) * (t + gap) + (t - 1) / 2
    centres_y = np.arange(H) * (t + gap) + (t - 1) / 2
    for ax, xs, ys in ((ax1, centres_x, centres_y), (ax2, np.arange(NL), np.arange(H))):
        step = max(1, math.ceil(NL / 40))
        ax.set_xticks(xs[::step], [str(i) for i in range(0, NL, step)], fontsize=8)
        hstep = max(1, math.ceil(H / 32))
        ax.set_yticks(ys[::hstep], [str(i) for i in range(0, H, hstep)], fontsize=8)
        ax.set_xlabel("layer", fontsize=9, labelpad=2)
        ax.set_ylabel("head", fontsize=9)
        ax.tick_params(length=0)
    cb1 = fig.colorbar(im1, cax=cax1, ticks=[0, 0.01, 0.1, 0.3, 0.6, 1])
    cb1.set_label("allowed share of the cell", fontsize=8)
    cb1.ax.tick_params(labelsize=7)
    cb2 = fig.colorbar(im2, cax=cax2)
    cb2.set_label("density (%)", fontsize=8)
    cb2.ax.tick_params(labelsize=7)
    if NL * H <= 1200 and cell >= 0.3:  # numbers stay legible down to about this cell size
        thresh = float(dens.max()) * 0.6
        for h in range(H):
            for lyr in range(NL):
                v = dens[h, lyr]
                ax2.text(lyr, h, f"{v:.2f}" if v < 10 else f"{v:.0f}", ha="center", va="center",
                         fontsize=6.5, color="black" if v > thresh else "white")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)  # no bbox_inches="tight": the size stays png_size()
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue(), force)
    return wpx, hpx
