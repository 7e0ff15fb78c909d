"""Drawing `dam inspect` results for the terminal: Rich tables and pictures (the PNG is in png.py).

Takes the dataclasses of `summary`, `compare` and `check` and only draws them; no numbers are computed
here beyond formatting. Everything read from a file (paths, names, recipe values, messages) goes
through `safe_text` into a Rich `Text`, never into markup; tables fit 80 columns without wrapping a value.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from dam_kernels.selection import MASS_SCORES
from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dam_cli.inspection.classes import CLASS_ORDER, HeadClass
from dam_cli.inspection.common import attention_text, ranges
from dam_cli.text import safe_text

if TYPE_CHECKING:
    from dam_cli.inspection.check import CheckResult
    from dam_cli.inspection.compare import Comparison, HeadDiff
    from dam_cli.inspection.summary import HeadPicture, Summary

# Short names of the head classes, in CLASS_ORDER: class-count column headers and the per-head table.
CLASS_SHORT = {
    HeadClass.FULL: "FULL", HeadClass.NEARLY_DENSE: "dense", HeadClass.DIAGONAL_ONLY: "diag",
    HeadClass.SINK_ONLY: "sink", HeadClass.GLOBAL_COLUMNS: "global", HeadClass.LOCAL_BAND: "local",
    HeadClass.MIXED: "mixed",
}
LOOK_SHOWN = 8  # heads listed per rule of "heads worth a look"; --json has them all
COMPARE_SHOWN = 5  # heads listed by `inspect A B` as differing most
# What each rule of "heads worth a look" means (summary.LOOK_RULES), as the heading of its group.
LOOK_HEADINGS = {  # {n} heads, {s} the plural s, {are} "is" or "are", {v} the s of a verb after one head
    "densest": "{n} densest head{s} at --length {length}: they cost the most beyond PCL",
    "least-mass": "{n} head{s} keep{v} the least attention mass in M: the attention they drop is lost "
                  "(candidates for --retrieval-heads)",
    "diagonal-only": "{n} head{s} {are} diagonal-only: beyond PCL a query sees only itself",
    "nearly-dense": "{n} head{s} {are} nearly dense: M keeps at least {dense} of pairs, little to skip",
}
# Colour ramp of the pictures (viridis stops); a cell's shade follows log10 of its allowed fraction.
_STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_EMPTY = "grey15"
_ASCII = " .:-=+*#%@"  # monochrome ramp: " " nothing allowed, then 9 steps of a third of a decade from 0.1%


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


def ascii_shade(f: float) -> str:
    """The ASCII ramp character of an allowed fraction: " " for 0, then one step per third of a decade."""
    return " " if f <= 0 else _ASCII[1 + min(8, int(_level(f) * 9))]


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
                out.append(ascii_shade(float(top[c]) if bottom is None else (float(top[c]) + float(bottom[c])) / 2))
        if r + 2 < g:
            out.append("\n")
    return out


def _legend(colour: bool, width: int = 80) -> Text:
    """The key of the pictures: colour swatches, or every character of the ASCII ramp with its range,
    in lines of at most `width` that never break an entry."""
    if colour:
        t = Text("shade: allowed share of the pairs in a cell (log scale): ")
        for f, label in ((0.0, "0"), (0.001, "0.1%"), (0.01, "1%"), (0.1, "10%"), (1.0, "100%")):
            t.append("  ", style=f"on {_colour(f)}")
            t.append(f" {label}  ")
        return t
    parts = ["shade: allowed share of the pairs in a cell (log scale):", '" " none']
    for k in range(1, len(_ASCII)):  # step k covers [10^((k-1)/3 - 3), 10^(k/3 - 3)), the first from above 0
        low = f"{10 ** ((k - 1) / 3 - 1):.2g}%+" if k > 1 else f"under {10 ** (-2 / 3):.2g}%"
        parts.append(f'"{_ASCII[k]}" {low}')
    text = _fit(parts, width)
    return Text(text.plain.replace(":,", ":", 1))


# =========================================================================================
# Summary
# =========================================================================================

def _fit(parts: list[str], width: int) -> Text:
    """Parts joined by ", ", a new line before a part that would pass `width`: never a break inside one."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width - 1:  # 1 for the comma that ends a line
            lines[-1] += ", " + part
        else:
            if lines:
                lines[-1] += ","
            lines.append(part)
    return Text("\n".join(lines))


