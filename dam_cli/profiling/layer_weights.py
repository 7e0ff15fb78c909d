"""Reading a model's weights a few tensors at a time, in float32, by their Hugging Face names.

Two sources: a folder of safetensors files (one shard or many, with or without an index) and a GGUF file. Neither
keeps a file mapped between reads, so memory holds only what was read last: a streamed profile reads one decoder
layer's tensors, uses them, and drops them. GGUF tensors are de-quantised with the `gguf` package and renamed to
Hugging Face names with its tensor-name map, as transformers' GGUF loader does, including its fix-ups: the reverse
of llama.cpp's q/k row permutation for llama-type files, and Gemma's norm weights stored as 1 + w.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from dam_cli.errors import DamError
from dam_cli.text import safe_text

FP32_BYTES = 4
_INDEX = "model.safetensors.index.json"


def open_weights(folder: str, gguf_file: str | None, n_layers: int | None = None):
    """The weight source of a model folder, or of `folder/gguf_file` when that is given (n_layers: the config's,
    else the GGUF's block count)."""
    if gguf_file:
        return GGUFWeights(os.path.join(folder, gguf_file), n_layers)
    return SafetensorsWeights(folder)


# ---- safetensors ----------------------------------------------------------------------------------------------------

class SafetensorsWeights:
    """Tensors of the `*.safetensors` files of a folder (the index's files when there is an index)."""

    def __init__(self, folder: str):
        from safetensors import SafetensorError, safe_open

        index = os.path.join(folder, _INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f).get("weight_map", {}).values()))
        else:
            files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if not files:
            raise DamError(f"{safe_text(folder)} holds no .safetensors weights: streaming reads safetensors "
                           "folders and GGUF files (convert other formats with save_pretrained)")
        self.where: dict[str, str] = {}  # tensor name -> file
        self.numel = 0
        for name in files:
            path = os.path.join(folder, name)
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():
                        self.where[key] = path
                        self.numel += _numel(f.get_slice(key).get_shape())
            except (OSError, SafetensorError) as e:
                raise DamError(f"cannot read the weights file {safe_text(path)}: {safe_text(str(e).splitlines()[0])} "
                               "(a damaged or partly copied file?): copy or save it again") from None

    def fp32_bytes(self) -> int:
        """Bytes the whole model takes once loaded in float32."""
        return self.numel * FP32_BYTES

    def _path(self, name: str) -> str:
        if name not in self.where:
            raise DamError(f"the checkpoint has no tensor {safe_text(name)}: this model's weights are named unlike "
                           "its transformers class; profile it without --stream")
        return self.where[name]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """float32 copies of the named tensors; each file is opened once and closed after."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self._path(n), []).append(n)
        out = {}
        for path, group in by_file.items():
            with safe_open(path, framework="pt") as f:
                for n in group:
                    out[n] = f.get_tensor(n).to(torch.float32).clone()
        return out

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """float32 rows `ids` of a 2-D tensor (an embedding table), without reading the rest."""
        from safetensors import safe_open

        with safe_open(self._path(name), framework="pt") as f:
            table = f.get_slice(name)
            return torch.cat([table[i: i + 1] for i in ids]).to(torch.float32)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---- GGUF -----------------------------------------------------------------------------------------------------------

# GGUF architectures whose tensors transformers rewrites in ways this reader does not (merged experts, renamed
# or reshaped tensors). Llama's q/k permutation and Gemma's norms are handled here.
_UNSUPPORTED_GGUF = {"qwen2moe", "qwen3moe", "gpt_oss", "gpt-oss", "bloom", "t5", "t5encoder", "gpt2", "mamba",
                     "nemotron", "lfm2", "minimax-m2"}
_NORM_PLUS_ONE = {"gemma2", "gemma3"}  # llama.cpp stores these norms as 1 + w


class GGUFWeights:
    """Tensors of one GGUF file, de-quantised to float32 and named as transformers names them."""

    def __init__(self, path: str, n_layers: int | None = None):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        try:
            reader = GGUFReader(path)  # parses the header; tensor data is only mapped, never read here
        except (ValueError, OSError) as e:
            raise DamError(f"cannot read GGUF {safe_text(path)}: the file is damaged or incomplete (a part of it "
                           f"missing?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        self.path = path
        field = reader.fields.get("general.architecture")
        self.arch = field.contents() if field is not None else ""
        if self.arch in _UNSUPPORTED_GGUF:
            raise DamError(f"streaming a GGUF of architecture {safe_text(self.arch)} is not supported: profile it "
                           "without --stream, or convert it to a safetensors folder first")
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == self.arch), None)
        if arch is None:
            raise DamError(f"the gguf package does not know the architecture {safe_text(self.arch)} of "
                           f"{safe_text(path)}: upgrade it (pip install -U gguf)")
        n_layers = n_layers or _int_field(reader, f"{self.arch}.block_count") or 0
        self.name_map = get_tensor_name_map(arch, n_layers)
        self.infos = {t.name: (int(t.data_offset), int(t.n_bytes), t.data.dtype, tuple(t.data.shape), t.tensor_type,
                               _numel(t.shape)) for t in reader.tensors}
        # As transformers: without both head counts in the file, q and k are left as stored.
        self.heads = (_int_field(reader, f"{self.arch}.attention.head_count"),
                      _int_field(reader, f"{self.arch}.attention.head_count_kv"))
        size = os.path.getsize(path)
        end = max((off + n for off, n, *_ in self.infos.values()), default=0)
        if end > size:
            raise DamError(f"{safe_text(path)} is incomplete: its tensors need {end:,} bytes, the file has "
                           f"{size:,} (a part of it is missing)")
        del reader

    def fp32_bytes(self) -> int:
        return sum(info[5] for info in self.infos.values()) * FP32_BYTES

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF tensor holding the Hugging Face parameter `hf_name`."""
        base, _, suffix = hf_name.rpartition(".")
        for key in (base, base.removeprefix("model.")):
            mapped = self.name_map.get_name(key)
            if mapped is not None and f"{mapped}.{suffix}" in self.infos:
                return f"{mapped}.{suffix}"
        raise DamError(f"{safe_text(self.path)} has no tensor for {safe_text(hf_name)}: this GGUF does not match "
                       "its transformers class; profile it without --stream")

    def _raw(self, f, name: str, first_row: int = 0, n_rows: int | None = None) -> np.ndarray:
        """Rows of the stored (still quantised) tensor, read from the open file `f` with plain reads."""
        offset, n_bytes, dtype, shape, _, _ = self.infos[name]
        row_bytes = n_bytes // shape[0]
        n_rows = shape[0] if n_rows is None else n_rows
        f.seek(offset + first_row * row_bytes)
        buf = f.read(n_rows * row_bytes)
        return np.frombuffer(buf, dtype=dtype).reshape((n_rows, *shape[1:]))

    def _float(self, name: str, raw: np.ndarray) -> np.ndarray:
        from gguf import dequantize

        w = dequantize(raw, self.infos[name][4])
        if self.arch == "llama" and None not in self.heads and (".attn_q." in name or ".attn_k." in name):
            w = _unpermute(w, self.heads[0] if ".attn_q." in name else self.heads[1])
        if self.arch in _NORM_PLUS_ONE and "norm.weight" in name:
            w = w - 1
        return w

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        with open(self.path, "rb") as f:
            for hf in names:
                g = self.gguf_name(hf)
                out[hf] = torch.from_numpy(np.array(self._float(g, self._raw(f, g)), dtype=np.float32, copy=True))
        return out

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        g = self.gguf_name(name)
        with open(self.path, "rb") as f:
            parts = [self._float(g, self._raw(f, g, i, 1)) for i in ids]
        return torch.from_numpy(np.array(np.concatenate(parts), dtype=np.float32, copy=True))


def _int_field(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    value: Any = field.contents() if field is not None else None
    return int(value) if isinstance(value, (int, np.integer)) else None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation: each head's rows go from interleaved rotary pairs back to two halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
