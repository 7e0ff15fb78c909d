"""`dam generate` as a library call: one prompt, one model, DAM (or dense) attention, with stats.

`run_generate(cfg, on_text)` checks everything it can before any model work (options, prompt,
device, profile file, profile/model match, prompt length), then runs prefill and a greedy or
sampled decode loop (`dam_cli.runtime.decode`, shared with `benchmarks/generate.py`, so the
benchmark measures what users run), streaming text through `on_text`. Many prompts (JSON lines):
`dam_cli.runtime.generate_batch.run_batch`, on the same `load_run` and `switch_attention`.

Module-level imports are torch only (no typer, rich or h5py), so the benchmark can import it on
a machine that has nothing but torch and transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from dam_kernels.selection import MASS_SCORES, DynamicFlags, DynamicSelection, resolve_dynamic

from dam_cli.errors import DamError, DamUsageError
from dam_cli.runtime.decode import TextStream, decode_loop, eos_ids_of, graph_decode_loop, make_picker
from dam_cli.runtime.placement import check_placement, input_device, peak_memory, placement_kwargs, reset_peak_memory
from dam_cli.runtime.prompt_input import MAX_PROMPT_BYTES, read_input, read_prompt  # noqa: F401 (re-exported)

# full = the model's full attention through our registry (windows and soft-capping included);
# sdpa = transformers' own attention: SDPA, or eager where SDPA is not this model (Gemma 2's soft-capping)
ATTENTION_CHOICES = ("dam", "full", "sdpa")
DEFAULT_BATCH_SIZE = 8  # prompts per batch of a JSON-lines prompt file


def is_batch(cfg: GenerateConfig) -> bool:
    """Whether the prompts come as JSON lines (`--jsonl`, or a prompt file named *.jsonl), one batch run."""
    return cfg.jsonl or (cfg.prompt_file or "").lower().endswith(".jsonl")


@dataclass(frozen=True)
class GenerateConfig:
    """Everything `dam generate` needs; the CLI fills it from its options."""

    profile: str | None  # profile file; required for attention "dam"
    model: str | None = None  # model spec for load_model (None = embedded SmolLM2)
    prompt: str | None = None  # prompt text (exclusive with prompt_file)
    prompt_file: str | None = None  # prompt file, "-" for stdin; neither given -> stdin
    max_new_tokens: int = 128  # tokens to generate at most (stops earlier at end-of-sequence)
    attention: str = "dam"  # dam | full (dense, same registry path) | sdpa (transformers', eager if no sdpa)
    backend: str = "auto"  # dam kernels: auto (Triton on CUDA, reference on CPU) | triton | reference
    chat: bool = False  # wrap the prompt in the tokenizer's chat template as one user turn
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | float16 | bfloat16
    seed: int = 0  # seeds sampling (greedy ignores it)
    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0  # nucleus sampling threshold (needs temperature > 0)
    top_k: int = 0  # keep the k most likely tokens; 0 = off (needs temperature > 0)
    ignore_eos: bool = False  # always generate max_new_tokens (for timing)
    dynamic: DynamicSelection | DynamicFlags | None = None  # beyond the paper (flags: over the profile's setting)
    cuda_graph: bool = False  # decode with a static cache, one CUDA graph replayed per token (graph_decode)
    jsonl: bool = False  # the prompt file holds JSON lines (implied by a .jsonl name): dam_cli.runtime.generate_batch
    batch_size: int | None = None  # prompts per batch with JSON lines (None: DEFAULT_BATCH_SIZE)
    tp: bool = False  # heads split over the torchrun ranks (from_pretrained tp_plan="auto"); rank 0 reports
    device_map: str | None = None  # layers spread over the devices (from_pretrained device_map), e.g. "auto"


@dataclass(frozen=True)
class GenerateResult:
    """The output text and the run's statistics (times in seconds, memory in bytes)."""

    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float  # prefill start to first token id on the host
    decode_tokens_per_s: float | None  # tokens after the first / their time; None if only one token
    decode_ms_per_token: float | None
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda max allocated" or "cpu peak rss"
    density: float | None  # mean over layers and heads of the profile's density at prompt length
    finish_reason: str  # "eos" or "length"
    attention: str
    backend: str | None  # the DAM kernels that ran: "triton", "compiled", "gathered" or "reference" (never "auto")
    device: str
    dtype: str
    model: str
    profile: str | None
    # the dynamic part when on: {"topk", "block", "tail_topk", "score"} (density above is the static mask's)
    dynamic: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Checks and inputs