def _value(v: Any) -> str:
    """A value from the file as plain, escaped text: strings as they are, other JSON as JSON."""
    return safe_text(v if isinstance(v, str) else json.dumps(v))


def header_table(meta: dict, path: str, width: int = 80, extra: dict[str, list[str]] | None = None) -> Table:
    """Model, shape, attention (windows, soft-cap; only where the model has them), recipe, calibration, schema
    (then `extra` rows): a key/value table `width` columns wide."""
    m, rc, cal = meta["model"], meta["recipe"], meta["calibration"]
    t = Table.grid(padding=(0, 2))
    attention = attention_text(m)
    keys = ["profile", "model", "shape", *(["attention"] if attention else []), "recipe", "calibration", "schema",
            "run-time", *(extra or {})]
    t.add_column(style="bold", no_wrap=True, min_width=max(map(len, keys)))
    t.add_column(overflow="fold")  # lines are cut between parts; only a part longer than a line (a path) folds
    w = max(20, width - max(map(len, keys)) - 2)
    rows = {
        "profile": [safe_text(path)],
        "model": [f"{_value(m.get('name', '?'))} ({_value(m.get('architecture', '?'))})"],
        "shape": [f"{m['n_layers']} layers x {m['n_heads']} query heads ({m['n_kv_heads']} kv heads)",
                  f"head dim {m['head_dim']}", f"max position {_value(m.get('max_position', '?'))}"],
        **({"attention": attention.split("; ")} if attention else {}),
        "recipe": [f"PCL {rc['pcl']}", *(f"{k} {_value(rc[k])}" for k in ("tau", "lam", "mu", "eps")),
                   *(f"{safe_text(k)} {_value(v)}" for k, v in sorted(rc.items())
                     if k not in ("pcl", "tau", "lam", "mu", "eps"))],
        "calibration": [f"{_value(cal.get('samples', '?'))} samples", f"{_value(cal.get('tokens', '?'))} tokens",
                        f"source {_value(cal.get('source', '?'))}",
                        f"tokens sha256 {_value(str(cal.get('token_sha256') or '')[:16] or 'n/a')}"],
        "schema": [f"{_value(meta['schema'])} (written by dam {_value(meta['tool_version'])})"],
        "run-time": _runtime_parts(meta.get("runtime")),
    }
    for key, parts in {**rows, **(extra or {})}.items():
        t.add_row(key, _fit(parts, w))
    return t


def _runtime_parts(runtime: dict | None) -> list[str]:
    """The run-time options a profile recommends (`dam.runtime`), as `dam generate` and `dam eval` apply them
    (each `--dynamic-*` flag given replaces its own field)."""
    dyn = (runtime or {}).get("dynamic")
    if not dyn:
        return ["none (the dynamic part stays off unless --dynamic-* flags are given)"]
    if dyn.get("score") in MASS_SCORES:  # blocks by mass: an antidiagonal estimate, the tail exact
        tail = dyn.get("tail_mass")
        prompt = dyn.get("mass", tail)
        return [f"dynamic blocks of {_value(dyn.get('block'))} by attention mass {_value(prompt)}",
                f"{MASS_SCORES[dyn['score']]} estimate, at most {_value(dyn.get('topk'))}",
                f"exact in the tail{'' if prompt == tail else f' ({_value(tail)} of it)'}, at most "
                f"{_value(dyn.get('tail_topk', dyn.get('topk')))}"]
    parts = [f"dynamic top-{_value(dyn.get('topk'))} x {_value(dyn.get('block'))}"]
    if dyn.get("tail_topk") is not None:
        parts.append(f"tail top-{_value(dyn['tail_topk'])}")
    if dyn.get("tail_mass") is not None:
        parts.append(f"tail mass {_value(dyn['tail_mass'])}")
    parts.append(f"score {_value(dyn.get('score', 'mean'))}")
    return parts


def _table(title: str) -> Table:
    """A compact table: a rule under the header, one space between columns, nothing wraps."""
    return Table(title=Text(title, style="bold"), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, collapse_padding=True, padding=(0, 1))


def _beyond_context(s: Summary) -> str:
    """A note when --length is past the model's context: the masks extend there, the model never runs there."""
    cap = (s.meta.get("model") or {}).get("max_position")
    if isinstance(cap, int) and not isinstance(cap, bool) and 0 < cap < s.length:  # 0: the context is unknown
        return f" (beyond the model's context of {cap:,} tokens: what the masks would keep, never run)"
    return ""


