"""The Profile object: per (layer, query head) the true mask, offsets and columns, and their pure methods.

Nothing here reads or writes a file: `dam_cli.artifact.format` is the only code that knows the
file format. The loaders and the writer are re-exported from here (lazily) for the many callers
that import them from `dam_cli.artifact.profile`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from dam_cli import __version__
from dam_cli.artifact.tensors import is_int
from dam_cli.errors import DamError

if TYPE_CHECKING:  # torch is imported lazily: reading and checking a profile needs numpy only
    import torch

# Names that live in dam_cli.artifact.format, importable from here as before the split.
_FORMAT_NAMES = ("load_profile", "load_arrays", "read_meta", "read_header", "save_profile", "encode_profile",
                 "expected_tensors", "SCHEMA_VERSION", "READABLE_SCHEMAS", "FORMAT_NAME", "STAT_NAMES",
                 "NEEDLE_STAT")


def __getattr__(name: str) -> Any:
    if name in _FORMAT_NAMES:  # lazy: format imports this module, so a top-level import would be circular
        from dam_cli.artifact import format as _format

        return getattr(_format, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _written_schema() -> int:
    from dam_cli.artifact.format import SCHEMA_VERSION

    return SCHEMA_VERSION


@dataclass(frozen=True)
class ProfileMeta:
    """Everything in the header: model identity and shape, the recipe, the calibration."""

    model: dict[str, Any]  # name, architecture, n_layers, n_heads, n_kv_heads, head_dim, rope, config_sha256...
    recipe: dict[str, Any]  # pcl, tau, lam, mu, eps, and any beyond-paper options
    calibration: dict[str, Any]  # token_sha256, samples, tokens, source
    schema: int = field(default_factory=_written_schema)  # of the file it was read from
    tool_version: str = __version__
    runtime: dict[str, Any] | None = None  # run-time options the profile recommends, e.g. {"dynamic": {...}}

    @property
    def n_layers(self) -> int:
        return int(self.model["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.model["n_heads"])

    @property
    def n_kv_heads(self) -> int:
        return int(self.model["n_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.model["head_dim"])

    @property
    def pcl(self) -> int:
        return int(self.recipe["pcl"])

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "tool_version": self.tool_version, "model": self.model,
                "recipe": self.recipe, "calibration": self.calibration, "runtime": self.runtime}


class _Shape:
    """Layers, heads and PCL read off the offsets tensor `[N_L, H, L]` (torch or numpy alike)."""

    offsets: Any

    @property
    def n_layers(self) -> int:
        return self.offsets.shape[0]

    @property
    def n_heads(self) -> int:
        return self.offsets.shape[1]

    @property
    def pcl(self) -> int:
        return self.offsets.shape[2]


@dataclass
class Profile(_Shape):
    """A DAM profile: per (layer, query head) the true mask `M`, offsets `R` and columns `C`.

    `true_mask_packed` is uint8 `[N_L, H, L, ceil(L/8)]` in memory, whatever the file layout (bit
    `j % 8` of byte `j // 8` of row `i`, little bit order); `offsets` and `columns` are bool
    `[N_L, H, L]`; `stats` holds per-head figures.
    """

    meta: ProfileMeta
    true_mask_packed: torch.Tensor  # [N_L, H, L, ceil(L/8)] uint8
    offsets: torch.Tensor  # [N_L, H, L] bool
    columns: torch.Tensor  # [N_L, H, L] bool
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    path: str | None = None
    full_heads: torch.Tensor | None = None  # [N_L, H] bool: retrieval heads kept on full attention (option)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_masks(cls, true_mask: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor,
                   meta: ProfileMeta | None = None, stats: dict[str, torch.Tensor] | None = None,
                   full_heads: torch.Tensor | None = None, **meta_overrides: Any) -> Profile:
        """Build a profile from bool tensors `[N_L, H, L, L]`, `[N_L, H, L]`, `[N_L, H, L]`.

        Without `meta`, a synthetic one is made (for tests and notebooks); keyword overrides
        are merged into `meta.model` / `meta.recipe` by name.
        """
        import torch

        if not all(isinstance(t, torch.Tensor) for t in (true_mask, offsets, columns)) or true_mask.dim() != 4:
            raise DamError("from_masks takes tensors: true_mask [N_L, H, L, L], offsets and columns [N_L, H, L]")
        NL, H, L, L2 = true_mask.shape
        if L != L2 or L < 1 or NL < 1 or H < 1:
            raise DamError(f"true_mask must be [N_L, H, L, L] with L >= 1, got {tuple(true_mask.shape)}")
        for name, t in (("offsets", offsets), ("columns", columns)):
            if tuple(t.shape) != (NL, H, L):
                raise DamError(f"{name} must be [N_L, H, L] = {(NL, H, L)} as true_mask says, got {tuple(t.shape)}")
        if full_heads is not None and tuple(full_heads.shape) != (NL, H):
            raise DamError(f"full_heads must be [N_L, H] = {(NL, H)}, got {tuple(full_heads.shape)}")
        for key, n in (("n_layers", NL), ("n_heads", H)):
            if meta_overrides.get(key, n) != n:
                raise DamError(f"{key}={meta_overrides[key]} disagrees with the masks' shape {tuple(true_mask.shape)}: "
                               "leave it out, the masks give it")
        kv = meta_overrides.get("n_kv_heads", H)
        if not is_int(kv) or kv < 1 or H % kv:
            raise DamError(f"n_kv_heads={kv!r} must divide the masks' {H} heads")
        if meta is None:
            model = {"name": "synthetic", "architecture": "synthetic", "n_layers": NL,
                     "n_heads": H, "n_kv_heads": H, "head_dim": 64, "max_position": 1 << 20,
                     "rope": {}, "config_sha256": ""}
            from dam_cli.masks import EPS

            recipe = {"pcl": L, "tau": 0.3, "lam": 0.5, "mu": 0.8, "eps": EPS}
            for k, v in meta_overrides.items():
                (model if k in model else recipe)[k] = v
            meta = ProfileMeta(model=model, recipe=recipe,
                               calibration={"token_sha256": "", "samples": 0, "tokens": 0,
                                            "source": "synthetic"})
        tm = true_mask.to(torch.bool)
        if stats is None:
            stats = default_stats(tm, offsets.bool(), columns.bool())
        if full_heads is not None and bool(full_heads.any()):
            full_heads = full_heads.bool().clone()
            if "retrieval_heads" not in meta.recipe:  # the file format keys the tensor on this
                meta.recipe["retrieval_heads"] = int(full_heads.sum())
        else:
            full_heads = None
        return cls(meta=meta, true_mask_packed=pack_bits(tm), offsets=offsets.bool().clone(),
                   columns=columns.bool().clone(), stats=stats, full_heads=full_heads)

    # ---- the public API (docs/api.md) -----------------------------------------------------
    @cached_property
    def true_mask(self) -> torch.Tensor:
        """The true masks `M`, bool `[N_L, H, L, L]` (unpacked once, then cached)."""
        return unpack_bits(self.true_mask_packed, self.pcl)

    @property
    def full(self) -> torch.Tensor:
        """Heads kept on full attention (retrieval-heads option), bool `[N_L, H]`; all False by default."""
        import torch

        if self.full_heads is None:
            return torch.zeros(self.n_layers, self.n_heads, dtype=torch.bool)
        return self.full_heads

    def layer_true_mask(self, layer: int) -> torch.Tensor:
        """One layer's true masks, bool `[H, L, L]`, without unpacking the others."""
        self._check_layer(layer)
        return unpack_bits(self.true_mask_packed[layer], self.pcl)

    def mask(self, layer: int, length: int) -> torch.Tensor:
        """The Stage-2 element mask of one layer for a sequence of `length`: bool `[H, S, S]`."""
        self._check_layer(layer)
        _check_count("length", length, 1)
        from dam_cli import masks
        from dam_cli.memory import available_memory

        need = 2 * self.n_heads * length * length  # the mask and a same-size temporary
        free = available_memory() if need > MASK_CHECK_BYTES else None
        if free is not None and need > free:
            from dam_cli.text import human_bytes

            raise DamError(f"the {length:,} x {length:,} mask of layer {layer}'s {self.n_heads} heads needs about "
                           f"{human_bytes(need)}, more than the {human_bytes(free)} free: take rows of it with "
                           "mask_rows, or its density with density")
        return masks.stage2_mask(self.layer_true_mask(layer), self.offsets[layer],
                                 self.columns[layer], length, self._full_or_none(layer))

    def mask_rows(self, layer: int, rows: torch.Tensor, n_keys: int, key_start: int = 0) -> torch.Tensor:
        """Rows of the Stage-2 mask of one layer over keys `key_start .. key_start+n_keys-1`:
        bool `[H, len(rows), n_keys]`."""
        self._check_layer(layer)
        _check_count("n_keys", n_keys, 0)
        _check_count("key_start", key_start, 0)
        import torch

        from dam_cli import masks

        if not isinstance(rows, torch.Tensor) or rows.dtype.is_floating_point or rows.dtype == torch.bool:
            raise DamError(f"rows must be an integer tensor of row positions, got {rows!r:.60}")
        if rows.numel() and int(rows.min()) < 0:
            raise DamError(f"rows must be positions >= 0, got {int(rows.min())}")
        return masks.stage2_rows(self.layer_true_mask(layer), self.offsets[layer],
                                 self.columns[layer], rows, n_keys, self._full_or_none(layer), key_start)

    def _full_or_none(self, layer: int) -> torch.Tensor | None:
        return None if self.full_heads is None else self.full_heads[layer]

    def density(self, length: int) -> torch.Tensor:
        """Fraction of causal pairs the Stage-2 mask allows at `length`, float64 `[N_L, H]`."""
        _check_count("length", length, 1)
        import torch

        from dam_cli import masks

        out = torch.empty(self.n_layers, self.n_heads, dtype=torch.float64)
        for layer in range(self.n_layers):
            out[layer] = masks.density(self.layer_true_mask(layer), self.offsets[layer],
                                       self.columns[layer], length, self._full_or_none(layer))
        return out

    def _check_layer(self, layer: int) -> None:
        if not is_int(layer):
            raise DamError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.n_layers:
            raise DamError(f"layer {layer} is out of range: this profile has layers 0..{self.n_layers - 1}")

    # ---- I/O ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, force: bool = False) -> None:
        """Write the profile atomically; refuse to replace an existing file unless `force`."""
        from dam_cli.artifact.format import save_profile

        save_profile(self, path, force=force)


