"""What a profile contains, as plain data: the summary of `dam inspect P` and its pictures.

Pure library logic (docs/inspect.md): no printing, no files written. `summarize` takes a path,
makes one load, and returns a frozen `Summary` whose `to_dict()` is JSON-serialisable (NaN
becomes null); `dam_cli/inspection/render.py` draws it.

Densities follow the Stage-2 rule of dam-spec.md: "density at S" is the fraction of the
`S (S + 1) / 2` causal pairs that the mask allows for a sequence of `S` tokens, diagonal guard
included, so "density at PCL" is `|M or diag| / (L (L + 1) / 2)`. "true density" is `M` alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli.inspection.classes import CLASS_ORDER, ClassRules, HeadClass, classify_head
from dam_cli.inspection.common import JSON_VERSION, POPCOUNT, check_length, check_selection, default_length, json_safe

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
        return json_safe({"layer": self.layer, "head": self.head, "class": self.head_class,
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
        return json_safe({
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
    rows_m = POPCOUNT[packed[..., :n_in, :]].sum(-1, dtype=np.int64)  # M is causal: row popcount
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
    true_count = POPCOUNT[packed].sum((-1, -2), dtype=np.int64)
    causal_l = L * (L + 1) / 2
    return (true_count / causal_l, rows[..., :L].sum(-1) / causal_l,
            rows[..., :length].sum(-1) / (length * (length + 1) / 2))


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
    # The table alone needs numpy only: torch (seconds to import) is loaded for pictures only.
    p = load_profile(path) if (layer is not None or tile is not None) else load_arrays(path)
    heads, d_pcl, d_len = head_summaries(p, S, rules)
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
