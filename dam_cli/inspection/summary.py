"""What a profile contains, as plain data: summary, head classes, pictures, comparison, check.

Pure library logic for `dam inspect` (docs/inspect.md): no printing, no files written. Every
entry point takes paths, makes one load, and returns a frozen dataclass whose `to_dict()` is
JSON-serialisable (NaN becomes null); `dam_cli/render.py` draws them.

Densities follow the Stage-2 rule of dam-spec.md: "density at S" is the fraction of the
`S (S + 1) / 2` causal pairs that the mask allows for a sequence of `S` tokens, diagonal guard
included, so "density at PCL" is `|M or diag| / (L (L + 1) / 2)`. "true density" is `M` alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.errors import DamError, DamUsageError

if TYPE_CHECKING:  # torch and the profile module are imported lazily, inside the entry points
    from dam_cli.artifact.profile import Profile, ProfileMeta

JSON_VERSION = 1  # bump when a key of the JSON shape changes meaning or disappears
DEFAULT_LENGTH_FACTOR = 8  # default --length is 8 x PCL (capped at the model's max position)
LOOK_TOP = 3  # "densest at S" and "least mass kept" flag this many heads each
STATS_ATOL = 1e-6  # float32 stats vs. values recomputed from M (float32 rounding is ~6e-8)


# =========================================================================================
# Head classes
# =========================================================================================

class HeadClass(str, Enum):
    """What a head does, judged from `(M, R, C)`; the first matching rule wins (docs/inspect.md).

    Offset 0 and edge patterns (see `ClassRules.edge_cells`) are ignored by every rule.
    """

    FULL = "full"  # a retrieval head kept on full attention (the --retrieval-heads option)
    NEARLY_DENSE = "nearly-dense"  # M keeps at least `dense_at` of the causal pairs
    DIAGONAL_ONLY = "diagonal-only"  # no offset, no column: beyond L a query sees itself only
    SINK_ONLY = "sink-only"  # no offset; every column is a sink (c < sink_width)
    GLOBAL_COLUMNS = "global-columns"  # no offset; some column c >= sink_width
    LOCAL_BAND = "local-band"  # offsets all below local_width (sinks allowed), no global column
    MIXED = "mixed"  # anything else: a band plus global columns, or an offset >= local_width


CLASS_ORDER: tuple[HeadClass, ...] = tuple(HeadClass)


@dataclass(frozen=True)
class ClassRules:
    """Thresholds of the head classes; defaults are documented in docs/inspect.md."""

    sink_width: int = 4  # columns below this are attention sinks (BOS and the first few tokens)
    local_width: int = 64  # offsets below this make a local band; at or above, a long-range diagonal
    dense_at: float = 0.5  # a true density at or above this makes a head nearly dense
    edge_fraction: float = 0.125  # patterns shorter than this share of L are edge patterns

    def edge_cells(self, L: int) -> int:
        """Patterns with fewer cells than this are edge patterns: `max(2, floor(edge_fraction * L))`.

        Diagonal `r` and column `c` hold `L - r` and `L - c` cells. The last few of each sit in
        the corners of `M`, where the sink column and the local band alone reach `mu`, so they
        match whatever the head does (e.g. offset 511 and columns 500-511 at L = 512). They are
        still part of R and C and still extend beyond L; the classes just do not read them.
        """
        return max(2, int(self.edge_fraction * L))


def classify_head(true_density: float, offsets: np.ndarray, columns: np.ndarray,
                  rules: ClassRules = ClassRules(), full: bool = False) -> HeadClass:
    """The class of one head from its true density and bool `[L]` offsets / columns.

    Offset 0 is ignored (the diagonal guard allows it anyway), and so are edge patterns.
    A head the profile keeps on full attention is `full`, whatever its masks.
    """
    if full:
        return HeadClass.FULL
    L = offsets.shape[-1]
    last = L - rules.edge_cells(L)  # pattern x holds L - x cells: x > last is an edge pattern
    r = np.flatnonzero(offsets)
    r = r[(r > 0) & (r <= last)]
    c = np.flatnonzero(columns)
    c = c[c <= last]
    has_global = bool((c >= rules.sink_width).any())
    if true_density >= rules.dense_at:
        return HeadClass.NEARLY_DENSE
    if r.size == 0:
        if c.size == 0:
            return HeadClass.DIAGONAL_ONLY
        return HeadClass.GLOBAL_COLUMNS if has_global else HeadClass.SINK_ONLY
    if int(r.max()) < rules.local_width and not has_global:
        return HeadClass.LOCAL_BAND
    return HeadClass.MIXED


def ranges(indices: list[int] | np.ndarray) -> str:
    """Sorted indices as compact ranges: `[0, 1, 2, 5, 7, 8]` -> `"0-2, 5, 7-8"`; `"none"` if empty."""
    idx = sorted(int(i) for i in indices)
    if not idx:
        return "none"
    parts: list[str] = []
    start = prev = idx[0]
    for i in idx[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


# =========================================================================================
# Result types (their to_dict() is the documented JSON shape)
# =========================================================================================

def _clean(o: Any) -> Any:
    """Make a nested structure JSON-safe: NaN/inf -> None, enums -> values, numpy -> Python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


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
        return _clean(d)