def render_summary(s: Summary, console: Console, layer: int | None = None) -> None:
    """Print the header, per-layer table, optional per-head table and head picture, heads to look at."""
    full = ", full heads" if any(h.head_class is HeadClass.FULL for h in s.heads) else ""
    windowed = ["windowed layers count only pairs within their window"] if any(
        ls.window is not None for ls in s.layers) else []
    console.print(header_table(s.meta, s.path, console.width, {
        "M density": [f"{s.true_density:.4f} ({pct(s.true_density, 2)}) of the causal pairs inside L = {s.pcl}",
                      "the true-mask density `dam profile` prints"],
        "Stage-2": [f"{pct(s.density_pcl)} of causal pairs at S = {s.pcl}", f"{pct(s.density_length)} at --length "
                    f"{s.length}{_beyond_context(s)}",
                    f"means over heads (M, the diagonal guard{full}; beyond PCL, R and C)",
                    *windowed]}))
    console.print()
    t = _table("per layer")
    windowed = any(ls.window is not None for ls in s.layers)
    for name in ("layer", *(["window"] if windowed else []), f"@{s.pcl}", f"@{s.length}", "|R|", "|C|"):
        t.add_column(name, justify="right", no_wrap=True)
    shown = [c for c in CLASS_ORDER if s.layers and c.value in s.layers[0].classes]
    for c in shown:
        t.add_column(CLASS_SHORT[c], justify="right", no_wrap=True)
    for ls in s.layers:
        counts = [str(ls.classes[c.value]) if ls.classes[c.value] else "·" for c in shown]
        window = ([str(ls.window) if ls.window is not None else "global"] if windowed else [])
        t.add_row(str(ls.layer), *window, pct(ls.density_pcl), pct(ls.density_length), f"{ls.offsets_mean:.1f}",
                  f"{ls.columns_mean:.1f}", *counts)
    console.print(t)
    _indented(console, ("window: the layer's sliding window W (global: none); " if windowed else "")
              + f"@{s.pcl}, @{s.length}: Stage-2 density at S = PCL and at --length"
              + (", within the window (pairs i - j < W, over all causal pairs)" if windowed else "")
              + "; |R|, |C|: offsets and columns matched, mean per head; then heads per class", 0)
    console.print(Text("classes (docs/guides/inspect.md): " + ", ".join(
        f"{CLASS_SHORT[c]} = {c.value}" for c in shown if CLASS_SHORT[c].lower() != c.value) +
        f"; sink < {s.rules.sink_width}, local < {s.rules.local_width}, dense >= {pct(s.rules.dense_at, 0)}",
        style="dim"))
    if layer is not None:
        console.print()
        _head_table(s, layer, console)
    if s.picture is not None:
        console.print()
        render_head(s, s.picture, console)
    console.print()
    _render_look(s, console)


