"""The profile file format: with triangle.py (the mask layouts) and tensors.py (the data section), the only
code that reads or writes it (docs/reference/profile-format.md).

The file is written by hand in the safetensors layout (8-byte header length, JSON header, raw data)
with sorted keys and no timestamps, so the same inputs give a byte-identical file; any safetensors
reader can open it. Writers write schema 2 (the true mask as its causal lower triangle, bit-packed
per head); readers accept schemas 1 and 2. Loading validates everything before use, never unpickles.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from typing import Any

import numpy as np

from dam_cli import __version__
from dam_cli.artifact.integrity import MaskCounts, damaged
from dam_cli.artifact.profile import Profile, ProfileArrays, ProfileMeta
from dam_cli.artifact.tensors import (
    DTYPES,
    StoredMask,
    check_memory,
    check_spans,
    invalid,
    is_int,
    padding_set,
    read_tensor,
    shown,
    tensor_bytes,
)
from dam_cli.artifact.triangle import causal_pairs, noncausal_layer, rows_to_triangle, triangle_to_rows
from dam_cli.atomic import atomic_open
from dam_cli.errors import DamError
from dam_cli.json_keys import DuplicateKey, unique_keys
from dam_cli.text import safe_text

SCHEMA_VERSION = 2  # what writers write
READABLE_SCHEMAS = (1, 2)  # 1: the true mask row by row [N_L, H, L, ceil(L/8)]; 2: its lower triangle per head
FORMAT_NAME = "dam-profile"
# A real header is under 2 KB (tensor entries and metadata); the largest a sane profile needs is about
# 40 KB of fixed fields (a 4 KB model path, a 16 KB RoPE table) plus the calibration source, which
# lists the --calib paths: 1 MB leaves room for ~250 paths of full length. Refused before reading it,
# so a hostile header never costs more than ~25 MB to parse.
MAX_HEADER = 1_000_000
MAX_PCL = 65536  # as `dam profile --pcl`
MAX_HEAD_DIM = 1 << 16  # far above any model's (64 to 256 today); a larger one is a damaged field
_MAX_INT = 2**63 - 1  # integer metadata beyond int64 would overflow numpy

_NP_TO_ST = {np.dtype(v): k for k, v in DTYPES.items()}

# Per-head statistics stored beside the masks.
STAT_NAMES = ("stats.true_density", "stats.mass_kept", "stats.diag_score", "stats.col_score")
NEEDLE_STAT = "stats.needle_score"  # [N_L, H], only in profiles whose recipe has retrieval_by "needle"


def _stat_names(recipe: dict) -> tuple[str, ...]:
    return STAT_NAMES + ((NEEDLE_STAT,) if recipe.get("retrieval_by") == "needle" else ())


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
        **({"dam.runtime": dump(meta.runtime)} if meta.runtime is not None else {}),
    }


def _tensors_of(p: Profile) -> dict[str, np.ndarray]:
    rows = p.true_mask_packed.contiguous().numpy()
    L = p.pcl
    if rows.shape != (p.n_layers, p.n_heads, L, (L + 7) // 8):
        raise DamError(f"cannot save the profile: true_mask_packed has shape {list(rows.shape)}, "
                       f"expected {[p.n_layers, p.n_heads, L, (L + 7) // 8]}")
    layer = noncausal_layer(rows, L)
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
    if len(raw) > MAX_HEADER:  # readers would refuse it: fail now, not at the next load
        raise DamError(f"cannot save the profile: its header is {len(raw):,} bytes, over the {MAX_HEADER:,}-byte "
                       "limit of profile headers (a very long list of --calib paths? give their folder instead)")
    return struct.pack("<Q", len(raw)) + raw, [tensors[n] for n in order]


def save_profile(p: Profile, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write `p` to `path` atomically (temporary file in the same folder, then rename). Only a new
    path or, with `force`, a regular file is replaced; anything else is a one-line DamError."""
    _check_path_type(path, "save to")
    with atomic_open(path, force) as f:  # refuses a bad destination before the encoding work
        head, bufs = encode_profile(p)
        f.write(head)
        for a in bufs:
            f.write(a.tobytes())