@dataclass(frozen=True)
class LayerSummary:
    """One layer: head means of the densities and of |R| and |C|, and head-class counts."""

    layer: int
    density_pcl: float
    density_length: float
    offsets_mean: float
    columns_mean: float
    classes: dict[str, int]  # every class name -> number of heads of this layer in it


@dataclass(frozen=True)
class LookItem:
    """A head worth a look and why (docs/inspect.md lists the rules)."""

    layer: int
    head: int
    head_class: HeadClass
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return _clean({"layer": self.layer, "head": self.head, "class": self.head_class,
                       "reasons": self.reasons})


@dataclass(frozen=True)
class HeadPicture:
    """Downsampled pictures of one head: each cell is the fraction of its pairs that are allowed."""

    layer: int
    head: int
    length: int
    true_mask: np.ndarray  # float64 [g, g] over the L x L true mask
    stage2: np.ndarray  # float64 [g2, g2] over the S x S Stage-2 mask
    stage2_exact: bool  # False when rows were sampled (long S): see head_picture()

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "length": self.length,
                "true_mask": np.round(self.true_mask, 4).tolist(),
                "stage2": np.round(self.stage2, 4).tolist(), "stage2_exact": self.stage2_exact}


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
    density_pcl: float  # mean over all heads
    density_length: float
    layers: list[LayerSummary]
    heads: list[HeadSummary]
    look: list[LookItem]
    picture: HeadPicture | None = None  # with --layer and --head
    tiles: np.ndarray | None = field(default=None, repr=False)  # float64 [N_L, H, t, t] for --png

    def head(self, layer: int, head: int) -> HeadSummary:
        return self.heads[layer * self.n_heads + head]

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "kind": "dam-inspect", "json_version": JSON_VERSION, "path": self.path,
            "header": self.meta,
            "shape": {"n_layers": self.n_layers, "n_heads": self.n_heads, "pcl": self.pcl},
            "length": self.length, "class_rules": asdict(self.rules),
            "density_pcl": self.density_pcl, "density_length": self.density_length,
            "layers": [asdict(x) for x in self.layers],
            "heads": [h.to_dict() for h in self.heads],
            "look": [x.to_dict() for x in self.look],
            "picture": self.picture.to_dict() if self.picture is not None else None,
        })


@dataclass(frozen=True)
class HeadDiff:
    """One head of B against A: IoU of true masks, patterns gained/lost, B - A density changes."""

    layer: int
    head: int
    iou: float  # |M_A and M_B| / |M_A or M_B|; 1.0 when both are empty
    class_a: HeadClass
    class_b: HeadClass
    offsets_gained: list[int]  # in R_B, not in R_A
    offsets_lost: list[int]  # in R_A, not in R_B
    columns_gained: list[int]
    columns_lost: list[int]
    d_density_pcl: float  # density_B - density_A at S = L
    d_density_length: float  # density_B - density_A at S = --length