# ----------------------------------------------------------------------------------------------

def check_dynamic(dynamic: DynamicSelection, cuda_graph: bool) -> DynamicSelection:
    """Return `dynamic`, or raise DamUsageError naming the flag it breaks (the graph loop's block too)."""
    from dam_cli.runtime.decode import check_graph_dynamic

    dynamic.validate(cli=True, error=DamUsageError)
    if cuda_graph:
        check_graph_dynamic(dynamic, DamUsageError)
    return dynamic


MAX_NEW_TOKENS = 10**8  # no model's context is longer; larger values would only overflow later
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_TOP_K = 2**31 - 1  # beyond any vocabulary


def check_sampling(temperature: float, top_p: float, top_k: int, seed: int, max_new_tokens: int) -> None:
    """Refuse sampling options no generation can use, before the model loads: `DamUsageError` (exit 2) naming the
    flag (not torch's error from inside the first step). NaN and infinities parse as floats, and integers of any
    size as ints."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise DamUsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise DamUsageError(f"--top-p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= MAX_TOP_K:
        raise DamUsageError(f"--top-k must be from 0 to {MAX_TOP_K:,} (0 = all tokens), got {top_k:,}")
    if not 0 <= seed <= MAX_SEED:
        raise DamUsageError(f"--seed must be from 0 to {MAX_SEED:,} (2^63 - 1), got {seed:,}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise DamUsageError(f"--max-new-tokens must be from 1 to {MAX_NEW_TOKENS:,}, got {max_new_tokens:,}")


def check_config(cfg: GenerateConfig) -> None:
    """Reject option values that cannot work, before anything is loaded."""
    if cfg.attention not in ATTENTION_CHOICES:
        raise DamUsageError(f"unknown --attention {cfg.attention!r}: choose one of {', '.join(ATTENTION_CHOICES)}")
    if cfg.attention == "dam" and not cfg.profile:
        raise DamUsageError("--profile is required with --attention dam: make one with `dam profile`, "
                            "or pass --attention full")
    from dam_cli.runtime.attention import BACKENDS

    if cfg.backend not in BACKENDS:
        raise DamUsageError(f"unknown --backend {cfg.backend!r}: choose one of {', '.join(BACKENDS)}")
    check_sampling(cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed, cfg.max_new_tokens)  # as the CLI does
    if cfg.temperature == 0 and (cfg.top_p < 1 or cfg.top_k > 0):
        raise DamUsageError("--top-p and --top-k only apply when sampling, and --temperature 0 is greedy: give "
                            "--temperature above 0 (e.g. 0.7), or drop --top-p and --top-k")
    if cfg.prompt is not None and cfg.prompt_file is not None:
        raise DamUsageError("give either --prompt or --prompt-file, not both")
    if cfg.jsonl and cfg.prompt is not None:
        raise DamUsageError("--jsonl reads JSON lines from --prompt-file (or stdin), not from --prompt")
    if cfg.batch_size is not None and not is_batch(cfg):
        raise DamUsageError("--batch-size applies to JSON-lines prompts: give --prompt-file PROMPTS.jsonl (or --jsonl)")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise DamUsageError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if isinstance(cfg.dynamic, (DynamicSelection, DynamicFlags)):  # flags: again over the profile's setting
        check_dynamic(cfg.dynamic if isinstance(cfg.dynamic, DynamicSelection) else cfg.dynamic.over_any(),
                      cfg.cuda_graph)
    elif cfg.dynamic is not None:
        raise DamUsageError(f"GenerateConfig.dynamic must be a DynamicSelection, got {type(cfg.dynamic).__name__}")
    if cfg.cuda_graph and cfg.device == "cpu":
        raise DamUsageError("--cuda-graph needs a CUDA device: drop it, or pass --device cuda")
    check_placement(cfg)  # --tp, --device-map


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of the prompt: plain text as the tokenizer adds specials, or one chat user turn."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DamError("this model's tokenizer has no chat template: drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text)["input_ids"])


def model_context(model) -> int:
    """The model's context length in tokens (max_position_embeddings), 0 if unknown."""
    return int(getattr(model.config, "max_position_embeddings", 0) or 0)