# ---- reading ----------------------------------------------------------------------------------

_bad = invalid


def _check_path_type(path: Any, what: str) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise DamError(f"the profile path to {what} must be a str or os.PathLike, got {type(path).__name__} "
                       f"{safe_text(repr(path))[:60]}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """Parse and check the safetensors header: (header dict, data start offset, file size)."""
    _check_path_type(path, "read")
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
            if 8 + n > size:
                raise _bad(path, f"header length {n} does not fit a file of {size} bytes "
                           "(truncated, or not a safetensors file)")
            if n > MAX_HEADER:  # refused unread: parsing megabytes of hostile JSON costs gigabytes
                raise _bad(path, f"its header is {n:,} bytes, over the {MAX_HEADER:,} bytes a profile header can "
                           "need (a real one is under 2 KB): not a profile, or a hostile file")
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
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float,
                            object_pairs_hook=unique_keys)
    except DuplicateKey as e:  # the reference safetensors reader refuses these too
        raise _bad(path, f"its header has the key \"{safe_text(e)}\" twice") from None
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
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise _bad(path, f"{key} has the key \"{safe_text(e)}\" twice") from None
    except _NotFinite:
        raise _bad(path, f"{key} holds NaN, Infinity or a number out of range") from None
    except ValueError:
        raise _bad(path, f"{key} is not JSON") from None
    except RecursionError:
        raise _bad(path, f"{key} is nested too deeply (corrupted or hostile)") from None


def _number(v: Any) -> float | None:
    """`v` as a finite float, or None: not a number, NaN/infinite, or an integer too large for a float."""
    if not (is_int(v) or isinstance(v, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # a 400-digit integer
        return None
    return f if math.isfinite(f) else None


def _need_int(path: str, where: str, d: dict, k: str, lo: int, hi: int = _MAX_INT, required: bool = False) -> None:
    if k not in d and not required:
        return
    if not (is_int(d.get(k)) and lo <= d[k] <= hi):
        rule = f"an integer from {lo} to {hi}" if hi != _MAX_INT or lo > 1 else \
            ("a positive integer" if lo == 1 else "a non-negative integer")
        raise _bad(path, f"{where}.{k} must be {rule}, got {shown(d.get(k))}")


# Recipe numbers, ranged as `dam profile` checks its options: key -> (rule for messages, test).
_RECIPE_NUMBERS = {
    "tau": ("a number > 0 (as dam profile --tau)", lambda x: x > 0),
    "lam": ("a finite number", lambda x: True),
    "mu": ("a number in (0, 1] (as dam profile --mu)", lambda x: 0 < x <= 1),
    "eps": ("a number in (0, 1) (a floor on attention probabilities)", lambda x: 0 < x < 1),
    "pattern_mass": ("a number in (0, 1] (as dam profile --pattern-mass)", lambda x: 0 < x <= 1),
}


def _parse_meta(path: str, md: Any) -> ProfileMeta:
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise _bad(path, "it has no string metadata map (a safetensors file, but not a DAM profile)")
    if "dam.format" not in md:
        raise _bad(path, "it is a safetensors file without DAM metadata (dam.format missing)")
    if md["dam.format"] != FORMAT_NAME:
        raise _bad(path, f"its dam.format is {safe_text(repr(md['dam.format'][:60]))}, not {FORMAT_NAME!r} "
                   "(not a DAM profile)")
    raw = md.get("dam.schema", "")
    if not (re.fullmatch(r"-?[0-9]{1,20}", raw) and raw == str(int(raw))):  # as written: "2", not " 2" or "02"
        raise _bad(path, "dam.schema is missing or not an integer as dam writes it (e.g. \"2\")")
    schema = int(raw)
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
    for k in ("n_layers", "n_heads", "n_kv_heads"):
        _need_int(path, "dam.model", model, k, 1, required=True)
    _need_int(path, "dam.model", model, "head_dim", 1, MAX_HEAD_DIM, required=True)
    if model["n_heads"] % model["n_kv_heads"]:
        raise _bad(path, "dam.model.n_heads is not a multiple of n_kv_heads")
    # Optional fields that readers format or compare: wrong types would crash them later.
    for k in ("name", "architecture", "config_sha256"):
        if k in model and not isinstance(model[k], str):
            raise _bad(path, f"dam.model.{k} must be a string")
    for k in ("max_position", "hidden_size", "vocab_size", "intermediate_size"):
        _need_int(path, "dam.model", model, k, 0)
    if "rope" in model and not isinstance(model["rope"], dict):
        raise _bad(path, "dam.model.rope must be a JSON object")
    _need_int(path, "dam.recipe", recipe, "pcl", 1, MAX_PCL, required=True)
    if model.get("max_position") and recipe["pcl"] > model["max_position"]:  # 0 or absent: the context is unknown
        raise _bad(path, f"dam.recipe.pcl {recipe['pcl']} is above dam.model.max_position {model['max_position']} "
                   "(dam profile never writes that): restore a good copy or re-create it with `dam profile`")
    for k, (rule, ok) in _RECIPE_NUMBERS.items():
        if k in recipe or k != "pattern_mass":
            v = _number(recipe.get(k))
            if v is None or not ok(v):
                raise _bad(path, f"dam.recipe.{k} must be {rule}, got {shown(recipe.get(k))}")
    _need_int(path, "dam.recipe", recipe, "seed", -(2**63), 2**64 - 1)  # what torch.manual_seed takes
    for k, lo in (("min_support", 1), ("local_window", 0), ("retrieval_heads", 0), ("needle_length", 1),
                  ("needle_samples", 1)):
        _need_int(path, "dam.recipe", recipe, k, lo)
    if "retrieval_by" in recipe and recipe["retrieval_by"] not in ("mass", "needle"):
        raise _bad(path, "dam.recipe.retrieval_by must be \"mass\" or \"needle\"")
    if "variant" in recipe and not isinstance(recipe["variant"], str):
        raise _bad(path, "dam.recipe.variant must be a string")
    for k in ("samples", "tokens"):
        _need_int(path, "dam.calibration", calib, k, 0)
    for k in ("token_sha256", "source"):
        if k in calib and not isinstance(calib[k], str):
            raise _bad(path, f"dam.calibration.{k} must be a string")
    runtime = _parse_runtime(path, md["dam.runtime"]) if "dam.runtime" in md else None
    return ProfileMeta(model=model, recipe=recipe, calibration=calib, schema=schema,
                       tool_version=md.get("dam.tool_version", "unknown"), runtime=runtime)


def _parse_runtime(path: str, text: str) -> dict[str, Any]:
    """`dam.runtime`: the run-time options a profile recommends; today only `dynamic`, the fields of
    `DynamicSelection`, checked by its own `validate()`."""
    from dam_kernels.selection import DynamicSelection

    runtime = _loads(path, "dam.runtime", text)
    if not isinstance(runtime, dict) or set(runtime) - {"dynamic"}:
        raise _bad(path, "dam.runtime must be a JSON object whose only key is \"dynamic\"")
    dyn = runtime.get("dynamic")
    if dyn is not None:
        fields = set(DynamicSelection.__dataclass_fields__)
        if not isinstance(dyn, dict) or set(dyn) - fields:
            raise _bad(path, f"dam.runtime.dynamic must be a JSON object with keys among {', '.join(sorted(fields))}")
        try:
            DynamicSelection(**dyn).validate()
        except (ValueError, TypeError) as e:
            raise _bad(path, f"dam.runtime.dynamic is invalid: {e}") from None
    return runtime


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


def load_arrays(path: str | os.PathLike, *, true_mask: bool = True) -> ProfileArrays:
    """Read and fully validate a profile into numpy arrays (no torch import); `DamError` on any defect.

    The true mask comes back row-packed `[N_L, H, L, ceil(L/8)]` whatever the file's schema, checked
    against the statistics stored beside it (`integrity`: a damaged file is refused). With
    `true_mask=False` it stays in the file: `true_mask_packed` is None and `stored_mask` reads it a
    block of rows at a time, making the same format checks (memory then stays a few MB whatever the
    PCL); comparing it with the statistics is then the caller's (`dam inspect --check`).
    """
    header, start, size = read_header(path)  # a path of the wrong type is refused there
    path = os.fspath(path)
    meta = _parse_meta(path, header.pop("__metadata__", None))
    want = expected_tensors(meta)
    if set(header) != set(want):
        missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
        raise _bad(path, f"tensor names differ from schema {meta.schema} (missing {missing}, "
                   f"unexpected {[safe_text(x)[:40] for x in extra[:5]]})")
    spans = check_spans(path, header, want, start, size)
    read = [n for n in want if true_mask or n != "true_mask"]
    need = sum(tensor_bytes(*want[n]) for n in read)
    if true_mask and meta.schema == 2:  # the triangle is unpacked to rows beside it
        need += meta.n_layers * meta.n_heads * meta.pcl * ((meta.pcl + 7) // 8)
    check_memory(path, need, f"load it ({meta.n_layers} layers x {meta.n_heads} heads, PCL {meta.pcl})")
    with open(path, "rb") as f:
        arrays = {n: read_tensor(path, f, start + spans[n][0], n, *want[n]) for n in read}
    rows, counts = _true_mask_rows(path, meta, arrays["true_mask"]) if true_mask else (None, None)
    stored = None if true_mask else StoredMask(path, start + spans["true_mask"][0], meta.schema, meta.n_layers,
                                               meta.n_heads, meta.pcl)
    prof = ProfileArrays(meta=meta, true_mask_packed=rows, offsets=arrays["offsets"], columns=arrays["columns"],
                         stats={k: arrays[k] for k in _stat_names(meta.recipe)}, path=path,
                         full_heads=arrays.get("full_heads"), stored_mask=stored)
    _check_stats(path, prof)
    _check_full_heads(path, meta, prof.full_heads)
    if counts is not None and (why := damaged(prof, counts)):
        raise _bad(path, why)
    return prof


def _check_full_heads(path: str, meta: ProfileMeta, full: np.ndarray | None) -> None:
    """The retrieval heads marked in `full_heads` are as many as the recipe says (`dam profile` marks
    min(retrieval_heads, every head of the model))."""
    if full is None:
        return
    n, want = int(full.sum()), min(int(meta.recipe.get("retrieval_heads", 0)), meta.n_layers * meta.n_heads)
    if n != want:
        raise _bad(path, f"full_heads marks {n} heads but dam.recipe.retrieval_heads says {want}: restore a good "
                   "copy or re-create it with `dam profile`")


def _true_mask_rows(path: str, meta: ProfileMeta, stored: np.ndarray) -> tuple[np.ndarray, MaskCounts]:
    """The stored true mask checked (zero padding bits, causal) and returned row-packed, with its cell counts."""
    L = meta.pcl
    if meta.schema == 1:
        if padding_set(stored[..., -1], L % 8):  # padding bits of each row's last byte
            raise _bad(path, "padding bits of the packed true mask are set")
        layer = noncausal_layer(stored, L)
        if layer is not None:
            raise _bad(path, f"the true mask of layer {layer} is not causal (a key after its query is set)")
        return stored, MaskCounts.of_rows(stored, L)
    # schema 2 is causal by construction; only each head's last byte has padding
    if padding_set(stored[..., -1], causal_pairs(L) % 8):
        raise _bad(path, "padding bits of the packed true mask are set")
    counts = MaskCounts(meta.n_layers, meta.n_heads, L)
    return triangle_to_rows(stored, L, visit=counts.add), counts


def _check_stats(path: str, p: ProfileArrays) -> None:
    for k in _stat_names(p.meta.recipe):  # every statistic is a fraction; only mass kept may be NaN (unknown)
        v = p.stats[k]
        known = v[~np.isnan(v)] if k == "stats.mass_kept" else v
        if bool(((known < 0) | (known > 1 + 1e-6) | np.isnan(known)).any()):
            raise _bad(path, f"{k} holds values outside [0, 1]")
