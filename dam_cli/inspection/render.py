"""Drawing `dam inspect` results: Rich tables and pictures for the terminal, a PNG for reports.

Takes the dataclasses of `summary`, `compare` and `check` and only draws them; no numbers are computed here
beyond formatting. matplotlib is imported inside `write_png`, so it costs nothing unless asked.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dam_cli.inspection.classes import CLASS_ORDER, HeadClass
from dam_cli.inspection.common import ranges

if TYPE_CHECKING:
    from dam_cli.inspection.check import CheckResult
    from dam_cli.inspection.compare import Comparison
    from dam_cli.inspection.summary import HeadPicture, Summary

# Short column headers of the class counts, in CLASS_ORDER.
CLASS_SHORT = {
    HeadClass.FULL: "FULL", HeadClass.NEARLY_DENSE: "dense", HeadClass.DIAGONAL_ONLY: "diag",
    HeadClass.SINK_ONLY: "sink", HeadClass.GLOBAL_COLUMNS: "global", HeadClass.LOCAL_BAND: "local",
    HeadClass.MIXED: "mixed",
}
LOOK_SHOWN = 12  # the terminal lists this many heads worth a look; --json has them all
# Colour ramp of the pictures (viridis stops); a cell's shade follows log10 of its allowed fraction.
_STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_EMPTY = "grey15"
_ASCII = " .:-=+*#%@"  # monochrome ramp, used when the console has no colour


def pct(x: float | None, digits: int = 1) -> str:
    """A fraction as a percentage with `digits` decimals, more below 1% so small values never read
    as 0.0%; `"n/a"` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if 0 < abs(x) < 0.01:
        digits = max(digits, 1 - math.floor(math.log10(100 * abs(x))))  # two significant digits
    return f"{100 * x:.{digits}f}%"


def _level(f: float) -> float:
    """Position of an allowed fraction on the log ramp: 0.001 or less -> 0, 1 -> 1."""
    return (math.log10(max(f, 1e-3)) + 3) / 3


def _colour(f: float) -> str:
    if f <= 0:
        return _EMPTY
    t = _level(f) * (len(_STOPS) - 1)
    k = min(int(t), len(_STOPS) - 2)
    a, b, w = _STOPS[k], _STOPS[k + 1], t - k
    r, g, bl = (round(a[i] + (b[i] - a[i]) * w) for i in range(3))
    return f"rgb({r},{g},{bl})"


def picture_lines(cells: np.ndarray, colour: bool) -> Text:
    """A `[g, g]` fraction grid as text: half-block characters in colour (two cells a character
    vertically), or an ASCII ramp of two-row averages without colour."""
    g = cells.shape[0]
    out = Text()
    for r in range(0, g, 2):
        top = cells[r]
        bottom = cells[r + 1] if r + 1 < g else None
        for c in range(cells.shape[1]):
            if colour:
                bg = _colour(float(bottom[c])) if bottom is not None else "default"
                out.append("▀", style=f"{_colour(float(top[c]))} on {bg}")
            else:
                f = float(top[c]) if bottom is None else (float(top[c]) + float(bottom[c])) / 2
                out.append(" " if f <= 0 else _ASCII[1 + min(8, int(_level(f) * 8.999))])
        if r + 2 < g:
            out.append("\n")
    return out


def _legend(colour: bool) -> Text:
    t = Text("shade: allowed fraction of the pairs in a cell (log scale)  ")
    for f, label in ((0.0, "0"), (0.001, "0.1%"), (0.01, "1%"), (0.1, "10%"), (1.0, "100%")):
        if colour:
            t.append("  ", style=f"on {_colour(f)}")
        else:
            t.append(" " if f <= 0 else _ASCII[1 + min(8, int(_level(f) * 8.999))])
        t.append(f" {label}  ")
    return t


# =========================================================================================
# Summary
# =========================================================================================

def _plain_row(t: Table, key: str, value: str) -> None:
    """A key/value row; values come from files, so they are plain text, never Rich markup."""
    t.add_row(key, Text(str(value)))


def header_table(meta: dict, path: str, length: int | None = None) -> Table:
    """Model, shape, recipe, calibration, schema: a two-column key/value table."""
    m, rc, cal = meta["model"], meta["recipe"], meta["calibration"]
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    _plain_row(t, "profile", path)
    _plain_row(t, "model", f"{m.get('name', '?')} ({m.get('architecture', '?')})")
    _plain_row(t, "shape", f"{m['n_layers']} layers x {m['n_heads']} query heads ({m['n_kv_heads']} kv heads), "
                       f"head dim {m['head_dim']}, max position {m.get('max_position', '?')}")
    extra = {k: v for k, v in rc.items() if k not in ("pcl", "tau", "lam", "mu", "eps")}
    recipe = f"PCL {rc['pcl']}, tau {rc['tau']}, lam {rc['lam']}, mu {rc['mu']}, eps {rc['eps']}"
    if extra:
        recipe += ", " + ", ".join(f"{k} {v}" for k, v in sorted(extra.items()))
    _plain_row(t, "recipe", recipe)
    sha = str(cal.get("token_sha256") or "")
    _plain_row(t, "calibration", f"{cal.get('samples', '?')} samples, {cal.get('tokens', '?')} tokens, "
                             f"source {cal.get('source', '?')}, tokens sha256 {sha[:16] or 'n/a'}")
    _plain_row(t, "schema", f"{meta['schema']} (written by dam {meta['tool_version']})")
    return t


