"""The Profile object and its one save/load pair: a versioned safetensors artifact.

This is the only module that reads or writes the profile format (docs/profile-format.md). The
file is written by hand in the safetensors layout (8-byte header length, JSON header, raw data)
with sorted keys and no timestamps, so the same inputs give a byte-identical file; any
safetensors reader can open it. Loading validates everything before use and never unpickles.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from dam_cli import __version__
from dam_cli.atomic import atomic_open
from dam_cli.errors import DamError

if TYPE_CHECKING:  # torch is imported lazily: reading and checking a profile needs numpy only
    import torch

SCHEMA_VERSION = 1
FORMAT_NAME = "dam-profile"
MAX_HEADER = 64 * 1024 * 1024  # a DAM header is a few KB; refuse absurd sizes before reading

_DTYPES = {  # safetensors dtype name -> (numpy dtype,)
    "BOOL": (np.bool_,),
    "U8": (np.uint8,),
    "I64": (np.int64,),
    "F32": (np.float32,),
}
_NP_TO_ST = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int64): "I64",
             np.dtype(np.float32): "F32"}

# Per-head statistics stored beside the masks: name -> (dtype, shape suffix after [N_L, H]).
STAT_NAMES = ("stats.true_density", "stats.mass_kept", "stats.diag_score", "stats.col_score")
NEEDLE_STAT = "stats.needle_score"  # [N_L, H], only in profiles whose recipe has retrieval_by "needle"


def _stat_names(recipe: dict) -> tuple[str, ...]:
    return STAT_NAMES + ((NEEDLE_STAT,) if recipe.get("retrieval_by") == "needle" else ())


@dataclass(frozen=True)
class ProfileMeta:
    """Everything in the header: model identity and shape, the recipe, the calibration."""

    model: dict[str, Any]  # name, architecture, n_layers, n_heads, n_kv_heads, head_dim, rope, config_sha256...
    recipe: dict[str, Any]  # pcl, tau, lam, mu, eps, and any beyond-paper options
    calibration: dict[str, Any]  # token_sha256, samples, tokens, source
    schema: int = SCHEMA_VERSION
    tool_version: str = __version__

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

    def to_header(self) -> dict[str, str]:
        """The `__metadata__` map: `dam.`-prefixed keys, nested data as canonical JSON strings."""
        dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
        return {
            "dam.calibration": dump(self.calibration),
            "dam.format": FORMAT_NAME,
            "dam.model": dump(self.model),
            "dam.recipe": dump(self.recipe),
            "dam.schema": str(self.schema),
            "dam.tool_version": self.tool_version,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "tool_version": self.tool_version, "model": self.model,
                "recipe": self.recipe, "calibration": self.calibration}


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

    `true_mask_packed` is uint8 `[N_L, H, L, ceil(L/8)]` (bit `j % 8` of byte `j // 8`, little
    bit order); `offsets` and `columns` are bool `[N_L, H, L]`; `stats` holds per-head figures.
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
        NL, H, L, L2 = true_mask.shape
        assert L == L2 and offsets.shape == (NL, H, L) and columns.shape == (NL, H, L)
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
        import torch

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
        if length < 1:
            raise DamError(f"length must be at least 1, got {length}")
        from dam_cli import masks

        return masks.stage2_mask(self.layer_true_mask(layer), self.offsets[layer],
                                 self.columns[layer], length, self._full_or_none(layer))

    def mask_rows(self, layer: int, rows: torch.Tensor, n_keys: int, key_start: int = 0) -> torch.Tensor:
        """Rows of the Stage-2 mask of one layer over keys `key_start .. key_start+n_keys-1`:
        bool `[H, len(rows), n_keys]`."""
        self._check_layer(layer)
        from dam_cli import masks

        return masks.stage2_rows(self.layer_true_mask(layer), self.offsets[layer],
                                 self.columns[layer], rows, n_keys, self._full_or_none(layer), key_start)

    def _full_or_none(self, layer: int) -> torch.Tensor | None:
        return None if self.full_heads is None else self.full_heads[layer]

    def density(self, length: int) -> torch.Tensor:
        """Fraction of causal pairs the Stage-2 mask allows at `length`, float64 `[N_L, H]`."""
        if length < 1:
            raise DamError(f"length must be at least 1, got {length}")
        import torch

        from dam_cli import masks

        out = torch.empty(self.n_layers, self.n_heads, dtype=torch.float64)
        for layer in range(self.n_layers):
            out[layer] = masks.density(self.layer_true_mask(layer), self.offsets[layer],
                                       self.columns[layer], length, self._full_or_none(layer))
        return out

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise DamError(f"layer {layer} is out of range: this profile has layers 0..{self.n_layers - 1}")

    # ---- I/O ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, force: bool = False) -> None:
        """Write the profile atomically; refuse to replace an existing file unless `force`."""
        save_profile(self, path, force=force)


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


# =========================================================================================
# The file format
# =========================================================================================

def _tensors_of(p: Profile) -> dict[str, np.ndarray]:
    out = {
        "true_mask": p.true_mask_packed.contiguous().numpy(),
        "offsets": p.offsets.contiguous().numpy(),
        "columns": p.columns.contiguous().numpy(),
    }
    for k in _stat_names(p.meta.recipe):
        out[k] = p.stats[k].float().contiguous().numpy()
    if p.meta.recipe.get("retrieval_heads", 0):  # present exactly when the recipe asks for it
        out["full_heads"] = p.full.contiguous().numpy()
    return out


def encode_profile(p: Profile) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes (length prefix included) and the tensor buffers in file order."""
    tensors = _tensors_of(p)
    header: dict[str, Any] = {"__metadata__": p.meta.to_header()}
    offset = 0
    order = sorted(tensors)
    for name in order:
        a = tensors[name]
        n = a.nbytes
        header[name] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(raw)) + raw, [tensors[n] for n in order]


