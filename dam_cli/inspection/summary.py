"""What a profile contains, as plain data: the summary of `dam inspect P` and its pictures.

Pure library logic (docs/guides/inspect.md): no printing, no files written. `summarize` takes a path,
makes one load, and returns a frozen `Summary` whose `to_dict()` is JSON-serialisable (NaN
becomes null); `dam_cli/inspection/render.py` draws it.

Densities follow the Stage-2 rule of dam-spec.md: "density at S" is the fraction of the
`S (S + 1) / 2` causal pairs that the mask allows for a sequence of `S` tokens, diagonal guard
included, so "density at PCL" is `|M or diag| / (L (L + 1) / 2)`. "true density" is `M` alone.
On a sliding-window layer (window W, as the profile's model identity states it) the Stage-2 densities
count only the allowed pairs within the window (`0 <= i - j < W`), still over all causal pairs: what
that layer really attends to.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.inspection.classes import CLASS_ORDER, ClassRules, HeadClass, classify_head
from dam_cli.inspection.common import (
    JSON_VERSION,
    POPCOUNT,
    check_length,
    check_selection,
    default_length,
    json_safe,
    layer_softcap,
    layer_windows,
)
from dam_cli.inspection.pictures import HeadPicture, head_picture, pool, tiles  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # torch and the profile module are imported lazily, inside the entry points
    from dam_cli.artifact.profile import Profile

LOOK_TOP = 3  # "densest at S" and "least mass kept" flag this many heads each


@dataclass(frozen=True)
class HeadSummary:
    """One head: class, densities, mass kept (None when unknown), matched offsets and columns."""

    layer: int
    head: int
    head_class: HeadClass
    true_density: float  # |M| / (L (L + 1) / 2)
    density_pcl: float  # Stage-2 density at S = L (M plus the diagonal guard)
    density_length: float  # Stage-2 density at S = --length
    mass_kept: float | None  # share of mean attention mass inside M (stats.mass_kept)
    offsets: list[int]  # R, sorted
    columns: list[int]  # C, sorted

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class"] = d.pop("head_class")
        d["n_offsets"], d["n_columns"] = len(self.offsets), len(self.columns)
        return json_safe(d)


@dataclass(frozen=True)
class LayerSummary:
    """One layer: head means of the densities (within its window) and of |R| and |C|, head-class counts,
    and the layer's sliding window and logit soft-cap (None: global attention, no soft-cap)."""

    layer: int
    density_pcl: float
    density_length: float
    offsets_mean: float
    columns_mean: float
    classes: dict[str, int]  # every class name -> number of heads of this layer in it
    window: int | None = None
    softcap: float | None = None


# The rules of "heads worth a look" (docs/guides/inspect.md), in the order they are shown.
LOOK_RULES = ("densest", "least-mass", "diagonal-only", "nearly-dense")


@dataclass(frozen=True)
class LookItem:
    """A head worth a look: the rules it meets (`LOOK_RULES`) and, for each, why in words."""

    layer: int
    head: int
    head_class: HeadClass
    reasons: list[str]
    rules: list[str] = field(default_factory=list)  # parallel to `reasons`

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"layer": self.layer, "head": self.head, "class": self.head_class,
                          "reasons": self.reasons, "rules": self.rules})