@dataclass(frozen=True)
class LayerDiff:
    """One layer: IoU mean and min over heads, pattern gains/losses summed, mean density change."""

    layer: int
    iou_mean: float
    iou_min: float
    offsets_gained: int
    offsets_lost: int
    columns_gained: int
    columns_lost: int
    d_density_pcl: float
    d_density_length: float


@dataclass(frozen=True)
class Comparison:
    """`dam inspect A B`: B compared with A, head by head."""

    path_a: str
    path_b: str
    meta_a: dict[str, Any]
    meta_b: dict[str, Any]
    n_layers: int
    n_heads: int
    pcl: int
    length: int
    same_model: bool  # model name and config hash agree
    recipe_changes: dict[str, list[Any]]  # recipe key -> [value in A, value in B], differing keys only
    iou_mean: float
    iou_min: float
    heads_identical: int  # heads with the same M, R and C
    layers: list[LayerDiff]
    heads: list[HeadDiff]

    def head(self, layer: int, head: int) -> HeadDiff:
        return self.heads[layer * self.n_heads + head]

    def lowest_iou(self, k: int = 5) -> list[HeadDiff]:
        """The `k` heads whose true masks agree least (ties in layer, head order)."""
        return sorted(self.heads, key=lambda d: (d.iou, d.layer, d.head))[:k]

    def to_dict(self) -> dict[str, Any]:
        return _clean({
            "kind": "dam-compare", "json_version": JSON_VERSION, "a": self.path_a, "b": self.path_b,
            "header_a": self.meta_a, "header_b": self.meta_b,
            "shape": {"n_layers": self.n_layers, "n_heads": self.n_heads, "pcl": self.pcl},
            "length": self.length, "same_model": self.same_model,
            "recipe_changes": self.recipe_changes, "iou_mean": self.iou_mean,
            "iou_min": self.iou_min, "heads_identical": self.heads_identical,
            "layers": [asdict(x) for x in self.layers],
            "heads": [{**{k: v for k, v in asdict(h).items()}, "class_a": h.class_a, "class_b": h.class_b}
                      for h in self.heads],
        })


@dataclass(frozen=True)
class CheckResult:
    """`--check`: valid iff `errors` is empty. Warnings never fail a check."""

    path: str
    valid: bool
    errors: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return _clean({"kind": "dam-check", "json_version": JSON_VERSION, **asdict(self)})


# =========================================================================================
# Shared helpers
# =========================================================================================

def default_length(meta: ProfileMeta) -> int:
    """The --length used when none is given: 8 x PCL, capped at the model's max position (>= PCL)."""
    want = DEFAULT_LENGTH_FACTOR * meta.pcl
    cap = meta.model.get("max_position")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap >= meta.pcl:
        want = min(want, cap)
    return want


def shape_text(meta: ProfileMeta) -> str:
    """`"30 layers x 9 heads, PCL 512"`: how errors and headers name a profile's shape."""
    return f"{meta.n_layers} layers x {meta.n_heads} heads, PCL {meta.pcl}"


def check_selection(meta: ProfileMeta, layer: int | None, head: int | None) -> None:
    """Raise `DamUsageError` unless `--layer`/`--head` name a head of this profile."""
    if head is not None and layer is None:
        raise DamUsageError("--head needs --layer: pass both, e.g. --layer 3 --head 0")
    if layer is not None and not 0 <= layer < meta.n_layers:
        raise DamUsageError(f"--layer {layer} is out of range: this profile has layers 0..{meta.n_layers - 1}")
    if head is not None and not 0 <= head < meta.n_heads:
        raise DamUsageError(f"--head {head} is out of range: this profile has heads 0..{meta.n_heads - 1}")