def check_length(n_prompt: int, max_new_tokens: int, context: int) -> None:
    """Refuse a prompt (plus the tokens to generate) that does not fit the model's context."""
    if n_prompt < 1:
        raise DamUsageError("the prompt encodes to no tokens: give some text")
    if context and n_prompt > context:
        raise DamError(f"the prompt is {n_prompt:,} tokens, longer than the model's context of {context:,} "
                       "tokens: shorten it")
    if context and n_prompt + max_new_tokens > context:
        raise DamError(f"the prompt is {n_prompt:,} tokens and --max-new-tokens {max_new_tokens:,} would reach "
                       f"{n_prompt + max_new_tokens:,}, beyond the model's context of {context:,} tokens: "
                       f"use --max-new-tokens {context - n_prompt} or less, or shorten the prompt")


def backend_that_ran(backend: str, identity: dict[str, Any], device: str, dtype: torch.dtype,
                     dyn_block: int = 0) -> str:
    """The DAM kernels a run used, never "auto". `auto` resolves as `sparse_attention` does: on the CPU
    (generation needs no gradients) the compiled kernels where the machine built them and they take the model's
    calls (float32 or bfloat16, a head dim a multiple of 16 up to 256, no soft-capping), else the gathered
    block-sparse path (also for a dynamic part whose blocks, `dyn_block`, are not the compiled kernel's 64 keys);
    Triton on CUDA where `triton_refusal` has no reason (dtype, head dim), else the reference."""
    if backend in ("auto", "compiled") and device == "cpu":
        from dam_kernels import cpu_sparse

        q = torch.empty(1, 1, 1, int(identity["head_dim"]), dtype=dtype)
        takes = cpu_sparse.supports(q, dyn_block=dyn_block, softcap=identity.get("attn_logit_softcapping") or None)
        return "compiled" if takes and cpu_sparse.load() is not None else "gathered"
    if backend != "auto":
        return backend
    if not device.startswith("cuda"):
        return "reference"
    from dam_cli.runtime.attention import triton_refusal

    q = torch.empty(1, 1, 1, int(identity["head_dim"]), dtype=dtype, device="meta")
    why = triton_refusal(q, window=identity.get("sliding_window"), softcap=identity.get("attn_logit_softcapping"))
    return "triton" if why is None else "reference"


# ----------------------------------------------------------------------------------------------
# The library call
# ----------------------------------------------------------------------------------------------