def render_summary(s: Summary, console: Console, layer: int | None = None) -> None:
    """Print the header, per-layer table, optional per-head table and head picture, heads to look at."""
    console.print(header_table(s.meta, s.path))
    console.print(Text.assemble(("density", "bold"), f"  {pct(s.density_pcl)} of causal pairs at PCL {s.pcl}, "
                                f"{pct(s.density_length)} at --length {s.length} (mean over heads)"))
    console.print()
    t = Table(title="per layer (densities are head means; |R|, |C| mean matched offsets, columns)",
              title_justify="left", show_edge=False, pad_edge=False)
    t.add_column("layer", justify="right")
    t.add_column(f"@{s.pcl}", justify="right")
    t.add_column(f"@{s.length}", justify="right")
    t.add_column("|R|", justify="right")
    t.add_column("|C|", justify="right")
    shown = [c for c in CLASS_ORDER if s.layers and c.value in s.layers[0].classes]
    for c in shown:
        t.add_column(CLASS_SHORT[c], justify="right")
    for ls in s.layers:
        counts = [str(ls.classes[c.value]) if ls.classes[c.value] else "·" for c in shown]
        t.add_row(str(ls.layer), pct(ls.density_pcl), pct(ls.density_length), f"{ls.offsets_mean:.1f}",
                  f"{ls.columns_mean:.1f}", *counts)
    console.print(t)
    console.print(Text("classes (docs/inspect.md): FULL = retrieval head on full attention, dense = nearly-dense, "
                       "diag = diagonal-only, sink = sink-only, "
                       f"global = global-columns, local = local-band; sink < {s.rules.sink_width}, "
                       f"local < {s.rules.local_width}, dense >= {pct(s.rules.dense_at, 0)}", style="dim"))
    if layer is not None:
        console.print()
        ht = Table(title=f"layer {layer}, per head", title_justify="left", show_edge=False, pad_edge=False)
        for name in ("head", "class", "M", f"@{s.pcl}", f"@{s.length}", "mass kept", "offsets R", "columns C"):
            ht.add_column(name, justify="left" if name in ("class", "offsets R", "columns C") else "right")
        for h in range(s.n_heads):
            x = s.head(layer, h)
            ht.add_row(str(h), x.head_class.value, pct(x.true_density), pct(x.density_pcl), pct(x.density_length),
                       pct(x.mass_kept), _short(ranges(x.offsets)), _short(ranges(x.columns)))
        console.print(ht)
    if s.picture is not None:
        console.print()
        render_head(s, s.picture, console)
    console.print()
    console.print(Text("heads worth a look", style="bold"))
    if not s.look:
        console.print("  none")
    for it in s.look[:LOOK_SHOWN]:
        console.print(f"  layer {it.layer} head {it.head} ({it.head_class.value}): " + "; ".join(it.reasons),
                      highlight=False)
    if len(s.look) > LOOK_SHOWN:
        console.print(f"  ... and {len(s.look) - LOOK_SHOWN} more (all in --json)", style="dim")


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3].rsplit(",", 1)[0] + ", ..."


def render_head(s: Summary, pic: HeadPicture, console: Console) -> None:
    """One head: its numbers, offsets and columns as ranges, and the two pictures side by side."""
    x = s.head(pic.layer, pic.head)
    console.print(Text(f"layer {pic.layer} head {pic.head}: {x.head_class.value}", style="bold"))
    console.print(f"  true mask M keeps {pct(x.true_density)} of causal pairs; Stage-2 density "
                  f"{pct(x.density_pcl)} at PCL {s.pcl}, {pct(x.density_length)} at {s.length}; "
                  f"attention mass kept {pct(x.mass_kept)}", highlight=False)
    console.print(f"  offsets R ({len(x.offsets)}): {ranges(x.offsets)}", highlight=False)
    console.print(f"  columns C ({len(x.columns)}): {ranges(x.columns)}", highlight=False)
    colour = console.color_system is not None
    g = Table.grid(padding=(0, 4))
    g.add_column()
    g.add_column()
    sampled = "" if pic.stage2_exact else ", sampled rows"
    g.add_row(Text(f"true mask M, {s.pcl} x {s.pcl}"),
              Text(f"Stage-2 mask, {pic.length} x {pic.length}{sampled}"))
    g.add_row(picture_lines(pic.true_mask, colour), picture_lines(pic.stage2, colour))
    console.print(g)
    console.print(_legend(colour), style="dim")


