"""The on-disk capture (`--save-capture` / `--from-capture`): raw Stage-1 statistics in HDF5.

Per layer the float32 sums of attention probabilities `[H, L, L]` over samples, plus the sample
lengths (the position-wise counts follow from them), the model identity, each layer's sliding window
and logit soft-cap the sums were computed with (`dam.meta` "attention"; absent in older files: None),
and the calibration fingerprint. Enough to re-derive masks with any tau, lam or mu without the model.
This module is the only code touching the capture format. A capture is read as a self-contained
file: links, external storage and virtual datasets are refused, and every size in it is checked
against bounds and against the dataset shapes before anything is allocated.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dam_cli.atomic import atomic_open, output_error
from dam_cli.errors import DamError
from dam_cli.profiling.config import MAX_PCL
from dam_cli.text import human_bytes, safe_text

FORMAT = "dam-capture"
SCHEMA = 1
MAX_LAYERS = 4096  # far above any released model (SmolLM2-135M: 30; the largest: ~130)
MAX_HEADS = 4096  # query heads per layer
MAX_HEAD_DIM = 65536
MAX_SAMPLES = 1_000_000
MAX_META_BYTES = 1 << 20  # the dam.meta JSON is a few KB
MAX_WINDOW = 2**31 - 1
_SUM_SLACK = 1e-3  # float32 rounding allowed in a row of summed probabilities (relative)


def estimate_bytes(n_layers: int, n_heads: int, L: int) -> tuple[int, int]:
    """(likely, worst) size of a capture: the upper triangle is zeros and compresses away."""
    raw = n_layers * n_heads * L * L * 4
    return raw * (L + 1) // (2 * L) + 1_000_000, raw + 1_000_000


def check_room(path: str, n_layers: int, n_heads: int, L: int) -> str:
    """Refuse cleanly when the destination disk lacks room; return a line stating the size."""
    likely, worst = estimate_bytes(n_layers, n_heads, L)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise DamError(f"capture folder {safe_text(folder)} does not exist: create it or choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DamError(f"cannot write the capture {safe_text(path)}: {safe_text(folder)} is not writable "
                       "(read-only or no permission); choose another --save-capture path")
    free = shutil.disk_usage(folder).free
    if free < likely:
        raise DamError(f"the capture needs about {human_bytes(likely)} but {safe_text(folder)} has "
                       f"{human_bytes(free)} free: free space, choose another --save-capture path, or lower --pcl")
    return f"capture: about {human_bytes(likely)} (at most {human_bytes(worst)}) to {safe_text(path)}"


def config_attention(model: dict[str, Any]) -> tuple[list[int | None], list[float | None]]:
    """Per layer (window, soft-cap) as a model identity states them (`dam_cli.layer_attention`)."""
    from dam_cli.layer_attention import layer_softcap, layer_windows

    return layer_windows(model), [layer_softcap(model)] * int(model["n_layers"])


class CaptureWriter:
    """Write layer sums one at a time into an atomically published HDF5 file.

    `windows` / `softcaps` (per layer, None where absent) are those the sums were computed with, as
    `capture.Capture` recorded them; not given, they are what `meta["model"]` states (`config_attention`).
    """

    def __init__(self, path: str, meta: dict[str, Any], lengths: list[int], L: int, n_heads: int,
                 force: bool = True, windows: list[int | None] | None = None,
                 softcaps: list[float | None] | None = None):
        import h5py

        stated = config_attention(meta["model"])
        meta = {**meta, "attention": {"windows": list(stated[0] if windows is None else windows),
                                      "softcaps": list(stated[1] if softcaps is None else softcaps)}}
        self._path = path
        self._ctx = atomic_open(path, force)
        f = self._ctx.__enter__()
        try:
            self._h5 = h5py.File(f, "w")
            self._h5.attrs["dam.format"] = FORMAT
            self._h5.attrs["dam.schema"] = SCHEMA
            self._h5.attrs["dam.meta"] = json.dumps(meta, sort_keys=True)
            self._h5.create_dataset("lengths", data=np.asarray(lengths, dtype=np.int64))
            self._grp = self._h5.create_group("attn_sum")
        except OSError as e:
            self._discard()
            raise output_error(path, e) from None
        except BaseException:
            self._discard()
            raise
        self._L, self._H = L, n_heads

    def write_layer(self, layer: int, attn_sum: torch.Tensor) -> None:
        try:
            self._grp.create_dataset(f"{layer:04d}", data=attn_sum.numpy(), chunks=(1, min(self._L, 64), self._L),
                                     compression="lzf")
        except OSError as e:  # no space, a failing disk: one line, the temporary file goes in close()
            raise output_error(self._path, e) from None

    def close(self, ok: bool) -> None:
        """Publish the file if `ok`, else discard it; the temporary file never outlives this call."""
        try:
            self._h5.close()
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):
                raise output_error(self._path, e) from None
            raise
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._discard()

    def _discard(self) -> None:
        err = RuntimeError("capture aborted")
        try:
            self._ctx.__exit__(type(err), err, None)
        except RuntimeError:
            pass


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _strict_json(text: str) -> Any:
    """JSON without NaN/Infinity, floats out of range or integers of more than 30 digits."""
    def const(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    def flt(s: str) -> float:
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"{s} is out of range")
        return v

    def integer(s: str) -> int:
        if len(s) > 30:
            raise ValueError(f"an integer of {len(s)} digits")
        return int(s)

    return json.loads(text, parse_constant=const, parse_float=flt, parse_int=integer)


class CaptureReader:
    """Read a capture written by `CaptureWriter`, checking its format, metadata and shapes first."""

    def __init__(self, path: str):
        import h5py

        p = safe_text(path)
        if os.path.islink(path) and not os.path.exists(path):
            raise DamError(f"capture {p} is a broken symbolic link: fix it or give the .h5 file")
        if not os.path.exists(path):
            raise DamError(f"capture {p} does not exist: make one with `dam profile --save-capture FILE`")
        if not os.path.isfile(path):
            raise DamError(f"capture {p} is not a regular file: give the .h5 file written by --save-capture")
        try:
            self._h5 = h5py.File(path, "r")
        except OSError:
            raise DamError(f"{p} is not a readable HDF5 capture (corrupt or another format)") from None
        self.path = path
        try:
            self._check()
        except DamError:
            self._h5.close()
            raise
        except Exception as e:  # h5py raises KeyError/OSError/TypeError on damaged structures
            self._h5.close()
            raise self._corrupt(f"{type(e).__name__}: {e}") from None

    def _corrupt(self, what: str) -> DamError:
        return DamError(f"{safe_text(self.path)} is not a valid DAM capture ({safe_text(what)}): "
                        "capture again with --save-capture")

    def _attr(self, name: str) -> Any:
        """A scalar attribute, refused if it is an array or larger than `MAX_META_BYTES` (checked unread)."""
        a = self._h5.attrs
        if name not in a:
            return None
        aid = a.get_id(name)
        if aid.shape not in ((), None) or aid.get_storage_size() > MAX_META_BYTES:
            raise self._corrupt(f"attribute {name} is not a single short value")
        v = a[name]
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

    def _check_links(self) -> None:
        """Only hard links to groups and datasets stored in this file: nothing is read from elsewhere."""
        import h5py

        stack = [("", self._h5)]
        seen = 0
        while stack:
            prefix, grp = stack.pop()
            for name in grp:
                seen += 1
                if seen > MAX_LAYERS + 16:
                    raise self._corrupt("it holds far more objects than a capture")
                where = f"{prefix}/{name}"
                link = grp.get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise self._corrupt(f"{where} is an external link to {link.filename}; a capture is self-contained")
                if not isinstance(link, h5py.HardLink):
                    raise self._corrupt(f"{where} is a soft link; a capture holds none")
                obj = grp[name]
                if isinstance(obj, h5py.Group):
                    stack.append((where, obj))
                elif isinstance(obj, h5py.Dataset):
                    if obj.external:
                        raise self._corrupt(f"{where} keeps its data in an external file "
                                            f"({obj.external[0][0]}); a capture is self-contained")
                    if obj.is_virtual:
                        raise self._corrupt(f"{where} is a virtual dataset; a capture is self-contained")

    def _check(self) -> None:
        import h5py

        if self._attr("dam.format") != FORMAT:
            raise DamError(f"{safe_text(self.path)} is an HDF5 file but not a DAM capture")
        schema = self._attr("dam.schema")
        if not (isinstance(schema, (int, np.integer)) and int(schema) == SCHEMA):
            raise DamError(f"{safe_text(self.path)} has capture schema {safe_text(schema)}, this dam reads "
                           f"{SCHEMA}: re-capture it")
        raw = self._attr("dam.meta")
        if not isinstance(raw, str) or len(raw) > MAX_META_BYTES:
            raise self._corrupt(f"dam.meta is not a JSON string of at most {MAX_META_BYTES:,} characters")
        try:
            meta = _strict_json(raw)
        except (ValueError, RecursionError) as e:
            raise self._corrupt(f"dam.meta is not strict JSON: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) \
                or not isinstance(meta.get("calibration"), dict):
            raise self._corrupt("dam.meta lacks the model or calibration")
        model, L = self._check_model(meta["model"]), meta.get("pcl")
        if not _is_int(L, 2, MAX_PCL):
            raise self._corrupt(f"pcl must be an integer from 2 to {MAX_PCL}, got {L!r:.40}")
        if model.get("max_position") and L > model["max_position"]:
            raise self._corrupt(f"pcl {L} is above the model's context of {model['max_position']} tokens")
        self._check_links()
        if "lengths" not in self._h5 or "attn_sum" not in self._h5:
            raise self._corrupt("lengths or attn_sum missing")
        ds = self._h5["lengths"]
        if ds.ndim != 1 or not 1 <= ds.shape[0] <= MAX_SAMPLES or ds.dtype.kind not in "iu":
            raise self._corrupt(f"lengths must be 1 to {MAX_SAMPLES:,} integers, got {ds.dtype} {list(ds.shape)}")
        lengths = ds[()]
        if int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise self._corrupt(f"lengths must be 1 to {L} tokens per sample")
        self._check_calibration(meta["calibration"], lengths)
        self._shape = (int(model["n_heads"]), L, L)
        names = sorted(self._h5["attn_sum"])
        want = [f"{i:04d}" for i in range(model["n_layers"])]
        if names != want[:len(names)]:
            raise self._corrupt(f"attn_sum holds {len(names)} entries, not the layers 0..{model['n_layers'] - 1}")
        if len(names) < len(want):
            raise DamError(f"capture {safe_text(self.path)} is missing layer {len(names)} of {len(want)}: it was "
                           "interrupted; capture again")
        self._attention = (meta.get("attention"), int(model["n_layers"]))  # checked at first use (`windows`)
        for name in names:
            d = self._h5["attn_sum"][name]
            if not isinstance(d, h5py.Dataset) or tuple(d.shape) != self._shape or d.dtype != np.float32:
                raise self._corrupt(f"layer {int(name)} is {getattr(d, 'dtype', 'a group')} "
                                    f"{list(getattr(d, 'shape', []))}, expected float32 {list(self._shape)}")
        self.meta: dict[str, Any] = meta
        self.lengths: list[int] = [int(x) for x in lengths]

    def _check_model(self, model: dict) -> dict:
        """The model identity, as strictly as a profile's: the derived profile must pass `--check`."""
        bounds = {"n_layers": MAX_LAYERS, "n_heads": MAX_HEADS, "n_kv_heads": MAX_HEADS, "head_dim": MAX_HEAD_DIM}
        for k, hi in bounds.items():
            if not _is_int(model.get(k), 1, hi):
                raise self._corrupt(f"model.{k} must be an integer from 1 to {hi}, got {model.get(k)!r:.40}")
        if model["n_heads"] % model["n_kv_heads"]:
            raise self._corrupt(f"model.n_heads {model['n_heads']} is not a multiple of "
                                f"n_kv_heads {model['n_kv_heads']}")
        for k in ("name", "architecture", "config_sha256"):
            if k in model and not isinstance(model[k], str):
                raise self._corrupt(f"model.{k} must be a string")
        for k in ("max_position", "hidden_size", "vocab_size", "intermediate_size"):
            if k in model and not _is_int(model[k], 0, 2**62):
                raise self._corrupt(f"model.{k} must be a non-negative integer")
        if "rope" in model and not (isinstance(model["rope"], dict) and all(
                isinstance(v, (int, float, str, bool)) for v in model["rope"].values())):
            raise self._corrupt("model.rope must be a JSON object of plain values")
        return model

    @property
    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: global), checked at first use, after the checks of the layers."""
        return self._checked_attention()[0]

    @property
    def softcaps(self) -> list[float | None]:
        """Each layer's soft-cap (None: none), checked like `windows`."""
        return self._checked_attention()[1]

    def _checked_attention(self) -> tuple[list[int | None], list[float | None]]:
        if not hasattr(self, "_attention_checked"):
            self._attention_checked = self._check_attention(*self._attention)
        return self._attention_checked

    def _check_attention(self, att: Any, n: int) -> tuple[list[int | None], list[float | None]]:
        """Per layer window and soft-cap; a capture older than them holds none (every layer None)."""
        if att is None:
            return [None] * n, [None] * n
        if not isinstance(att, dict) or not all(isinstance(att.get(k), list) and len(att[k]) == n
                                                for k in ("windows", "softcaps")):
            raise self._corrupt(f"dam.meta attention must hold windows and softcaps, {n} entries each")
        if not all(w is None or _is_int(w, 1, MAX_WINDOW) for w in att["windows"]):
            raise self._corrupt(f"a window must be an integer from 1 to {MAX_WINDOW} or null")
        if not all(c is None or (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0)
                   for c in att["softcaps"]):
            raise self._corrupt("a soft-cap must be a positive number or null")
        return list(att["windows"]), [None if c is None else float(c) for c in att["softcaps"]]

    def _check_calibration(self, calib: dict, lengths: np.ndarray) -> None:
        for k in ("source", "token_sha256"):
            if k in calib and not isinstance(calib[k], str):
                raise self._corrupt(f"calibration.{k} must be a string")
        n, tokens = int(lengths.shape[0]), int(lengths.sum())
        if "samples" in calib and not (_is_int(calib["samples"], n, n)):
            raise self._corrupt(f"calibration.samples is {calib['samples']!r:.40} but lengths lists {n} samples")
        if "tokens" in calib and not (_is_int(calib["tokens"], tokens, tokens)):
            raise self._corrupt(f"calibration.tokens is {calib['tokens']!r:.40} but the lengths add up to {tokens}")

    def layers(self, only: list[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Each layer's sums (or those of the layers in `only`), checked: finite, non-negative, zero outside
        the layer's window, and each row adds up to its sample count."""
        n = int(self.meta["model"]["n_layers"])
        cnt = np.zeros(self._shape[1], dtype=np.float64)
        for x in self.lengths:
            cnt[:x] += 1
        for layer in range(n) if only is None else only:
            key = f"attn_sum/{layer:04d}"
            if key not in self._h5:
                raise DamError(f"capture is missing layer {layer}: it was interrupted; capture again")
            try:
                arr = self._h5[key][()]
            except OSError as e:  # a damaged chunk
                raise self._corrupt(f"layer {layer} cannot be read: {e}") from None
            if not np.isfinite(arr).all() or float(arr.min(initial=0.0)) < 0:
                raise self._corrupt(f"layer {layer} holds negative or non-finite attention sums")
            w = self.windows[layer]
            if w is not None and w < arr.shape[1] and np.tril(arr, -w).any():
                raise self._corrupt(f"layer {layer} has attention beyond its sliding window of {w}")
            rows = arr.sum(axis=-1, dtype=np.float64)  # [H, L]: each sample adds 1 to the rows it covers
            worst = float(np.abs(rows - cnt).max(initial=0.0))
            if worst > _SUM_SLACK * max(1.0, float(cnt.max())):
                raise self._corrupt(f"layer {layer} is not a sum of attention probabilities (a row differs from "
                                    f"its sample count by {worst:.3g})")
            yield layer, torch.from_numpy(arr)

    def close(self) -> None:
        self._h5.close()