def run_generate(cfg: GenerateConfig, on_text: Callable[[str], None] | None = None,
                 stdin=None, log: Callable[[str], None] | None = None) -> GenerateResult:
    """Generate from one prompt with DAM (or dense) attention and return the text and statistics.

    Everything checkable is checked before any model work: options, prompt, device, the profile
    file, the profile against the model, the prompt length against the model's context. Text
    pieces go to `on_text` as they are generated; `log` gets progress lines (to stderr in the CLI).
    """
    from dam_cli.runtime import backend as dam_backend

    log = log or (lambda _m: None)
    check_config(cfg)
    if is_batch(cfg):
        raise DamUsageError("JSON-lines prompts run as batches: call dam_cli.runtime.generate_batch.run_batch")
    text = read_prompt(cfg, stdin)
    run = load_run(cfg, log)
    model, tok, profile, dynamic, device = run.model, run.tokenizer, run.profile, run.dynamic, run.device
    ids = encode_prompt(tok, text, cfg.chat)
    check_length(len(ids), cfg.max_new_tokens, model_context(model))

    pick = switch_attention(run, cfg)
    stream = TextStream(tok, on_text or (lambda _s: None))
    reset_peak_memory(model)

    def routed() -> None:  # every layer must have gone through the registry, or DAM did nothing
        if cfg.attention != "sdpa":
            dam_backend.check_routed(model)

    log(f"prefill of {len(ids):,} tokens")
    dam_backend.reset_seen(model)
    loop = graph_decode_loop if cfg.cuda_graph else decode_loop
    try:
        res = loop(model, torch.tensor([ids], dtype=torch.long, device=device),
                   max_new_tokens=cfg.max_new_tokens, pick=pick,
                   eos_ids=() if cfg.ignore_eos else eos_ids_of(model, tok),
                   on_token=stream.put, after_prefill=routed)
    finally:
        dam_backend.disable_dam(model)
    peak, peak_kind = peak_memory(model)
    density = float(profile.density(len(ids)).mean()) if profile is not None else None
    n_dec = len(res.tokens) - 1
    rate = n_dec / res.decode_s if n_dec and res.decode_s > 0 else None
    return GenerateResult(
        text=stream.text(), prompt_tokens=len(ids), new_tokens=len(res.tokens), ttft_s=res.ttft_s,
        decode_tokens_per_s=rate, decode_ms_per_token=(1000.0 / rate) if rate else None,
        peak_memory_bytes=peak, peak_memory_kind=peak_kind, density=density,
        finish_reason=res.finish_reason, attention=cfg.attention, backend=ran_backend(run, cfg), device=device,
        dtype=str(run.dtype).removeprefix("torch."), model=run.loaded.source, profile=cfg.profile,
        dynamic=dynamic.as_dict() if cfg.attention == "dam" and dynamic.on else None)


@dataclass
class LoadedRun:
    """What a generation run works with once loaded: the model and its tokenizer, the profile (or None),
    the dynamic part resolved (flags, else the profile's recommendation, else off), device and dtype."""

    model: Any
    tokenizer: Any
    loaded: Any  # dam_cli.runtime.models' loaded model (source, identity)
    profile: Any
    dynamic: DynamicSelection
    device: str
    dtype: torch.dtype


def load_run(cfg: GenerateConfig, log: Callable[[str], None]) -> LoadedRun:
    """Resolve device and dtype, load the profile and the model, check they match, resolve the dynamic part."""
    from dam_cli.runtime import backend as dam_backend
    from dam_cli.runtime.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    if cfg.cuda_graph and not device.startswith("cuda"):
        raise DamError(f"--cuda-graph needs a CUDA device, and this run is on {device}: drop --cuda-graph")
    dtype = resolve_dtype(cfg.dtype, device)
    profile = None
    if cfg.profile:
        from dam_cli.artifact.profile import load_profile

        profile = load_profile(cfg.profile)
    # The dynamic flags given over the setting the profile recommends (dam.runtime), else off; other attentions
    # ignore the flags (the command says so), so they are not checked against a setting that is never used.
    recommended = dam_backend.recommended_dynamic(profile) if profile is not None else None
    flags = cfg.dynamic if cfg.attention == "dam" else None
    dynamic = check_dynamic(resolve_dynamic(flags, recommended, DynamicSelection()), cfg.cuda_graph)
    log("loading model")
    loaded = load_model(cfg.model, device=device, dtype=dtype, **placement_kwargs(cfg))
    model, tok = loaded.model, loaded.tokenizer
    device = input_device(model) if cfg.tp or cfg.device_map else device  # where the placed model takes its input
    if profile is not None:
        dam_backend.check_profile_matches(profile, loaded.identity, model_arg=cfg.model)
    return LoadedRun(model=model, tokenizer=tok, loaded=loaded, profile=profile, dynamic=dynamic, device=device,
                     dtype=dtype)