MASK_CHECK_BYTES = 1 << 28  # masks below this are built without asking the machine for its free memory
MAX_POSITIONS = 1 << 24  # positions a mask or density is asked for at most: beyond every model's context


def _check_count(name: str, value: Any, low: int) -> None:
    """A DamError unless `value` is a whole number from `low` to `MAX_POSITIONS`."""
    if not is_int(value) or not low <= value <= MAX_POSITIONS:
        raise DamError(f"{name} must be a whole number from {low} to {MAX_POSITIONS:,} (positions), got {value!r}")


def default_stats(tm: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor,
                  mean_attn_mass_kept: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-head statistics derived from the masks alone (mass kept is NaN when unknown)."""
    import torch

    from dam_cli import masks

    NL, H, L, _ = tm.shape
    dscore, cscore = masks.pattern_scores(tm)
    causal = L * (L + 1) / 2
    kept = mean_attn_mass_kept if mean_attn_mass_kept is not None else torch.full((NL, H), float("nan"))
    return {
        "stats.true_density": (torch.tril(tm).sum((-1, -2)).to(torch.float64) / causal).float(),
        "stats.mass_kept": kept.float(),
        "stats.diag_score": dscore.float(),
        "stats.col_score": cscore.float(),
    }


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool `[..., L]` tensor along its last axis into uint8 `[..., ceil(L/8)]`, little bit order."""
    import torch

    arr = np.packbits(mask.contiguous().numpy().astype(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(np.ascontiguousarray(arr))


def unpack_bits(packed: torch.Tensor, L: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 `[..., ceil(L/8)]` to bool `[..., L]`."""
    import torch

    arr = np.unpackbits(packed.contiguous().numpy(), axis=-1, count=L, bitorder="little")
    return torch.from_numpy(arr.astype(np.bool_))


@dataclass
class ProfileArrays(_Shape):
    """A validated profile as numpy arrays, read without importing torch (fast summaries).

    Same field names as `Profile`; `load_profile` wraps these arrays as torch tensors. Loaded with
    `load_arrays(path, true_mask=False)`, the true mask stays in the file (`stored_mask`).
    """

    meta: ProfileMeta
    true_mask_packed: np.ndarray | None  # [N_L, H, L, ceil(L/8)] uint8; None when left in the file
    offsets: np.ndarray  # [N_L, H, L] bool
    columns: np.ndarray  # [N_L, H, L] bool
    stats: dict[str, np.ndarray]
    path: str
    full_heads: np.ndarray | None = None  # [N_L, H] bool
    stored_mask: Any = None  # format's StoredMask when loaded with `true_mask=False`: reads row blocks

    @property
    def full(self) -> np.ndarray:
        if self.full_heads is None:
            return np.zeros((self.n_layers, self.n_heads), dtype=np.bool_)
        return self.full_heads
