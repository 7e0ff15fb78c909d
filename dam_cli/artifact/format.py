"""The profile file format: the only code that reads or writes it (docs/reference/profile-format.md).

The file is written by hand in the safetensors layout (8-byte header length, JSON header, raw data)
with sorted keys and no timestamps, so the same inputs give a byte-identical file; any safetensors
reader can open it. Writers write schema 2 (the true mask as its causal lower triangle, bit-packed
per head); readers accept schemas 1 and 2. Loading validates everything before use, never unpickles.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from typing import Any

import numpy as np

from dam_cli import __version__
from dam_cli.artifact.profile import Profile, ProfileArrays, ProfileMeta
from dam_cli.atomic import atomic_open
from dam_cli.errors import DamError

SCHEMA_VERSION = 2  # what writers write
READABLE_SCHEMAS = (1, 2)  # 1: the true mask row by row [N_L, H, L, ceil(L/8)]; 2: its lower triangle per head
FORMAT_NAME = "dam-profile"
MAX_HEADER = 64 * 1024 * 1024  # a DAM header is a few KB; refuse absurd sizes before reading

_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I64": np.int64, "F32": np.float32}  # safetensors name -> numpy
_NP_TO_ST = {np.dtype(v): k for k, v in _DTYPES.items()}

# Per-head statistics stored beside the masks.
STAT_NAMES = ("stats.true_density", "stats.mass_kept", "stats.diag_score", "stats.col_score")
NEEDLE_STAT = "stats.needle_score"  # [N_L, H], only in profiles whose recipe has retrieval_by "needle"


def _stat_names(recipe: dict) -> tuple[str, ...]:
    return STAT_NAMES + ((NEEDLE_STAT,) if recipe.get("retrieval_by") == "needle" else ())


# ---- the schema-2 true mask: the L(L+1)/2 causal pairs of each head, row-major, bit-packed ----

def causal_pairs(L: int) -> int:
    """Number of causal pairs (key <= query) of one head at PCL `L`: the bits of its schema-2 mask."""
    return L * (L + 1) // 2


def rows_to_triangle(rows: np.ndarray, L: int) -> np.ndarray:
    """Row-packed uint8 `[N_L, H, L, ceil(L/8)]` to the schema-2 layout uint8 `[N_L, H, ceil(L(L+1)/16)]`:
    each head's lower triangle (diagonal included) row by row, packed little bit order, zero padding."""
    NL, H = rows.shape[:2]
    tri = np.tri(L, dtype=np.bool_)
    out = np.empty((NL, H, (causal_pairs(L) + 7) // 8), dtype=np.uint8)
    for layer in range(NL):  # one head at a time: L x L bools, never the whole profile
        for head in range(H):
            m = np.unpackbits(rows[layer, head], axis=-1, count=L, bitorder="little").view(np.bool_)
            out[layer, head] = np.packbits(m[tri], bitorder="little")
    return out


def triangle_to_rows(packed: np.ndarray, L: int) -> np.ndarray:
    """Inverse of `rows_to_triangle`: schema-2 uint8 `[N_L, H, ceil(L(L+1)/16)]` to row-packed
    uint8 `[N_L, H, L, ceil(L/8)]`, every bit above the diagonal zero."""
    NL, H = packed.shape[:2]
    tri = np.tri(L, dtype=np.bool_)
    out = np.empty((NL, H, L, (L + 7) // 8), dtype=np.uint8)
    m = np.zeros((L, L), dtype=np.bool_)
    for layer in range(NL):
        for head in range(H):
            m[tri] = np.unpackbits(packed[layer, head], count=causal_pairs(L), bitorder="little").view(np.bool_)
            out[layer, head] = np.packbits(m, axis=-1, bitorder="little")
    return out


# ---- writing ----------------------------------------------------------------------------------

def _metadata_strings(meta: ProfileMeta) -> dict[str, str]:
    """The `__metadata__` map: `dam.`-prefixed keys, nested data as canonical JSON, schema the written one."""
    dump = lambda o: json.dumps(o, sort_keys=True, separators=(",", ":"))  # noqa: E731
    return {
        "dam.calibration": dump(meta.calibration),
        "dam.format": FORMAT_NAME,
        "dam.model": dump(meta.model),
        "dam.recipe": dump(meta.recipe),
        "dam.schema": str(SCHEMA_VERSION),
        "dam.tool_version": meta.tool_version,
    }


def _tensors_of(p: Profile) -> dict[str, np.ndarray]:
    rows = p.true_mask_packed.contiguous().numpy()
    L = p.pcl
    if rows.shape != (p.n_layers, p.n_heads, L, (L + 7) // 8):
        raise DamError(f"cannot save the profile: true_mask_packed has shape {list(rows.shape)}, "
                       f"expected {[p.n_layers, p.n_heads, L, (L + 7) // 8]}")
    layer = _noncausal_layer(rows, L)
    if layer is not None:  # schema 2 cannot hold such bits: refuse rather than drop them silently
        raise DamError(f"cannot save the profile: the true mask of layer {layer} is not causal "
                       "(a key after its query is set)")
    out = {"true_mask": rows_to_triangle(rows, L), "offsets": p.offsets.contiguous().numpy(),
           "columns": p.columns.contiguous().numpy()}
    for k in _stat_names(p.meta.recipe):
        out[k] = p.stats[k].float().contiguous().numpy()
    if p.meta.recipe.get("retrieval_heads", 0):  # present exactly when the recipe asks for it
        out["full_heads"] = p.full.contiguous().numpy()
    return out


def encode_profile(p: Profile) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes (length prefix included) and the tensor buffers in file order (schema 2)."""
    tensors = _tensors_of(p)
    header: dict[str, Any] = {"__metadata__": _metadata_strings(p.meta)}
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


# ---- reading ----------------------------------------------------------------------------------

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
    if schema not in READABLE_SCHEMAS:
        raise DamError(f"{path} has profile schema {schema}, but this dam ({__version__}) reads schemas "
                       f"{' and '.join(map(str, READABLE_SCHEMAS))}: re-create it with `dam profile`, "
                       "or use a matching dam version")
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
    """Name -> (dtype, shape) of every tensor a profile with this metadata (and schema) must hold."""
    NL, H, L = meta.n_layers, meta.n_heads, meta.pcl
    mask_shape = (NL, H, L, (L + 7) // 8) if meta.schema == 1 else (NL, H, (causal_pairs(L) + 7) // 8)
    return {
        "true_mask": ("U8", mask_shape),
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


def load_profile(path: str | os.PathLike) -> Profile:
    """Load and fully validate a profile; raise `DamError` with the reason on any defect."""
    import torch

    a = load_arrays(path)
    t = lambda x: torch.from_numpy(x)  # noqa: E731  (shares memory: no copy)
    return Profile(meta=a.meta, true_mask_packed=t(a.true_mask_packed), offsets=t(a.offsets),
                   columns=t(a.columns), stats={k: t(v) for k, v in a.stats.items()}, path=a.path,
                   full_heads=None if a.full_heads is None else t(a.full_heads))


def load_arrays(path: str | os.PathLike) -> ProfileArrays:
    """Read and fully validate a profile into numpy arrays (no torch import); `DamError` on any defect.
    The true mask comes back row-packed `[N_L, H, L, ceil(L/8)]` whatever the file's schema."""
    path = os.fspath(path)
    header, start, size = read_header(path)
    meta = _parse_meta(path, header.pop("__metadata__", None))
    want = expected_tensors(meta)
    if set(header) != set(want):
        missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
        raise _bad(path, f"tensor names differ from schema {meta.schema} (missing {missing}, unexpected {extra})")
    spans = []
    for name, (dt, shape) in want.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != dt or not isinstance(info.get("shape"), list) \
                or tuple(info["shape"]) != shape:
            raise _bad(path, f"tensor {name} should be {dt} {list(shape)}, found "
                       f"{info.get('dtype') if isinstance(info, dict) else '?'} "
                       f"{info.get('shape') if isinstance(info, dict) else '?'}")
        offs = info.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            raise _bad(path, f"tensor {name} has malformed data_offsets")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[dt]).itemsize  # Python ints: no overflow
        if offs[0] < 0 or offs[1] - offs[0] != nbytes:
            raise _bad(path, f"tensor {name} spans {offs[1] - offs[0]} bytes, expected {nbytes}")
        if start + offs[1] > size:
            raise _bad(path, f"tensor {name} runs past the end of the file (truncated at {size} bytes)")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (_, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
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
            if dt == "BOOL":
                raw = np.frombuffer(buf, dtype=np.uint8)
                if raw.size and raw.max() > 1:
                    raise _bad(path, f"tensor {name} holds bytes other than 0 and 1")
                a = raw.astype(np.bool_)
            else:
                a = np.frombuffer(buf, dtype=_DTYPES[dt]).copy()
            arrays[name] = a.reshape(shape)
    rows = _true_mask_rows(path, meta, arrays["true_mask"])
    prof = ProfileArrays(meta=meta, true_mask_packed=rows, offsets=arrays["offsets"],
                         columns=arrays["columns"], stats={k: arrays[k] for k in _stat_names(meta.recipe)}, path=path,
                         full_heads=arrays.get("full_heads"))
    _check_stats(path, prof)
    return prof


def _true_mask_rows(path: str, meta: ProfileMeta, stored: np.ndarray) -> np.ndarray:
    """The stored true mask checked (zero padding bits, causal) and returned row-packed."""
    L = meta.pcl
    if meta.schema == 1:
        if L % 8 and bool((stored[..., -1] >> (L % 8)).any()):  # padding bits of each row's last byte
            raise _bad(path, "padding bits of the packed true mask are set")
        layer = _noncausal_layer(stored, L)
        if layer is not None:
            raise _bad(path, f"the true mask of layer {layer} is not causal (a key after its query is set)")
        return stored
    used = causal_pairs(L) % 8  # schema 2 is causal by construction; only each head's last byte has padding
    if used and bool((stored[..., -1] >> used).any()):
        raise _bad(path, "padding bits of the packed true mask are set")
    return triangle_to_rows(stored, L)


def _noncausal_layer(rows: np.ndarray, L: int) -> int | None:
    """The first layer whose row-packed mask has a bit above the diagonal, or None."""
    upper = np.packbits(np.triu(np.ones((L, L), dtype=np.uint8), 1), axis=-1, bitorder="little")
    for layer in range(rows.shape[0]):  # AND each packed row with the packed "keys after i" pattern
        if np.bitwise_and(rows[layer], upper).any():
            return layer
    return None


def _check_stats(path: str, p: ProfileArrays) -> None:
    for k in _stat_names(p.meta.recipe):  # every statistic is a fraction; only mass kept may be NaN (unknown)
        v = p.stats[k]
        known = v[~np.isnan(v)] if k == "stats.mass_kept" else v
        if bool(((known < 0) | (known > 1 + 1e-6) | np.isnan(known)).any()):
            raise _bad(path, f"{k} holds values outside [0, 1]")