@dataclass(frozen=True)
class Summary:
    """Everything `dam inspect P` shows. `tiles` (for the PNG) is left out of `to_dict()`."""

    path: str
    meta: dict[str, Any]  # ProfileMeta.to_dict(): schema, tool_version, model, recipe, calibration
    n_layers: int
    n_heads: int
    pcl: int
    length: int
    rules: ClassRules
    density_pcl: float  # Stage-2 density at S = L, mean over all heads
    density_length: float
    true_density: float  # |M| / (L (L + 1) / 2), mean over heads: the true-mask density `dam profile` prints
    layers: list[LayerSummary]
    heads: list[HeadSummary]
    look: list[LookItem]
    picture: HeadPicture | None = None  # with --layer and --head
    tiles: np.ndarray | None = field(default=None, repr=False)  # float64 [N_L, H, t, t] for --png

    def head(self, layer: int, head: int) -> HeadSummary:
        return self.heads[layer * self.n_heads + head]

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "kind": "dam-inspect", "json_version": JSON_VERSION, "path": self.path,
            "header": self.meta,
            "shape": {"n_layers": self.n_layers, "n_heads": self.n_heads, "pcl": self.pcl},
            "length": self.length, "class_rules": asdict(self.rules),
            "density_pcl": self.density_pcl, "density_length": self.density_length,
            "true_density": self.true_density,
            "layers": [asdict(x) for x in self.layers],
            "heads": [h.to_dict() for h in self.heads],
            "look": [x.to_dict() for x in self.look],
            "picture": self.picture.to_dict() if self.picture is not None else None,
        })


def stage2_row_counts(packed: np.ndarray, offsets: np.ndarray, columns: np.ndarray, length: int) -> np.ndarray:
    """Allowed keys per query row of the Stage-2 mask, int64 `[..., length]`, from the packed true mask.

    Same contract and rule as `masks.allowed_per_row` (tests check they agree exactly), but reads
    the packed bits with a popcount instead of unpacking and reducing bools, which is about 50
    times faster on CPU and keeps `dam inspect` within its time budget. Rows `i < L` count `M`
    plus the diagonal guard; rows `i >= L` count `|R| + |C| + [0 not in R]` minus the keys both
    an offset and a column reach, `#{c in C : i - c in R}` (nonzero only for `i <= 2L - 2`).
    packed: uint8 `[..., L, ceil(L/8)]`; offsets, columns: bool `[..., L]`.
    """
    L = offsets.shape[-1]
    n_in = min(length, L)
    inside = _row_popcounts(packed, n_in) + _guard_adds(packed, n_in)
    if length <= L:
        return inside
    base, overlap = _beyond_counts(offsets, columns, min(length, 2 * L - 1))
    beyond = np.repeat(base[..., None], length - L, axis=-1)
    beyond[..., :overlap.shape[-1]] -= overlap
    return np.concatenate([inside, beyond], axis=-1)


