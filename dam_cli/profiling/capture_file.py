"""The on-disk capture (`--save-capture` / `--from-capture`): raw Stage-1 statistics in HDF5.

Per layer the float32 sums of attention probabilities `[H, L, L]` over samples, plus the sample
lengths (the position-wise counts follow from them), the model identity and the calibration
fingerprint. Enough to re-derive masks with any tau, lam or mu without running the model.
This module is the only code touching the capture format.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dam_cli.atomic import atomic_open
from dam_cli.errors import DamError

FORMAT = "dam-capture"
SCHEMA = 1


def estimate_bytes(n_layers: int, n_heads: int, L: int) -> tuple[int, int]:
    """(likely, worst) size of a capture: the upper triangle is zeros and compresses away."""
    raw = n_layers * n_heads * L * L * 4
    return raw * (L + 1) // (2 * L) + 1_000_000, raw + 1_000_000


def check_room(path: str, n_layers: int, n_heads: int, L: int) -> str:
    """Refuse cleanly when the destination disk lacks room; return a line stating the size."""
    likely, worst = estimate_bytes(n_layers, n_heads, L)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise DamError(f"capture folder {folder} does not exist: create it or choose another path")
    free = shutil.disk_usage(folder).free
    if free < likely:
        raise DamError(f"the capture needs about {likely / 2**30:.1f} GiB but {folder} has "
                       f"{free / 2**30:.1f} GiB free: free space, choose another --save-capture path, or lower --pcl")
    return f"capture: about {likely / 2**30:.2f} GiB (at most {worst / 2**30:.2f} GiB) to {path}"


class CaptureWriter:
    """Write layer sums one at a time into an atomically published HDF5 file."""

    def __init__(self, path: str, meta: dict[str, Any], lengths: list[int], L: int, n_heads: int):
        import h5py

        self._ctx = atomic_open(path)
        f = self._ctx.__enter__()
        self._h5 = h5py.File(f, "w")
        self._h5.attrs["dam.format"] = FORMAT
        self._h5.attrs["dam.schema"] = SCHEMA
        self._h5.attrs["dam.meta"] = json.dumps(meta, sort_keys=True)
        self._h5.create_dataset("lengths", data=np.asarray(lengths, dtype=np.int64))
        self._L, self._H = L, n_heads
        self._grp = self._h5.create_group("attn_sum")

    def write_layer(self, layer: int, attn_sum: torch.Tensor) -> None:
        self._grp.create_dataset(f"{layer:04d}", data=attn_sum.numpy(), chunks=(1, min(self._L, 64), self._L),
                                 compression="lzf")

    def close(self, ok: bool) -> None:
        """Publish the file if `ok`, else discard it; the temporary file never outlives this call."""
        try:
            self._h5.close()
        except BaseException:
            self._discard()
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


class CaptureReader:
    """Read a capture written by `CaptureWriter`, checking its format and shapes first."""

    def __init__(self, path: str):
        import h5py

        if not os.path.exists(path):
            raise DamError(f"capture {path} does not exist: make one with `dam profile --save-capture FILE`")
        if not os.path.isfile(path):
            raise DamError(f"capture {path} is not a regular file: give the .h5 file written by --save-capture")
        try:
            self._h5 = h5py.File(path, "r")
        except OSError:
            raise DamError(f"{path} is not a readable HDF5 capture (corrupt or another format)") from None
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
        return DamError(f"{self.path} is not a valid DAM capture ({what}): capture again with --save-capture")

    def _check(self) -> None:
        a = self._h5.attrs
        fmt = a.get("dam.format")
        if (fmt.decode() if isinstance(fmt, bytes) else fmt) != FORMAT:
            raise DamError(f"{self.path} is an HDF5 file but not a DAM capture")
        try:
            schema = int(a.get("dam.schema", -1))
        except (TypeError, ValueError):
            schema = -1
        if schema != SCHEMA:
            raise DamError(f"{self.path} has capture schema {a.get('dam.schema')}, this dam reads {SCHEMA}: re-capture it")
        raw = a.get("dam.meta")
        try:
            meta = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except (ValueError, RecursionError):
            raise self._corrupt("dam.meta is not JSON") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) \
                or not isinstance(meta.get("calibration"), dict):
            raise self._corrupt("dam.meta lacks the model or calibration")
        model = meta["model"]
        for k in ("n_layers", "n_heads"):
            if not (isinstance(model.get(k), int) and not isinstance(model.get(k), bool) and model[k] >= 1):
                raise self._corrupt(f"model.{k} is not a positive integer")
        L = meta.get("pcl")
        if not (isinstance(L, int) and not isinstance(L, bool) and L >= 1):
            raise self._corrupt("pcl is not a positive integer")
        if "lengths" not in self._h5 or "attn_sum" not in self._h5:
            raise self._corrupt("lengths or attn_sum missing")
        lengths = self._h5["lengths"][()]
        if getattr(lengths, "ndim", 0) != 1 or lengths.size < 1 or lengths.dtype.kind not in "iu" \
                or int(lengths.min()) < 1 or int(lengths.max()) > L:
            raise self._corrupt(f"lengths must be 1 to {L} tokens per sample")
        self._shape = (int(model["n_heads"]), L, L)
        self.meta: dict[str, Any] = meta
        self.lengths: list[int] = [int(x) for x in lengths]

    def layers(self) -> Iterator[tuple[int, torch.Tensor]]:
        n = int(self.meta["model"]["n_layers"])
        for layer in range(n):
            key = f"attn_sum/{layer:04d}"
            if key not in self._h5:
                raise DamError(f"capture is missing layer {layer}: it was interrupted; capture again")
            ds = self._h5[key]
            if tuple(ds.shape) != self._shape or ds.dtype != np.float32:
                raise self._corrupt(f"layer {layer} is {ds.dtype} {list(ds.shape)}, expected float32 {list(self._shape)}")
            try:
                arr = ds[()]
            except OSError as e:  # a damaged chunk
                raise self._corrupt(f"layer {layer} cannot be read: {e}") from None
            if not np.isfinite(arr).all() or float(arr.min(initial=0.0)) < 0:
                raise self._corrupt(f"layer {layer} holds negative or non-finite attention sums")
            yield layer, torch.from_numpy(arr)

    def close(self) -> None:
        self._h5.close()