def save_profile(p: Profile, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write `p` to `path` atomically (temporary file in the same folder, then rename)."""
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise DamError(f"{path} already exists: pass --force to replace it, or choose another --output")
    head, bufs = encode_profile(p)
    with atomic_open(path) as f:
        f.write(head)
        for a in bufs:
            f.write(a.tobytes())


def _bad(path: str, what: str) -> DamError:
    return DamError(f"{path} is not a valid DAM profile: {what}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """Parse and check the safetensors header: (header dict, data start offset, file size)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DamError(f"profile {path} does not exist: check the path, or make one with `dam profile`")
    if os.path.isdir(path):
        raise DamError(f"profile {path} is a folder: give the .safetensors file inside it")
    try:
        # Only regular files: opening a FIFO would block forever, a device could be endless.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DamError(f"profile {path} is not a regular file: give a .safetensors file made by `dam profile`")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            if len(first) < 8:
                raise _bad(path, f"the file is {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a file of {size} bytes "
                           "(truncated, or not a safetensors file)")
            raw = f.read(n)
    except PermissionError as e:
        raise DamError(f"cannot read profile {path}: permission denied ({e.strerror})") from None
    except IsADirectoryError:
        raise DamError(f"profile {path} is a folder: give the .safetensors file inside it") from None
    except OSError as e:
        raise DamError(f"cannot read profile {path}: {e.strerror or e}") from None
    if len(raw) != n:
        raise _bad(path, f"the header is truncated ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError; so are NaN/Infinity
        raise _bad(path, "its header is not JSON (not a safetensors file, or corrupted)") from None
    except RecursionError:  # a hostile header of deeply nested brackets
        raise _bad(path, "its header JSON is nested too deeply (corrupted or hostile)") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    return header, 8 + n, size


class _NotFinite(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotFinite(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e999 parses to inf: as unwelcome as a literal Infinity
        raise _NotFinite(f"JSON number {text} is out of range")
    return v


def _loads(path: str, key: str, text: str) -> Any:
    """One metadata value parsed as strict JSON (no NaN/Infinity), or a DamError."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except _NotFinite:
        raise _bad(path, f"{key} holds NaN, Infinity or a number out of range") from None
    except ValueError:
        raise _bad(path, f"{key} is not JSON") from None
    except RecursionError:
        raise _bad(path, f"{key} is nested too deeply (corrupted or hostile)") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _parse_meta(path: str, md: Any) -> ProfileMeta:
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise _bad(path, "it has no string metadata map (a safetensors file, but not a DAM profile)")
    if md.get("dam.format") != FORMAT_NAME:
        raise _bad(path, "it is a safetensors file without DAM metadata (dam.format missing)")
    try:
        schema = int(md["dam.schema"])
    except (KeyError, ValueError):  # ValueError also covers absurdly long digit strings
        raise _bad(path, "dam.schema is missing or not an integer") from None
    if schema != SCHEMA_VERSION:
        raise DamError(f"{path} has profile schema {schema}, but this dam ({__version__}) reads schema "
                       f"{SCHEMA_VERSION}: re-create it with `dam profile`, or use a matching dam version")
    parsed: dict[str, Any] = {}
    for key in ("model", "recipe", "calibration"):
        if f"dam.{key}" not in md:
            raise _bad(path, f"dam.{key} is missing")
        parsed[key] = _loads(path, f"dam.{key}", md[f"dam.{key}"])
        if not isinstance(parsed[key], dict):
            raise _bad(path, f"dam.{key} is not a JSON object")
    model, recipe, calib = parsed["model"], parsed["recipe"], parsed["calibration"]
    for k in ("n_layers", "n_heads", "n_kv_heads", "head_dim"):
        if not _is_int(model.get(k)) or model[k] < 1:
            raise _bad(path, f"dam.model.{k} must be a positive integer")
    if model["n_heads"] % model["n_kv_heads"]:
        raise _bad(path, "dam.model.n_heads is not a multiple of n_kv_heads")
    # Optional fields that readers format or compare: wrong types would crash them later.
    for k in ("name", "architecture", "config_sha256"):
        if k in model and not isinstance(model[k], str):
            raise _bad(path, f"dam.model.{k} must be a string")
    for k in ("max_position", "hidden_size", "vocab_size", "intermediate_size"):
        if k in model and not (_is_int(model[k]) and model[k] >= 0):
            raise _bad(path, f"dam.model.{k} must be a non-negative integer")
    if "rope" in model and not isinstance(model["rope"], dict):
        raise _bad(path, "dam.model.rope must be a JSON object")
    if not _is_int(recipe.get("pcl")) or recipe["pcl"] < 1:
        raise _bad(path, "dam.recipe.pcl must be a positive integer")
    for k in ("tau", "lam", "mu", "eps"):
        if not _is_number(recipe.get(k)):
            raise _bad(path, f"dam.recipe.{k} must be a finite number")
    for k in ("seed", "min_support", "local_window"):
        if k in recipe and not _is_int(recipe[k]):
            raise _bad(path, f"dam.recipe.{k} must be an integer")
    if "min_support" in recipe and recipe["min_support"] < 1:
        raise _bad(path, "dam.recipe.min_support must be at least 1")
    if "local_window" in recipe and recipe["local_window"] < 0:
        raise _bad(path, "dam.recipe.local_window must be >= 0")
    if "retrieval_heads" in recipe and not (_is_int(recipe["retrieval_heads"]) and recipe["retrieval_heads"] >= 0):
        raise _bad(path, "dam.recipe.retrieval_heads must be a non-negative integer")
    if "retrieval_by" in recipe and recipe["retrieval_by"] not in ("mass", "needle"):
        raise _bad(path, "dam.recipe.retrieval_by must be \"mass\" or \"needle\"")
    for k in ("needle_length", "needle_samples"):
        if k in recipe and not (_is_int(recipe[k]) and recipe[k] >= 1):
            raise _bad(path, f"dam.recipe.{k} must be a positive integer")
    if "pattern_mass" in recipe and not (_is_number(recipe["pattern_mass"]) and 0 < recipe["pattern_mass"] <= 1):
        raise _bad(path, "dam.recipe.pattern_mass must be a number in (0, 1]")
    if "variant" in recipe and not isinstance(recipe["variant"], str):
        raise _bad(path, "dam.recipe.variant must be a string")
    for k in ("samples", "tokens"):
        if k in calib and not (_is_int(calib[k]) and calib[k] >= 0):
            raise _bad(path, f"dam.calibration.{k} must be a non-negative integer")
    for k in ("token_sha256", "source"):
        if k in calib and not isinstance(calib[k], str):
            raise _bad(path, f"dam.calibration.{k} must be a string")
    return ProfileMeta(model=model, recipe=recipe, calibration=calib, schema=schema,
                       tool_version=md.get("dam.tool_version", "unknown"))


def expected_tensors(meta: ProfileMeta) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor a profile with this metadata must hold."""
    NL, H, L = meta.n_layers, meta.n_heads, meta.pcl
    return {
        "true_mask": ("U8", (NL, H, L, (L + 7) // 8)),
        "offsets": ("BOOL", (NL, H, L)),
        "columns": ("BOOL", (NL, H, L)),
        "stats.true_density": ("F32", (NL, H)),
        "stats.mass_kept": ("F32", (NL, H)),
        "stats.diag_score": ("F32", (NL, H, L)),
        "stats.col_score": ("F32", (NL, H, L)),
        **({"full_heads": ("BOOL", (NL, H))} if meta.recipe.get("retrieval_heads", 0) else {}),
        **({NEEDLE_STAT: ("F32", (NL, H))} if meta.recipe.get("retrieval_by") == "needle" else {}),
    }


def read_meta(path: str | os.PathLike) -> ProfileMeta:
    """Read and check only the header of a profile (instant, whatever the file size)."""
    header, _, _ = read_header(path)
    return _parse_meta(os.fspath(path), header.get("__metadata__"))


@dataclass
class ProfileArrays(_Shape):
    """A validated profile as numpy arrays, read without importing torch (fast summaries).

    Same field names as `Profile`; `load_profile` wraps these arrays as torch tensors.
    """

    meta: ProfileMeta
    true_mask_packed: np.ndarray  # [N_L, H, L, ceil(L/8)] uint8
    offsets: np.ndarray  # [N_L, H, L] bool
    columns: np.ndarray  # [N_L, H, L] bool
    stats: dict[str, np.ndarray]
    path: str
    full_heads: np.ndarray | None = None  # [N_L, H] bool

    @property
    def full(self) -> np.ndarray:
        if self.full_heads is None:
            return np.zeros((self.n_layers, self.n_heads), dtype=np.bool_)
        return self.full_heads


def load_profile(path: str | os.PathLike) -> Profile:
    """Load and fully validate a profile; raise `DamError` with the reason on any defect."""
    import torch

    a = load_arrays(path)
    t = lambda x: torch.from_numpy(x)  # noqa: E731  (shares memory: no copy)
    return Profile(meta=a.meta, true_mask_packed=t(a.true_mask_packed), offsets=t(a.offsets),
                   columns=t(a.columns), stats={k: t(v) for k, v in a.stats.items()}, path=a.path,
                   full_heads=None if a.full_heads is None else t(a.full_heads))


def load_arrays(path: str | os.PathLike) -> ProfileArrays:
    """Read and fully validate a profile into numpy arrays (no torch import); `DamError` on any defect."""
    path = os.fspath(path)
    header, start, size = read_header(path)
    meta = _parse_meta(path, header.pop("__metadata__", None))
    want = expected_tensors(meta)
    if set(header) != set(want):
        missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
        raise _bad(path, f"tensor names differ from schema {SCHEMA_VERSION} (missing {missing}, unexpected {extra})")
    spans = []
    for name, (dt, shape) in want.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != dt or not isinstance(info.get("shape"), list) \
                or tuple(info["shape"]) != shape:
            raise _bad(path, f"tensor {name} should be {dt} {list(shape)}, found "
                       f"{info.get('dtype') if isinstance(info, dict) else '?'} "
                       f"{info.get('shape') if isinstance(info, dict) else '?'}")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise _bad(path, f"tensor {name} has malformed data_offsets")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dt][0]).itemsize  # Python ints: no overflow
        if offs[0] < 0 or offs[1] - offs[0] != nbytes:
            raise _bad(path, f"tensor {name} spans {offs[1] - offs[0]} bytes, expected {nbytes}")
        if start + offs[1] > size:
            raise _bad(path, f"tensor {name} runs past the end of the file (truncated at {size} bytes)")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise _bad(path, f"tensors {an} and {bn} overlap")
    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, (dt, shape) in want.items():
            o0, o1 = header[name]["data_offsets"]
            f.seek(start + o0)
            buf = f.read(o1 - o0)
            if len(buf) != o1 - o0:
                raise _bad(path, f"tensor {name} is truncated")
            npdt = _DTYPES[dt][0]
            if dt == "BOOL":
                raw = np.frombuffer(buf, dtype=np.uint8)
                if raw.size and raw.max() > 1:
                    raise _bad(path, f"tensor {name} holds bytes other than 0 and 1")
                a = raw.astype(np.bool_)
            else:
                a = np.frombuffer(buf, dtype=npdt).copy()
            arrays[name] = a.reshape(shape)
    prof = ProfileArrays(meta=meta, true_mask_packed=arrays["true_mask"], offsets=arrays["offsets"],
                         columns=arrays["columns"], stats={k: arrays[k] for k in _stat_names(meta.recipe)}, path=path,
                         full_heads=arrays.get("full_heads"))
    _check_consistency(path, prof)
    return prof


def _check_consistency(path: str, p: ProfileArrays) -> None:
    L = p.pcl
    if L % 8:  # padding bits of the last byte must be zero
        pad = p.true_mask_packed[..., -1] >> (L % 8)
        if bool((pad != 0).any()):
            raise _bad(path, "padding bits of the packed true mask are set")
    # Causality on the packed bits directly: AND each row with the packed "keys after i" pattern.
    upper = np.packbits(np.triu(np.ones((L, L), dtype=np.uint8), 1), axis=-1, bitorder="little")
    packed = p.true_mask_packed
    for layer in range(p.n_layers):
        if np.bitwise_and(packed[layer], upper).any():
            raise _bad(path, f"the true mask of layer {layer} is not causal (a key after its query is set)")
    for k in _stat_names(p.meta.recipe):  # every statistic is a fraction; only mass kept may be NaN (unknown)
        v = p.stats[k]
        known = v[~np.isnan(v)] if k == "stats.mass_kept" else v
        if bool(((known < 0) | (known > 1 + 1e-6) | np.isnan(known)).any()):
            raise _bad(path, f"{k} holds values outside [0, 1]")