def _pair_counts(packed: np.ndarray, offsets: np.ndarray, columns: np.ndarray, length: int,
                 window: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs set in `M`, and pairs the Stage-2 mask allows at S = L and at S = `length`, int64 `[...]` each:
    the sums of `stage2_row_counts` without its `length`-long rows (rows from `2L - 1` on count the same).
    With a sliding `window` W only pairs with `i - j < W` are allowed (`_window_beyond` past L)."""
    L = offsets.shape[-1]
    W = None if window is None else min(window, max(length, 2 * L))  # W >= length cuts nothing; int64 stays safe
    if W is not None and W < L:
        rows_m, rows_in = _row_popcounts_within(packed, W)
    else:
        rows_m = rows_in = _row_popcounts(packed, L)
    inside = rows_in + _guard_adds(packed, L)
    at_pcl = inside.sum(-1)
    at_len = inside[..., :length].sum(-1)
    if length > L and W is None:
        base, overlap = _beyond_counts(offsets, columns, min(length, 2 * L - 1))
        at_len = at_pcl + base * (length - L) - overlap.sum(-1)
    elif length > L:
        at_len = at_pcl + _window_beyond(offsets, columns, length, W)
    return rows_m.sum(-1), at_pcl, at_len


def _window_beyond(offsets: np.ndarray, columns: np.ndarray, length: int, W: int) -> np.ndarray:
    """Pairs of rows `L .. length-1` within the window W, int64 `[...]`: per row the offsets below W and the
    guard, the columns `c > i - W`, minus the keys both reach (`c` in C with `i - c` in R below W)."""
    L = offsets.shape[-1]
    Rw = offsets.copy()
    Rw[..., W:] = False  # offsets reaching past the window
    base, overlap = _beyond_counts(Rw, columns, min(length, 2 * L - 1))
    base = base - columns.sum(-1)  # `_beyond_counts` counts every column on every row: counted per row below
    col_rows = (columns * np.maximum(0, np.minimum(length, np.arange(L) + W) - L)).sum(-1)  # rows with i - c < W
    return base * (length - L) + col_rows - overlap.sum(-1)


def _row_popcounts_within(packed: np.ndarray, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys set in each row of the causal `M`, and those of them within the window W (`j > i - W`):
    int64 `[..., L]` each, from one popcount of the bytes, a few MB of temporaries at a time."""
    L = packed.shape[-2]
    total, within = np.empty((2, *packed.shape[:-2], L), dtype=np.int64)
    step = max(1, (1 << 22) // max(1, packed[..., :1, :].size))
    for i0 in range(0, L, step):
        i = np.arange(i0, min(L, i0 + step))
        counts = POPCOUNT[packed[..., i, :]]  # [..., n, nb]
        total[..., i] = counts.sum(-1, dtype=np.int64)
        cut = np.maximum(0, i - W + 1)  # keys j < cut are outside the window
        whole = np.arange(counts.shape[-1])[None, :] < (cut // 8)[:, None]  # the bytes before the one `cut` is in
        before = np.where(whole, counts, 0).sum(-1, dtype=np.int64)
        partial = packed[..., i, cut // 8] & ((1 << (cut % 8)) - 1).astype(np.uint8)
        within[..., i] = total[..., i] - before - POPCOUNT[partial]
    return total, within


def window_pairs(length: int, window: int | None) -> int:
    """Causal pairs within a sliding window W at S = `length` (`sum_i min(i + 1, W)`); all of them without W."""
    S = length
    if window is None or window >= S:
        return S * (S + 1) // 2
    return window * (window + 1) // 2 + (S - window) * window


def _row_popcounts(packed: np.ndarray, n_in: int) -> np.ndarray:
    """Keys set in rows `0 .. n_in-1` of the causal `M`, int64 `[..., n_in]`, a few MB of temporaries at a time."""
    out = np.empty((*packed.shape[:-2], n_in), dtype=np.int64)
    step = max(1, (1 << 22) // max(1, packed[..., :1, :].size))
    for i0 in range(0, n_in, step):
        out[..., i0:i0 + step] = POPCOUNT[packed[..., i0:min(n_in, i0 + step), :]].sum(-1, dtype=np.int64)
    return out


def _guard_adds(packed: np.ndarray, n_in: int) -> np.ndarray:
    """1 where the diagonal guard adds the key `j = i` to row `i < n_in` (its bit in `M` is off), else 0."""
    i = np.arange(n_in)
    return 1 - ((packed[..., i, i // 8] >> (i % 8).astype(np.uint8)) & 1).astype(np.int64)


def _beyond_counts(offsets: np.ndarray, columns: np.ndarray, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows from L on: the keys each allows, `|R| + |C| + [0 not in R]`, int64 `[...]`, and what to take
    off rows `L .. hi-1` for keys reached by both an offset and a column, int64 `[..., hi - L]`."""
    L = offsets.shape[-1]
    R = offsets.reshape(-1, L).astype(np.int64)
    C = columns.reshape(-1, L).astype(np.int64)
    base = R.sum(-1) + C.sum(-1) + (1 - R[:, 0])
    overlap = np.zeros((R.shape[0], max(0, hi - L)), dtype=np.int64)
    for k in range(R.shape[0]):
        if hi > L and R[k].any() and C[k].any():
            overlap[k] = np.convolve(C[k], R[k])[L:hi]  # exact integer convolution
    lead = offsets.shape[:-1]
    return base.reshape(lead), overlap.reshape(*lead, overlap.shape[-1])


def _np(x: Any) -> np.ndarray:
    """A numpy view of a torch tensor or numpy array (summaries accept either profile kind)."""
    return x if isinstance(x, np.ndarray) else x.numpy()


def _layer_numbers(p: Profile, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: true density, density at PCL, density at `length`; float64 `[N_L, H]` each. On a layer
    with a sliding window the Stage-2 densities count only pairs within it.

    Computed layer by layer from pair counts (`_pair_counts`), so memory does not grow with
    `length`: any --length up to `MAX_LENGTH` costs the same.
    """
    L = p.pcl
    packed, R, C = _np(p.true_mask_packed), _np(p.offsets), _np(p.columns)  # packed: [N_L, H, L, ceil(L/8)]
    windows = layer_windows(p.meta.model)
    true_count = np.empty((p.n_layers, p.n_heads), dtype=np.int64)
    at_pcl, at_len = np.empty_like(true_count), np.empty_like(true_count)
    full = _np(p.full_heads) if p.full_heads is not None else np.zeros(true_count.shape, dtype=bool)
    for layer in range(p.n_layers):
        true_count[layer], at_pcl[layer], at_len[layer] = _pair_counts(packed[layer], R[layer], C[layer], length,
                                                                       windows[layer])
    causal_l = L * (L + 1) / 2
    d_pcl, d_len = at_pcl / causal_l, at_len / (length * (length + 1) / 2)
    for layer, W in enumerate(windows):  # retrieval heads allow every causal pair (within the window)
        d_pcl[layer][full[layer]] = window_pairs(L, W) / (L * (L + 1) // 2)  # Python ints: exact past int64
        d_len[layer][full[layer]] = window_pairs(length, W) / (length * (length + 1) // 2)
    return true_count / causal_l, d_pcl, d_len


def head_summaries(p: Profile, length: int,
                   rules: ClassRules) -> tuple[list[HeadSummary], np.ndarray, np.ndarray]:
    """Every head of `p` summarised at `length`, in (layer, head) order, with the density-at-PCL and
    density-at-`length` arrays (float64 `[N_L, H]`) the per-layer means are taken from."""
    true_d, d_pcl, d_len = _layer_numbers(p, length)
    kept = _np(p.stats["stats.mass_kept"]).astype(np.float64)
    R, C = _np(p.offsets), _np(p.columns)
    full = _np(p.full)
    heads = []
    for layer in range(p.n_layers):
        for h in range(p.n_heads):
            mk = float(kept[layer, h])
            heads.append(HeadSummary(
                layer=layer, head=h,
                head_class=classify_head(float(true_d[layer, h]), R[layer, h], C[layer, h], rules,
                                         bool(full[layer, h])),
                true_density=float(true_d[layer, h]), density_pcl=float(d_pcl[layer, h]),
                density_length=float(d_len[layer, h]), mass_kept=mk if math.isfinite(mk) else None,
                offsets=np.flatnonzero(R[layer, h]).tolist(), columns=np.flatnonzero(C[layer, h]).tolist()))
    return heads, d_pcl, d_len


def look_items(heads: list[HeadSummary], top: int = LOOK_TOP) -> list[LookItem]:
    """The heads worth a look, sorted by (layer, head); each with every reason that applies.

    Rules (docs/guides/inspect.md): the `top` densest heads at --length that are not kept on full
    attention on purpose (they dominate the cost); the
    `top` heads keeping the least attention mass (when known); every diagonal-only head (beyond
    L it sees only itself); every nearly-dense head (little to skip inside L).
    """
    found: dict[tuple[int, int], list[tuple[str, str]]] = {}

    def add(hs: HeadSummary, rule: str, why: str) -> None:
        found.setdefault((hs.layer, hs.head), []).append((rule, why))

    sparse = [x for x in heads if x.head_class is not HeadClass.FULL]
    for hs in sorted(sparse, key=lambda x: (-x.density_length, x.layer, x.head))[:top]:
        add(hs, "densest", f"one of the {top} densest at --length: {hs.density_length:.2%} of causal pairs")
    known = [x for x in heads if x.mass_kept is not None]
    for hs in sorted(known, key=lambda x: (x.mass_kept, x.layer, x.head))[:top]:
        add(hs, "least-mass", f"one of the {top} keeping the least attention mass: {hs.mass_kept:.1%} kept in M")
    for hs in heads:
        if hs.head_class is HeadClass.DIAGONAL_ONLY:
            add(hs, "diagonal-only", "diagonal-only: beyond PCL a query sees only itself")
        elif hs.head_class is HeadClass.NEARLY_DENSE:
            add(hs, "nearly-dense", f"nearly-dense: M keeps {hs.true_density:.1%} of pairs, little to skip")
    by_key = {(x.layer, x.head): x for x in heads}
    return [LookItem(layer=k[0], head=k[1], head_class=by_key[k].head_class, reasons=[w for _, w in v],
                     rules=[r for r, _ in v]) for k, v in sorted(found.items())]


def summarize(path: str | os.PathLike, length: int | None = None, *, layer: int | None = None,
              head: int | None = None, grid: int = 48, tile: int | None = None,
              rules: ClassRules = ClassRules()) -> Summary:
    """Load and summarise one profile (`dam inspect P`).

    `length` defaults to `default_length`. With `layer` and `head`, also a `grid`-cell picture of
    that head; with `tile`, every head's true mask downsampled for the PNG. Bad selections raise
    `DamUsageError` after reading only the header; a bad file raises `DamError`.
    """
    from dam_cli.artifact.profile import load_arrays, load_profile, read_meta

    path = os.fspath(path)
    meta = read_meta(path)  # header only: bad options fail before the tensors are read
    check_selection(meta, layer, head)
    S = default_length(meta) if length is None else length
    check_length(S)
    if layer is not None and head is not None:  # the Stage-2 rows of a head read its whole L x L true mask
        from dam_cli.artifact.tensors import check_memory

        check_memory(path, meta.pcl**2, f"picture a head (its {meta.pcl:,} x {meta.pcl:,} true mask)")
    # The table alone needs numpy only: torch (seconds to import) is loaded for pictures only.
    p = load_profile(path) if (layer is not None or tile is not None) else load_arrays(path)
    heads, d_pcl, d_len = head_summaries(p, S, rules)
    windows, softcap = layer_windows(p.meta.model), layer_softcap(p.meta.model)
    layers = []
    for lyr in range(p.n_layers):
        hs = heads[lyr * p.n_heads:(lyr + 1) * p.n_heads]
        # The `full` class exists only in profiles made with --retrieval-heads.
        counts = {c.value: 0 for c in CLASS_ORDER if c is not HeadClass.FULL or p.full_heads is not None}
        for x in hs:
            counts[x.head_class.value] += 1
        layers.append(LayerSummary(
            layer=lyr, density_pcl=float(d_pcl[lyr].mean()), density_length=float(d_len[lyr].mean()),
            offsets_mean=float(np.mean([len(x.offsets) for x in hs])),
            columns_mean=float(np.mean([len(x.columns) for x in hs])), classes=counts,
            window=windows[lyr], softcap=softcap))
    pic = head_picture(p, layer, head, S, grid) if layer is not None and head is not None else None
    return Summary(path=path, meta=p.meta.to_dict(), n_layers=p.n_layers, n_heads=p.n_heads, pcl=p.pcl,
                   length=S, rules=rules, density_pcl=float(d_pcl.mean()), density_length=float(d_len.mean()),
                   true_density=float(np.mean([h.true_density for h in heads])),
                   layers=layers, heads=heads, look=look_items(heads), picture=pic,
                   tiles=tiles(p, tile) if tile else None)
