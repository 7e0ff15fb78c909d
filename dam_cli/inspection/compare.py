"""`dam inspect A B`: profile B compared with profile A, head by head, as plain data.

Pure library logic (docs/guides/inspect.md): no printing. `compare` reads both headers, refuses
profiles of different shapes, then loads both and returns a frozen `Comparison`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dam_cli.errors import DamError
from dam_cli.inspection.classes import ClassRules, HeadClass
from dam_cli.inspection.common import (
    JSON_VERSION,
    POPCOUNT,
    check_length,
    check_selection,
    default_length,
    json_safe,
    shape_text,
)
from dam_cli.inspection.summary import head_summaries


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
        return json_safe({
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
    check_length(S)
    a, b = load_arrays(path_a), load_arrays(path_b)
    ha, _, _ = head_summaries(a, S, rules)
    hb, _, _ = head_summaries(b, S, rules)
    NL, H = a.n_layers, a.n_heads
    # IoU on the packed bits: popcounts of AND and OR, no unpacking (padding bits are zero).
    pa, pb = a.true_mask_packed, b.true_mask_packed  # [N_L, H, L, ceil(L/8)]
    inter = POPCOUNT[pa & pb].sum((-1, -2), dtype=np.int64)
    union = POPCOUNT[pa | pb].sum((-1, -2), dtype=np.int64)
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