def _check_length(length: int) -> None:
    if length < 1:
        raise DamUsageError(f"--length must be at least 1, got {length}")


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # bits set per byte


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
    lead = offsets.shape[:-1]
    n_in = min(length, L)
    rows_m = _POPCOUNT[packed[..., :n_in, :]].sum(-1, dtype=np.int64)  # M is causal: row popcount
    i = np.arange(n_in)
    diag = (packed[..., i, i // 8] >> (i % 8).astype(np.uint8)) & 1
    inside = rows_m + (1 - diag.astype(np.int64))
    if length <= L:
        return inside
    R = offsets.reshape(-1, L).astype(np.int64)
    C = columns.reshape(-1, L).astype(np.int64)
    base = R.sum(-1) + C.sum(-1) + (1 - R[:, 0])  # [n]
    beyond = np.repeat(base[:, None], length - L, axis=1)
    hi = min(length, 2 * L - 1)  # rows L .. hi-1 can hold a key reached by both
    for k in range(R.shape[0]):
        if R[k].any() and C[k].any():
            beyond[k, : hi - L] -= np.convolve(C[k], R[k])[L:hi]  # exact integer convolution
    return np.concatenate([inside, beyond.reshape(*lead, length - L)], axis=-1)


def causal_diagonal_counts(mask: np.ndarray) -> np.ndarray:
    """Cells set on each diagonal `r = i - j` of causal bool `[..., L, L]` masks: int64 `[..., L]`.

    Same result as `masks.diagonal_counts` for causal masks (tests check it), in one reduction:
    cell (i, j) sits at flat index `i (L + 1) + (j - i)`, so viewed `L + 1` wide, diagonal
    `r > 0` is column `L + 1 - r` (row i - 1) and diagonal 0 is column 0. Upper diagonals would
    share those columns, which is why the mask must be causal.
    """
    L = mask.shape[-1]
    lead = mask.shape[:-2]
    flat = np.concatenate([mask.reshape(*lead, L * L), np.zeros((*lead, L), dtype=mask.dtype)], axis=-1)
    cols = flat.reshape(*lead, L, L + 1).sum(-2, dtype=np.int64)  # [..., L + 1]
    return np.concatenate([cols[..., :1], cols[..., L:1:-1]], axis=-1)  # r = 0, then r = 1 .. L-1


def _np(x: Any) -> np.ndarray:
    """A numpy view of a torch tensor or numpy array (summaries accept either profile kind)."""
    return x if isinstance(x, np.ndarray) else x.numpy()


def _layer_numbers(p: Profile, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: true density, density at PCL, density at `length`; float64 `[N_L, H]` each.

    One row count at `max(length, L)` serves both lengths: the first `min(S, L)` rows of the
    Stage-2 mask are the same at every length.
    """
    L = p.pcl
    span = max(length, L)
    packed = _np(p.true_mask_packed)  # [N_L, H, L, ceil(L/8)]
    rows = stage2_row_counts(packed, _np(p.offsets), _np(p.columns), span)  # [N_L, H, span]
    if p.full_heads is not None:  # retrieval heads allow every causal pair: row i has i + 1 keys
        rows = np.where(_np(p.full_heads)[..., None], np.arange(1, span + 1, dtype=np.int64), rows)
    true_count = _POPCOUNT[packed].sum((-1, -2), dtype=np.int64)
    causal_l = L * (L + 1) / 2
    return (true_count / causal_l, rows[..., :L].sum(-1) / causal_l,
            rows[..., :length].sum(-1) / (length * (length + 1) / 2))


def _heads(p: Profile, length: int, rules: ClassRules) -> tuple[list[HeadSummary], np.ndarray, np.ndarray]:
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

    Rules (docs/inspect.md): the `top` densest heads at --length (they dominate the cost); the
    `top` heads keeping the least attention mass (when known); every diagonal-only head (beyond
    L it sees only itself); every nearly-dense head (little to skip inside L).
    """
    reasons: dict[tuple[int, int], list[str]] = {}

    def add(hs: HeadSummary, why: str) -> None:
        reasons.setdefault((hs.layer, hs.head), []).append(why)

    for hs in sorted(heads, key=lambda x: (-x.density_length, x.layer, x.head))[:top]:
        add(hs, f"{top} densest at --length ({hs.density_length:.2%})")
    known = [x for x in heads if x.mass_kept is not None]
    for hs in sorted(known, key=lambda x: (x.mass_kept, x.layer, x.head))[:top]:
        add(hs, f"{top} keeping least attention mass ({hs.mass_kept:.1%})")
    for hs in heads:
        if hs.head_class is HeadClass.DIAGONAL_ONLY:
            add(hs, "beyond PCL a query sees only itself")
        elif hs.head_class is HeadClass.NEARLY_DENSE:
            add(hs, f"M keeps {hs.true_density:.1%} of pairs: little to skip")
    by_key = {(x.layer, x.head): x for x in heads}
    return [LookItem(layer=k[0], head=k[1], head_class=by_key[k].head_class, reasons=v)
            for k, v in sorted(reasons.items())]


def _bins(n: int, g: int) -> np.ndarray:
    """Start indices of `g` near-equal bins over `[0, n)` (g <= n)."""
    return (np.arange(g, dtype=np.int64) * n) // g


def pool(mask: np.ndarray, g: int) -> np.ndarray:
    """Downsample bool `[..., n, n]` to float64 `[..., g', g']` (g' = min(g, n)): allowed fraction per cell."""
    n = mask.shape[-1]
    g = max(1, min(g, n))
    edges = _bins(n, g)
    size = np.diff(np.append(edges, n))
    s = np.add.reduceat(np.add.reduceat(mask.astype(np.int32), edges, axis=-1), edges, axis=-2)
    return s / (size[:, None] * size[None, :])


def head_picture(p: Profile, layer: int, head: int, length: int, grid: int,
                 rows_per_cell: int = 8) -> HeadPicture:
    """Pictures of one head's true mask and Stage-2 mask at `length`, at most `grid` cells a side.

    The Stage-2 picture reads `rows_per_cell` evenly spaced query rows of each cell row (all of
    them when a cell is at most that tall, then it is exact); its rows come from
    `masks.stage2_rows`, so the picture shows exactly the mask the kernels apply.
    """
    import torch

    from dam_cli import masks

    tm = p.layer_true_mask(layer)[head]  # [L, L]
    R, C = p.offsets[layer, head], p.columns[layer, head]
    true_pic = pool(tm.numpy(), grid)
    S = length
    g = max(1, min(grid, S))
    edges = _bins(S, g)
    size = np.diff(np.append(edges, S))
    exact = bool(size.max() <= rows_per_cell)
    rows_of = [np.unique(np.linspace(a, a + n - 1, min(n, rows_per_cell)).round().astype(np.int64))
               for a, n in zip(edges, size)]
    all_rows = np.concatenate(rows_of)
    chunk = max(1, (1 << 21) // S)  # bound the [rows, S] temporaries of stage2_rows to a few MB
    pooled = np.empty((all_rows.size, g))
    for k in range(0, all_rows.size, chunk):
        rows = torch.from_numpy(all_rows[k:k + chunk])
        m = masks.stage2_rows(tm, R, C, rows, S).numpy()  # [n, S]
        pooled[k:k + chunk] = np.add.reduceat(m.astype(np.int32), edges, axis=-1) / size
    st2 = np.empty((g, g))
    k = 0
    for b, rws in enumerate(rows_of):
        st2[b] = pooled[k:k + rws.size].mean(0)
        k += rws.size
    return HeadPicture(layer=layer, head=head, length=S, true_mask=true_pic, stage2=st2, stage2_exact=exact)


def tiles(p: Profile, size: int) -> np.ndarray:
    """Every head's true mask downsampled to `size x size` cells: float64 `[N_L, H, t, t]`."""
    t = min(size, p.pcl)
    out = np.empty((p.n_layers, p.n_heads, t, t))
    for layer in range(p.n_layers):
        out[layer] = pool(p.layer_true_mask(layer).numpy(), t)
    return out


# =========================================================================================
# Entry points: one per mode of `dam inspect`
# =========================================================================================

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
    _check_length(S)
    # The table alone needs numpy only: torch (seconds to import) is loaded for pictures only.
    p = load_profile(path) if (layer is not None or tile is not None) else load_arrays(path)
    heads, d_pcl, d_len = _heads(p, S, rules)
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
            columns_mean=float(np.mean([len(x.columns) for x in hs])), classes=counts))
    pic = head_picture(p, layer, head, S, grid) if layer is not None and head is not None else None
    return Summary(path=path, meta=p.meta.to_dict(), n_layers=p.n_layers, n_heads=p.n_heads, pcl=p.pcl,
                   length=S, rules=rules, density_pcl=float(d_pcl.mean()), density_length=float(d_len.mean()),
                   layers=layers, heads=heads, look=look_items(heads), picture=pic,
                   tiles=tiles(p, tile) if tile else None)


def compare(path_a: str | os.PathLike, path_b: str | os.PathLike, length: int | None = None, *,
            layer: int | None = None, head: int | None = None,
            rules: ClassRules = ClassRules()) -> Comparison:
    """Compare profile B with profile A head by head (`dam inspect A B`).

    Both headers are read first; different layer/head counts or PCL raise a `DamError` naming
    both shapes before any tensor is loaded. `length` defaults to A's `default_length`.
    """
    from dam_cli.artifact.profile import load_arrays, read_meta

    path_a, path_b = os.fspath(path_a), os.fspath(path_b)
    ma, mb = read_meta(path_a), read_meta(path_b)
    if (ma.n_layers, ma.n_heads, ma.pcl) != (mb.n_layers, mb.n_heads, mb.pcl):
        raise DamError(f"cannot compare profiles of different shapes: {path_a} has {shape_text(ma)}, "
                       f"{path_b} has {shape_text(mb)}; compare profiles of the same model and PCL")
    check_selection(ma, layer, head)
    S = default_length(ma) if length is None else length
    _check_length(S)
    a, b = load_arrays(path_a), load_arrays(path_b)
    ha, _, _ = _heads(a, S, rules)
    hb, _, _ = _heads(b, S, rules)
    NL, H = a.n_layers, a.n_heads
    # IoU on the packed bits: popcounts of AND and OR, no unpacking (padding bits are zero).
    pa, pb = a.true_mask_packed, b.true_mask_packed  # [N_L, H, L, ceil(L/8)]
    inter = _POPCOUNT[pa & pb].sum((-1, -2), dtype=np.int64)
    union = _POPCOUNT[pa | pb].sum((-1, -2), dtype=np.int64)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    same_m = inter == union
    heads: list[HeadDiff] = []
    for x, y in zip(ha, hb):
        ra, rb, ca, cb = set(x.offsets), set(y.offsets), set(x.columns), set(y.columns)
        heads.append(HeadDiff(
            layer=x.layer, head=x.head, iou=float(iou[x.layer, x.head]), class_a=x.head_class,
            class_b=y.head_class, offsets_gained=sorted(rb - ra), offsets_lost=sorted(ra - rb),
            columns_gained=sorted(cb - ca), columns_lost=sorted(ca - cb),
            d_density_pcl=y.density_pcl - x.density_pcl, d_density_length=y.density_length - x.density_length))
    layers = []
    for lyr in range(NL):
        hs = heads[lyr * H:(lyr + 1) * H]
        layers.append(LayerDiff(
            layer=lyr, iou_mean=float(iou[lyr].mean()), iou_min=float(iou[lyr].min()),
            offsets_gained=sum(len(d.offsets_gained) for d in hs), offsets_lost=sum(len(d.offsets_lost) for d in hs),
            columns_gained=sum(len(d.columns_gained) for d in hs), columns_lost=sum(len(d.columns_lost) for d in hs),
            d_density_pcl=float(np.mean([d.d_density_pcl for d in hs])),
            d_density_length=float(np.mean([d.d_density_length for d in hs]))))
    identical = sum(1 for d in heads if same_m[d.layer, d.head] and not (
        d.offsets_gained or d.offsets_lost or d.columns_gained or d.columns_lost))
    keys = sorted(set(ma.recipe) | set(mb.recipe))
    changes = {k: [ma.recipe.get(k), mb.recipe.get(k)] for k in keys if ma.recipe.get(k) != mb.recipe.get(k)}
    same_model = all(ma.model.get(k) == mb.model.get(k) for k in ("name", "config_sha256"))
    return Comparison(path_a=path_a, path_b=path_b, meta_a=ma.to_dict(), meta_b=mb.to_dict(), n_layers=NL,
                      n_heads=H, pcl=a.pcl, length=S, same_model=same_model, recipe_changes=changes,
                      iou_mean=float(iou.mean()), iou_min=float(iou.min()), heads_identical=identical,
                      layers=layers, heads=heads)


def check(path: str | os.PathLike) -> CheckResult:
    """Validate a profile without raising (`--check`): schema, shapes, internal consistency.

    Beyond what `load_profile` verifies, the stored statistics must match `M` (true density and
    pattern scores within `STATS_ATOL`) and R and C must be exactly the patterns whose score
    reaches `mu` (and that have `min_support` cells when the recipe sets it). A recipe whose
    `variant` is not "faithful" may leave patterns out on purpose: then a pattern that reaches
    `mu` but is not matched is only a warning. Errors and warnings name the first offending head.
    """
    from dam_cli.artifact.profile import load_arrays

    path = os.fspath(path)
    try:
        p = load_arrays(path)
    except DamError as e:
        return CheckResult(path=path, valid=False, errors=[str(e)], warnings=[])
    errors: list[str] = []
    warnings: list[str] = []
    recipe = p.meta.recipe
    mu = float(recipe["mu"])
    min_support = int(recipe.get("min_support", 1))
    faithful = recipe.get("variant", "faithful") == "faithful"
    L = p.pcl
    size = (L - np.arange(L)).astype(np.float64)
    true_d = _POPCOUNT[p.true_mask_packed].sum((-1, -2), dtype=np.int64) / (L * (L + 1) / 2)
    bad = np.abs(p.stats["stats.true_density"].astype(np.float64) - true_d) > STATS_ATOL
    if bad.any():
        layer, h = (int(v[0]) for v in np.nonzero(bad))
        errors.append(f"stats.true_density of layer {layer} head {h} does not match its true mask")
    for layer in range(p.n_layers):
        # [H, L, L], causal (checked by the loader)
        tm = np.unpackbits(p.true_mask_packed[layer], axis=-1, count=L, bitorder="little").astype(np.bool_)
        for name, what, count, matched in (
                ("diag_score", "offset", causal_diagonal_counts(tm).astype(np.float64), p.offsets[layer]),
                ("col_score", "column", tm.sum(-2, dtype=np.int64).astype(np.float64), p.columns[layer])):
            stored = p.stats[f"stats.{name}"][layer].astype(np.float64)
            bad = np.abs(stored - count / size) > STATS_ATOL
            if bad.any():
                h, i = (int(v[0]) for v in np.nonzero(bad))
                errors.append(f"stats.{name} of layer {layer} head {h} at {i} does not match its true mask")
            # The integer form of masks.match_patterns: count >= size * mu, and enough cells.
            expect = (count >= size * mu) & (size >= min_support)
            extra, missing = matched & ~expect, expect & ~matched
            if extra.any():
                h, i = (int(v[0]) for v in np.nonzero(extra))
                errors.append(f"layer {layer} head {h} matches {what} {i}, whose score is below mu = {mu}")
            if missing.any():
                h, i = (int(v[0]) for v in np.nonzero(missing))
                msg = (f"layer {layer} head {h}: {what} {i} reaches mu = {mu} but is not matched"
                       + ("" if faithful else f" ({int(missing.sum())} such in this layer)"))
                (errors if faithful else warnings).append(msg)
    return CheckResult(path=path, valid=not errors, errors=errors, warnings=warnings)
