"""What `dam_cli.runtime.models.load_model` checks of a transformers load, as one-line DamErrors: tensors the config
asks for that the weights lack (transformers fills them with random numbers and only logs it), tensors whose shape
differs from the config's, a folder without tokenizer files (transformers' message stops at a colon), and a GGUF file
cut short (the reader's struct or reshape error)."""

from __future__ import annotations

import struct

from dam_cli.errors import DamError
from dam_cli.text import safe_text


def check_loading_info(info: dict, source: str) -> None:
    """Refuse a load whose `output_loading_info` names missing or mismatched tensors (loaded with
    `ignore_mismatched_sizes=True`, so that the mismatch is reported here, not in a log the error points to)."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise DamError(f"{source} lacks {len(missing)} of the tensors its config asks for (e.g. "
                       f"{safe_text(missing[0])}): incomplete weights, or a config of another shape")
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, have, want = (list(mismatched[0]) + [None, None])[:3]
        shapes = f": {list(have)} in the weights, {list(want)} in config.json" if have is not None else ""
        raise DamError(f"{source} holds {len(mismatched)} tensors of another shape than its config says (e.g. "
                       f"{safe_text(str(key))}{shapes}): the weights belong to another config")


def tokenizer_error(e: BaseException, source: str) -> DamError | None:
    """A DamError for a folder whose tokenizer cannot be built (no tokenizer files), else None."""
    if "Couldn't instantiate the backend tokenizer" in str(e):
        return DamError(f"{source} has no tokenizer files transformers can read (tokenizer.json, or tokenizer.model "
                        "with sentencepiece installed): copy the model's tokenizer files into it")
    return None


# What numpy and struct say of a GGUF file whose header or tensor data ends early (the reader maps the bytes it has)
_CUT_SHORT = ("unpack_from requires a buffer", "cannot reshape array", "When changing to a larger dtype",
              "buffer is smaller than requested size", "mmap length is greater than file size")


def load_failure(e: BaseException, source: str, gguf: bool) -> DamError:
    """The one line for a model load that raised `e` (ValueError, KeyError, RuntimeError, a safetensors or struct
    error): no tokenizer files, a GGUF file cut short, or the library's own first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    if gguf and (isinstance(e, struct.error) or any(c in first for c in _CUT_SHORT)):
        return DamError(f"{source} is not a whole GGUF file ({safe_text(first[:160])}): it is damaged or cut short; "
                        "copy or download it again")
    return tokenizer_error(e, source) or DamError(f"cannot load model from {source}: {type(e).__name__}: "
                                                  f"{safe_text(first)}")