def switch_attention(run: LoadedRun, cfg: GenerateConfig):
    """Put the model on the attention `cfg` asks for, seed, and return the token picker (greedy or sampling).
    Undo with `dam_backend.disable_dam(run.model)`."""
    from dam_cli.runtime import backend as dam_backend
    from dam_cli.runtime.models import attention_for

    model = run.model
    if cfg.attention == "dam":
        dam_backend.enable_dam(model, run.profile, backend=cfg.backend, dynamic=run.dynamic)
    elif cfg.attention == "full":
        dam_backend.enable_dense(model)
    else:
        model.set_attn_implementation(attention_for(model.config, type(model), "sdpa"))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=run.device).manual_seed(cfg.seed) if cfg.temperature > 0 else None
    return make_picker(cfg.temperature, cfg.top_p, cfg.top_k, gen)


def ran_backend(run: LoadedRun, cfg: GenerateConfig) -> str | None:
    """The DAM kernels that ran (`backend_that_ran`), None without DAM attention."""
    if cfg.attention != "dam":
        return None
    block = run.dynamic.block if run.dynamic.on else 0
    return backend_that_ran(cfg.backend, run.loaded.identity, run.device, run.dtype, block)


def format_stats(r: GenerateResult) -> str:
    """One human line of statistics for stderr."""
    mib = r.peak_memory_bytes / 2**20
    parts = [f"prompt {r.prompt_tokens:,} tokens", f"first token {r.ttft_s:.3f} s"]
    if r.decode_tokens_per_s:
        parts.append(f"decode {r.decode_tokens_per_s:.1f} tokens/s ({r.decode_ms_per_token:.1f} ms/token, "
                     f"{r.new_tokens} tokens, {r.finish_reason})")
    else:
        parts.append(f"{r.new_tokens} token ({r.finish_reason})")
    parts.append(f"peak memory {mib:,.0f} MiB ({r.peak_memory_kind})")
    if r.density is not None and r.attention != "dam":  # the profile's, for comparison: nothing was masked
        parts.append(f"profile density at {r.prompt_tokens:,} tokens {100 * r.density:.2f}% (not used: "
                     f"--attention {r.attention})")
    elif r.density is not None:
        kind = " (static part)" if r.dynamic else ""
        parts.append(f"DAM density{kind} at {r.prompt_tokens:,} tokens {100 * r.density:.2f}%")
    if r.dynamic:
        d = r.dynamic
        if d["score"] in MASS_SCORES:
            prompt = d.get("mass", d["tail_mass"])
            tail = "" if prompt == d["tail_mass"] else f" ({d['tail_mass']} of it)"
            parts.append(f"dynamic blocks of {d['block']} by attention mass {prompt} "
                         f"({MASS_SCORES[d['score']]} estimate, at most {d['topk']}; exact in the tail{tail}, at most "
                         f"{d['tail_topk']})")
        else:
            tail = f", tail {d['tail_topk']}" if d["tail_topk"] != d["topk"] else ""
            score = f", {d['score']} score" if d["score"] != "mean" else ""
            score += f", tail mass {d['tail_mass']}" if d.get("tail_mass") is not None else ""
            parts.append(f"dynamic top-{d['topk']} x {d['block']}{tail}{score}")
    att = f"attention {r.attention}" + (f" ({r.backend})" if r.backend else "")
    parts.append(f"{att}, {r.device}, {r.dtype}")
    return " · ".join(parts)