# =========================================================================================
# Comparison and check
# =========================================================================================

def render_comparison(c: Comparison, console: Console, layer: int | None = None, head: int | None = None) -> None:
    """Print how B differs from A: recipe changes, per-layer agreement, the least similar heads."""
    console.print(Text.assemble(("A", "bold"), f"  {c.path_a}  ({c.meta_a['model'].get('name', '?')})"))
    console.print(Text.assemble(("B", "bold"), f"  {c.path_b}  ({c.meta_b['model'].get('name', '?')})"))
    console.print(f"shape {c.n_layers} layers x {c.n_heads} heads, PCL {c.pcl}; densities at PCL and at "
                  f"--length {c.length}; changes are B - A", highlight=False)
    if not c.same_model:
        console.print("note: model name or config hash differ between A and B", style="yellow")
    rc = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in c.recipe_changes.items()) or "none"
    console.print(f"recipe changes: {rc}", highlight=False)
    console.print(f"true-mask IoU: mean {c.iou_mean:.3f}, min {c.iou_min:.3f}; "
                  f"{c.heads_identical} of {c.n_layers * c.n_heads} heads identical (M, R and C)", highlight=False)
    console.print()
    t = Table(title="per layer (R/C: offsets/columns gained +, lost -, summed over heads)",
              title_justify="left", show_edge=False, pad_edge=False)
    for name in ("layer", "IoU mean", "IoU min", "R +", "R -", "C +", "C -", f"Δ@{c.pcl}", f"Δ@{c.length}"):
        t.add_column(name, justify="right")
    for d in c.layers:
        t.add_row(str(d.layer), f"{d.iou_mean:.3f}", f"{d.iou_min:.3f}", str(d.offsets_gained),
                  str(d.offsets_lost), str(d.columns_gained), str(d.columns_lost),
                  _signed_pct(d.d_density_pcl), _signed_pct(d.d_density_length))
    console.print(t)
    console.print()
    if layer is not None:
        rows = [c.head(layer, head)] if head is not None else [c.head(layer, h) for h in range(c.n_heads)]
        title = f"layer {layer}" + (f" head {head}" if head is not None else ", per head")
    else:
        rows = c.lowest_iou(5)
        title = "heads whose true masks agree least"
    console.print(Text(title, style="bold"))
    for d in rows:
        cls = d.class_a.value if d.class_a == d.class_b else f"{d.class_a.value} -> {d.class_b.value}"
        console.print(f"  layer {d.layer} head {d.head}: IoU {d.iou:.3f}, {cls}, Δ@{c.length} "
                      f"{_signed_pct(d.d_density_length)}; offsets +[{ranges(d.offsets_gained)}] "
                      f"-[{ranges(d.offsets_lost)}], columns +[{ranges(d.columns_gained)}] "
                      f"-[{ranges(d.columns_lost)}]", highlight=False)


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.2f}%"


def render_check(results: list[CheckResult], console: Console) -> None:
    """One line per profile: `ok PATH` or `invalid PATH: reason`; warnings follow, dimmed."""
    for r in results:
        if r.valid:
            console.print(Text.assemble(("ok", "green"), f" {r.path}"))
        else:
            console.print(Text.assemble(("invalid", "red"), f" {r.path}: {r.errors[0]}"))
            for e in r.errors[1:]:
                console.print(f"  also: {e}", highlight=False)
        for w in r.warnings:
            console.print(f"  warning: {w}", style="dim", highlight=False)


# =========================================================================================
# PNG
# =========================================================================================

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


def write_png(s: Summary, path: str | os.PathLike) -> tuple[int, int]:
    """Write every head's true mask (one tile per head) and the density heatmap at --length as a PNG.

    Needs `s.tiles` (`summarize(..., tile=PNG_TILE)`). Written atomically; returns the pixel
    size, which is always `png_size(n_layers, n_heads)`.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")  # never a window from a CLI, and no display needed
    import matplotlib.pyplot as plt
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
    fig.suptitle(f"DAM profile of {s.meta['model'].get('name', '?')}: PCL {s.pcl}, tau {rc['tau']}, "
                 f"lam {rc['lam']}, mu {rc['mu']}  ({s.meta['calibration'].get('samples', '?')} calibration samples)",
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
                  "corner label: head class, docs/inspect.md)", fontsize=10)
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
    atomic_write_bytes(path, buf.getvalue())
    return wpx, hpx