def _head_table(s: Summary, layer: int, console: Console) -> None:
    """One layer's heads: class, densities, mass kept, R and C as ranges cut to fit the width."""
    window = s.layers[layer].window
    inside = f" within the window {window}" if window is not None else ""
    ht = Table(title=Text(f"layer {layer}, per head (M: true-mask density; @S: Stage-2 density at S{inside})"),
               title_justify="left", show_edge=False, pad_edge=False)
    for name in ("head", "class", "M", f"@{s.pcl}", f"@{s.length}", "kept", "offsets R", "columns C"):
        ht.add_column(name, justify="left" if name in ("class", "offsets R", "columns C") else "right",
                      no_wrap=True)
    fixed = 4 + 6 + 6 + max(6, len(f"@{s.pcl}")) + max(6, len(f"@{s.length}")) + 5 + 7 * 3  # columns, separators
    limit = max(8, (console.width - fixed) // 2)  # what is left for R and C at this width
    for h in range(s.n_heads):
        x = s.head(layer, h)
        ht.add_row(str(h), CLASS_SHORT[x.head_class], pct(x.true_density), pct(x.density_pcl),
                   pct(x.density_length), pct(x.mass_kept), _short(ranges(x.offsets), limit),
                   _short(ranges(x.columns), limit))
    console.print(ht)
    console.print(Text("kept: the share of the head's attention mass inside M; the full R and C: --layer L "
                       "--head H, or --json", style="dim"))


def _indented(console: Console, text: str, indent: int) -> None:
    """Print `text` as plain text, wrapped lines indented as the first."""
    console.print(Padding(Text(text), (0, 0, 0, indent), expand=False))


def _render_look(s: Summary, console: Console) -> None:
    """Heads worth a look, one group per rule: what the rule means, then its heads (by layer)."""
    console.print(Text("heads worth a look", style="bold"))
    if not s.look:
        _indented(console, "none: no head is unusually dense, diagonal-only, nearly dense or losing attention", 2)
    dense = pct(s.rules.dense_at, 0)
    for rule, heading in LOOK_HEADINGS.items():
        heads = [it for it in s.look if rule in it.rules]
        if not heads:
            continue
        if rule in ("densest", "least-mass"):  # a few heads, each with its figure
            names = [f"layer {it.layer} head {it.head} (" + (pct(s.head(it.layer, it.head).density_length)
                     if rule == "densest" else f"{pct(s.head(it.layer, it.head).mass_kept)} kept") + ")"
                     for it in heads]
        else:  # possibly many: heads grouped by layer
            layers = sorted({it.layer for it in heads})
            names = [f"layer {lyr} head{'s' * (sum(it.layer == lyr for it in heads) > 1)} "
                     + ranges([it.head for it in heads if it.layer == lyr]) for lyr in layers]
        more = f" and {len(names) - LOOK_SHOWN} more layers (all in --json)" if len(names) > LOOK_SHOWN else ""
        one = len(heads) == 1
        _indented(console, heading.format(n=len(heads), s="" if one else "s", are="is" if one else "are",
                                          v="s" if one else "", length=s.length, dense=dense) + ":", 2)
        _indented(console, "; ".join(names[:LOOK_SHOWN]) + more, 4)


def _short(text: str, limit: int = 40) -> str:
    """Ranges text cut at a value boundary to at most `limit` characters, ending ", ..." when cut."""
    if len(text) <= limit:
        return text
    k = text.rfind(",", 0, max(1, limit - 4))
    return (text[:k] if k > 0 else text.split(",")[0]) + ", ..."


def render_head(s: Summary, pic: HeadPicture, console: Console) -> None:
    """One head: its numbers, offsets and columns as ranges, and the two pictures side by side."""
    x = s.head(pic.layer, pic.head)
    window = s.layers[pic.layer].window
    inside = f" (within the layer's window {window})" if window is not None else ""
    console.print(Text(f"layer {pic.layer} head {pic.head}: {x.head_class.value}", style="bold"))
    _indented(console, f"true mask M keeps {pct(x.true_density)} of causal pairs; Stage-2 density{inside} "
              f"{pct(x.density_pcl)} at PCL {s.pcl}, {pct(x.density_length)} at {s.length}; "
              f"attention mass kept {pct(x.mass_kept)}", 2)
    _indented(console, f"offsets R ({len(x.offsets)}): {ranges(x.offsets)}", 2)
    _indented(console, f"columns C ({len(x.columns)}): {ranges(x.columns)}", 2)
    colour = console.color_system is not None
    g = Table.grid(padding=(0, 4))
    g.add_column()
    g.add_column()
    sampled = "" if pic.stage2_exact else ", sampled rows"
    g.add_row(Text(f"true mask M, {s.pcl} x {s.pcl}"),
              Text(f"Stage-2 mask{' AND window' * (window is not None)}, {pic.length} x {pic.length}{sampled}"))
    g.add_row(picture_lines(pic.true_mask, colour), picture_lines(pic.stage2, colour))
    console.print(g)
    console.print(_legend(colour, console.width), style="dim")


# =========================================================================================
# Comparison and check
# =========================================================================================

def render_comparison(c: Comparison, console: Console, layer: int | None = None, head: int | None = None) -> None:
    """Print how B differs from A: recipe changes, per-layer agreement, the heads that differ most."""
    for tag, path, meta in (("A", c.path_a, c.meta_a), ("B", c.path_b, c.meta_b)):
        console.print(Text.assemble((tag, "bold"), f"  {safe_text(path)}  ({_value(meta['model'].get('name', '?'))})"))
    console.print(Text(f"shape {c.n_layers} layers x {c.n_heads} heads, PCL {c.pcl}; densities at PCL and at "
                       f"--length {c.length}; changes are B - A"))
    if not c.same_model:
        console.print(Text("note: model name or config hash differ between A and B", style="yellow"))
    rc = ", ".join(f"{safe_text(k)} {_or_none(a)} -> {_or_none(b)}" for k, (a, b) in c.recipe_changes.items())
    console.print(Text(f"recipe changes: {rc or 'none'}"))
    n = c.n_layers * c.n_heads
    if c.heads_identical == n:
        console.print(Text(f"all {n} heads are identical (M, R and C): the two profiles mask the same pairs"))
    else:
        console.print(Text(f"true-mask IoU: mean {c.iou_mean:.3f}, min {c.iou_min:.3f}; {c.heads_identical} of {n} "
                           "heads identical (M, R and C)"))
    console.print()
    t = _table("per layer")
    for name in ("layer", "IoU mean", "IoU min", "R +", "R -", "C +", "C -", f"Δ@{c.pcl}", f"Δ@{c.length}"):
        t.add_column(name, justify="right", no_wrap=True)
    for d in c.layers:
        t.add_row(str(d.layer), f"{d.iou_mean:.3f}", f"{d.iou_min:.3f}", str(d.offsets_gained),
                  str(d.offsets_lost), str(d.columns_gained), str(d.columns_lost),
                  _signed_pct(d.d_density_pcl), _signed_pct(d.d_density_length))
    console.print(t)
    _indented(console, "IoU: of the true masks; R/C +/-: offsets/columns gained/lost, summed over heads; Δ: change of "
              "Stage-2 density, B's minus A's, in percentage points (pp)", 0)
    console.print()
    if layer is not None:
        rows = [c.head(layer, head)] if head is not None else [c.head(layer, h) for h in range(c.n_heads)]
        title = f"layer {layer}" + (f" head {head}" if head is not None else ", per head")
    else:
        differ = [d for d in c.lowest_iou(n) if not _same(d)]
        if not differ:
            return
        rows = differ[:COMPARE_SHOWN]
        title = (f"the {len(rows)} heads that differ most (lowest true-mask IoU first)" if len(differ) > len(rows)
                 else f"the {len(rows)} heads that differ")
    console.print(Text(title, style="bold"))
    for d in rows:
        cls = d.class_a.value if d.class_a == d.class_b else f"{d.class_a.value} -> {d.class_b.value}"
        _indented(console, f"layer {d.layer} head {d.head}: IoU {d.iou:.3f}, {cls}, Δ@{c.length} "
                  f"{_signed_pct(d.d_density_length)}; {_change('offsets', d.offsets_gained, d.offsets_lost)}; "
                  f"{_change('columns', d.columns_gained, d.columns_lost)}", 2)


def _same(d: HeadDiff) -> bool:
    return d.iou == 1.0 and not (d.offsets_gained or d.offsets_lost or d.columns_gained or d.columns_lost)


def _change(what: str, gained: list[int], lost: list[int]) -> str:
    """`"offsets same"`, or `"offsets gained 3, 5-7, lost none"`."""
    if not gained and not lost:
        return f"{what} same"
    return f"{what} gained {_short(ranges(gained))}, lost {_short(ranges(lost))}"


def _or_none(v: Any) -> str:
    """A recipe value for `inspect A B`: "none" where the profile does not set it (never Python's None)."""
    return "none" if v is None else _value(v)


def _signed_pct(x: float) -> str:
    """A change of density in percentage points ("-65.39 pp" from 69.4% to 4.0%), not a relative change."""
    return f"{100 * x:+.2f} pp"


def render_check(results: list[CheckResult], console: Console) -> None:
    """One line per profile: `ok PATH` or `invalid PATH: reason`; warnings follow, dimmed. Each stays one line
    whatever its length (soft wrap: the terminal folds it), so CI scripts can read them line by line."""
    for r in results:
        if r.valid:
            console.print(Text.assemble(("ok", "green"), f" {safe_text(r.path)}"), soft_wrap=True)
        else:
            console.print(Text.assemble(("invalid", "red"), f" {safe_text(r.path)}: {safe_text(r.errors[0])}"),
                          soft_wrap=True)
            for e in r.errors[1:]:
                console.print(Text(f"  also: {safe_text(e)}"), soft_wrap=True)
        for w in r.warnings:
            console.print(Text(f"  warning: {safe_text(w)}", style="dim"), soft_wrap=True)
