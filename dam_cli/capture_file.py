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

from .atomic import atomic_open
from .errors import DamError

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
        self._h5.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            err = RuntimeError("capture aborted")
            try:
                self._ctx.__exit__(type(err), err, None)
            except RuntimeError:
                pass


class CaptureReader:
    """Read a capture written by `CaptureWriter`, checking its format first."""

    def __init__(self, path: str):
        import h5py

        if not os.path.isfile(path):
            raise DamError(f"capture {path} does not exist: make one with `dam profile --save-capture FILE`")
        try:
            self._h5 = h5py.File(path, "r")
        except OSError:
            raise DamError(f"{path} is not a readable HDF5 capture (corrupt or another format)") from None
        a = self._h5.attrs
        if a.get("dam.format") != FORMAT:
            raise DamError(f"{path} is an HDF5 file but not a DAM capture")
        if int(a.get("dam.schema", -1)) != SCHEMA:
            raise DamError(f"{path} has capture schema {a.get('dam.schema')}, this dam reads {SCHEMA}: re-capture it")
        self.meta: dict[str, Any] = json.loads(a["dam.meta"])
        self.lengths: list[int] = [int(x) for x in self._h5["lengths"][()]]

    def layers(self) -> Iterator[tuple[int, torch.Tensor]]:
        n = int(self.meta["model"]["n_layers"])
        for layer in range(n):
            key = f"attn_sum/{layer:04d}"
            if key not in self._h5:
                raise DamError(f"capture is missing layer {layer}: it was interrupted; capture again")
            yield layer, torch.from_numpy(self._h5[key][()])

    def close(self) -> None:
        self._h5.close()
