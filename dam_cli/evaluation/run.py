"""`dam eval` as a library: how close DAM stays to full attention, against StreamingLLM at the same density.

Methods (all run on the same inputs in one call):
- `full`: causal attention. Wherever DAM runs the exact PyTorch reference (CPU), `full` runs the
  same reference with only the causal mask, so the two differ in their mask and nothing else (an
  all-allowed profile gives bit-identical numbers). On CUDA with Triton, `full` is dense SDPA.
- `dam`: the profile, through `dam_cli.runtime.backend.enable_dam`.
- `streaming`: StreamingLLM (sink + recent window) matched to DAM's mean density at each length
  (`dam_cli.evaluation.baselines`), through the same backend.
New methods plug into `METHOD_BUILDERS` (name -> profile for a length, or None for full).

Tasks: `alignment` (teacher-forced top-1 agreement with full, mean KL(full || method),
perplexity), `recall` (share of full attention's probability mass inside each mask, per layer and
head), `lines` and `passkey` (retrieval accuracy per length and depth, `dam_cli.evaluation.tasks`).
`evaluate()` returns one JSON-serialisable dict (schema in docs/eval.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from dam_cli.evaluation import baselines, tasks
from dam_cli.runtime.attention import TOPK_SCORES
from dam_cli.errors import DamError, DamUsageError
from dam_cli.progress import NullReporter

METHODS = ("full", "dam", "streaming")
TASK_NAMES = ("alignment", "recall") + tasks.TASKS
FULL_IMPL = "dam_eval_full"
RESULT_SCHEMA = 1


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and how much of it."""

    lengths: tuple[int, ...]  # sequence lengths in tokens
    methods: tuple[str, ...] = METHODS  # subset of METHOD_BUILDERS, in report order
    tasks: tuple[str, ...] = TASK_NAMES  # subset of TASK_NAMES
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # needle depths for retrieval
    samples: int = 2  # retrieval prompts per (task, length, depth)
    sample_start: int = 0  # index of the first prompt: a later start draws prompts not seen before
    align_positions: int = 512  # teacher-forced positions scored per length (evenly spaced)
    recall_rows: int = 128  # query rows per length whose full attention is measured
    sink: int = baselines.DEFAULT_SINK  # StreamingLLM sink tokens
    max_new_tokens: int = 8  # greedy tokens generated per retrieval prompt
    backend: str = "auto"  # sparse_attention backend for dam / streaming
    text: str | None = None  # held-out text for alignment / recall; None: built-in (docs/eval.md)
    options_profile: Any = None  # Profile made with beyond-paper options, for the *-options methods
    dynamic_topk: int = 8  # top-k key blocks per query block of the *-dynamic methods
    dynamic_block: int = 64  # block size (tokens) of the dynamic selection
    dynamic_tail_topk: int | None = None  # budget of a call's last query block (None: dynamic_topk)
    dynamic_score: str = "mean"  # how key blocks are scored: "mean" (pooled key) or "bound"


def quick_config(lengths: tuple[int, ...], **kw: Any) -> EvalConfig:
    """Tiny counts for CI: one depth, one prompt, few positions and rows."""
    base = dict(depths=(0.5,), samples=1, align_positions=32, recall_rows=16, max_new_tokens=6)
    base.update(kw)
    return EvalConfig(lengths=lengths, **base)


def default_lengths(pcl: int, max_position: int, quick: bool = False, reserve: int = 0) -> tuple[int, ...]:
    """1x, 2x, 4x, 8x, 16x the PCL, capped at the model's context less `reserve` positions
    (room for the tokens a retrieval prompt generates; `--quick`: 1x and 2x)."""
    mults = (1, 2) if quick else (1, 2, 4, 8, 16)
    cap = max_position - reserve if max_position > 0 else 1 << 30
    out = sorted({min(pcl * m, cap) for m in mults})
    return tuple(out)


def validate(config: EvalConfig, identity: dict) -> None:
    """Raise DamUsageError on unknown methods/tasks, bad depths, or lengths outside the model's context."""
    for m in config.methods:
        if m not in METHOD_BUILDERS:
            raise DamUsageError(f"unknown method {m!r}: choose from {', '.join(METHOD_BUILDERS)}")
        if "options" in m and config.options_profile is None:
            raise DamUsageError(f"method {m} needs --options-profile: a profile made with beyond-paper options")
    if any(m.endswith("dynamic") for m in config.methods) and (
            config.dynamic_topk < 1 or config.dynamic_block < 16 or config.dynamic_block % 16):
        raise DamUsageError("--dynamic-topk must be >= 1 and --dynamic-block a positive multiple of 16")
    if config.dynamic_tail_topk is not None and config.dynamic_tail_topk < 0:
        raise DamUsageError(f"--dynamic-tail-topk must be >= 0, got {config.dynamic_tail_topk}")
    if config.dynamic_score not in TOPK_SCORES:
        raise DamUsageError(f"unknown --dynamic-score {config.dynamic_score!r}: choose one of {', '.join(TOPK_SCORES)}")
    for t in config.tasks:
        if t not in TASK_NAMES:
            raise DamUsageError(f"unknown task {t!r}: choose from {', '.join(TASK_NAMES)}")
    if not config.methods or not config.tasks or not config.lengths:
        raise DamUsageError("nothing to evaluate: give at least one method, one task and one length")
    cap = int(identity.get("max_position") or 0)
    for n in config.lengths:
        if n < 16:
            raise DamUsageError(f"length {n} is too short: use lengths of at least 16 tokens")
        if cap and n > cap:
            raise DamUsageError(f"length {n} is beyond the model's context of {cap} tokens: "
                                f"use --lengths up to {cap}")
    if cap and any(t in tasks.TASKS for t in config.tasks):
        # A retrieval prompt of n tokens and its generated answer reach n + max_new_tokens - 1 positions.
        room = cap - config.max_new_tokens + 1
        for n in config.lengths:
            if n > room:
                raise DamUsageError(f"retrieval prompts of {n} tokens plus {config.max_new_tokens} generated tokens "
                                    f"go beyond the model's context of {cap} tokens: use --lengths up to {room} "
                                    "with the lines and passkey tasks")
    for d in config.depths:
        if not 0.0 <= d <= 1.0:
            raise DamUsageError(f"depth {d} is outside [0, 1]: pass --depths like 0.1,0.5,0.9")
    if config.samples < 1 or config.align_positions < 1 or config.recall_rows < 1:
        raise DamUsageError("counts (samples, positions, rows) must be at least 1")
    if config.sample_start < 0:
        raise DamUsageError(f"--sample-start must be >= 0, got {config.sample_start}")


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------

@dataclass
class _Context:
    """What method builders may read: the DAM profile and per-length caches."""

    profile: Any
    identity: dict
    config: EvalConfig
    density: dict[int, float] = field(default_factory=dict)  # length -> DAM mean density
    streaming: dict[int, Any] = field(default_factory=dict)  # length -> StreamingLLM profile
    options_density: dict[int, float] = field(default_factory=dict)
    streaming_options: dict[int, Any] = field(default_factory=dict)
    streaming_options_dynamic: dict[int, Any] = field(default_factory=dict)
    # (method, length) -> measured density of a dynamic method (`_DensityProbe.summary`).
    measured: dict[tuple[str, int], dict] = field(default_factory=dict)
    # (id(profile), length, layer) -> static cells per (query block, key block), `static_block_counts`.
    static_blocks: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    # measure(method, length): one forward of `method` on the held-out window through the probe.
    measure: Callable[[str, int], None] | None = None

    def dam_density(self, length: int) -> float:
        if length not in self.density:
            self.density[length] = float(self.profile.density(length).mean())
        return self.density[length]

    def options_dam_density(self, length: int) -> float:
        if length not in self.options_density:
            self.options_density[length] = float(self.config.options_profile.density(length).mean())
        return self.options_density[length]

    def dynamic_density(self, method: str, length: int) -> float:
        """Measured mean density of dynamic `method` at `length` (one probe forward if not yet measured)."""
        if (method, length) not in self.measured and self.measure is not None:
            self.measure(method, length)
        if (method, length) not in self.measured:
            raise DamError(f"the density of {method} at {length} tokens was not measured")
        return self.measured[(method, length)]["density"]

    def static_block_counts(self, profile, layer: int, length: int) -> torch.Tensor:
        """Static cells of `profile`'s layer per block pair of the dynamic selection, cached."""
        from dam_kernels.dynamic import static_block_counts

        key = (id(profile), length, layer)
        if key not in self.static_blocks:
            self.static_blocks[key] = static_block_counts(
                lambda rows, n: profile.mask_rows(layer, rows, n), length, self.config.dynamic_block)
        return self.static_blocks[key]


def _build_dam(ctx: _Context, length: int):
    return ctx.profile


def _matched_streaming(ctx: _Context, cache: dict, length: int, target: Callable[[], float]):
    """The StreamingLLM profile whose density matches `target()` at `length`, cached per length."""
    if length not in cache:
        goal = min(1.0, target())
        w = baselines.matched_window(length, goal, ctx.config.sink)
        cache[length] = baselines.streaming_profile(ctx.identity, sink=ctx.config.sink, window=w,
                                                    length=length, target_density=goal)
    return cache[length]


def _build_streaming(ctx: _Context, length: int):
    return _matched_streaming(ctx, ctx.streaming, length, lambda: ctx.dam_density(length))


def _build_options(ctx: _Context, length: int):
    return ctx.config.options_profile


def _build_streaming_options(ctx: _Context, length: int):
    return _matched_streaming(ctx, ctx.streaming_options, length, lambda: ctx.options_dam_density(length))


def _build_streaming_options_dynamic(ctx: _Context, length: int):
    """StreamingLLM at the measured density of dam-options-dynamic (on the held-out window at `length`)."""
    return _matched_streaming(ctx, ctx.streaming_options_dynamic, length,
                              lambda: ctx.dynamic_density("dam-options-dynamic", length))


# name -> builder(ctx, length) -> Profile for the backend, or None for full attention.
# Beyond-paper comparisons (issue 8): "dam-options" is the profile given with --options-profile,
# "streaming-options" a StreamingLLM baseline at its density, and the "-dynamic" methods add the
# top-k key blocks per query block (`dam_kernels.dynamic`) to dam or dam-options.
METHOD_BUILDERS: dict[str, Callable[[_Context, int], Any] | None] = {
    "full": None,
    "dam": _build_dam,
    "streaming": _build_streaming,
    "dam-options": _build_options,
    "streaming-options": _build_streaming_options,
    "dam-dynamic": _build_dam,
    "dam-options-dynamic": _build_options,
    "streaming-options-dynamic": _build_streaming_options_dynamic,
}


def method_topk(ctx: _Context, method: str) -> int:
    """Top-k key blocks of the dynamic part for `method` (0: static mask only).

    Only the DAM methods get the dynamic part: `streaming-options-dynamic` is plain StreamingLLM
    (sink + window), matched to the density of `dam-options-dynamic`.
    """
    return ctx.config.dynamic_topk if method.startswith("dam") and method.endswith("-dynamic") else 0


def dynamic_extra_density(length: int, topk: int, block: int, tail_topk: int | None = None) -> float:
    """Upper bound of the share of causal pairs the dynamic part adds at `length` (overlap with
    the static mask ignored): each row of query block `qb` gets `min(topk, qb)` whole blocks
    (`min(tail_topk, qb)` in the last query block when `tail_topk` is given)."""
    rows = torch.arange(length)
    k_row = torch.full((length,), topk)
    if tail_topk is not None:
        k_row[rows // block == (length - 1) // block] = tail_topk
    extra = torch.minimum(rows // block, k_row) * block
    return float(extra.sum()) / (length * (length + 1) / 2)


_RECORD: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dam_eval_record", default=None)


def _full_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: causal attention through DAM's exact reference, optionally recording q/k."""
    from dam_kernels.reference import reference_attention

    B, H, Sq, D = query.shape
    Sk = key.shape[2]
    rec = _RECORD.get()
    if rec is not None:
        layer = int(module.layer_idx)
        rows = rec["rows"]
        rec["q"][layer] = query[0, :, rows].detach().float().cpu()  # [H, n_rows, D]
        rec["k"][layer] = key[0].detach().float().cpu()  # [H_kv, Sk, D]
        rec["scale"][layer] = float(scaling if scaling is not None else module.scaling)

    def causal(r: torch.Tensor, n: int) -> torch.Tensor:
        return (torch.arange(n)[None, :] <= r[:, None]).expand(H, -1, -1)

    out = reference_attention(query, key, value, causal, start=Sk - Sq, scale=scaling)
    return out.transpose(1, 2), None


def _register_full() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dam_cli.runtime.backend import dam_mask

    AttentionInterface.register(FULL_IMPL, _full_forward)
    AttentionMaskInterface.register(FULL_IMPL, dam_mask)


PROBE_IMPL = "dam_eval_density"


@dataclass
class _DensityProbe:
    """Counts, during a prefill of `length` tokens, the causal pairs a dynamic method really allows.

    Per layer: the static Stage-2 mask of `profile` (full heads included) united with the blocks
    `select_blocks` picks from that layer's own q and k, exactly as `sparse_attention` does with
    `topk` and `block` (`dam_kernels.dynamic.union_pair_counts`; no `S x S` mask is built).
    """

    ctx: _Context
    profile: Any
    topk: int
    block: int
    length: int
    tail_topk: int | None = None
    score: str = "mean"
    pairs: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> int64 [H]

    def count(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        from dam_kernels.dynamic import select_blocks, union_pair_counts

        S = key.shape[2]
        if query.shape[0] != 1 or query.shape[2] != S or S != self.length:
            return  # only the one-sequence prefill of the measured length is counted
        chosen = select_blocks(query, key, 0, self.topk, self.block, tail_topk=self.tail_topk, score=self.score)
        static = self.ctx.static_block_counts(self.profile, layer, S)
        self.pairs[layer] = union_pair_counts(chosen, static, S, self.block)[0]

    def summary(self) -> dict:
        n_layers = self.profile.n_layers
        if sorted(self.pairs) != list(range(n_layers)):
            raise DamError(f"the density probe saw layers {sorted(self.pairs)} of {n_layers} in a prefill "
                           f"of {self.length} tokens")
        total = self.length * (self.length + 1) / 2
        per = torch.stack([self.pairs[l] for l in range(n_layers)]).double() / total  # [NL, H]
        static = torch.stack([self.ctx.static_block_counts(self.profile, l, self.length).sum((-1, -2))
                              for l in range(n_layers)]).double() / total
        bound = float(static.mean()) + dynamic_extra_density(self.length, self.topk, self.block, self.tail_topk)
        return {"density": float(per.mean()), "min": float(per.min()), "max": float(per.max()),
                "per_layer": per.mean(-1).tolist(), "static": float(static.mean()),
                "upper_bound": min(1.0, bound), "input": "held-out window"}


_PROBE: contextvars.ContextVar[_DensityProbe | None] = contextvars.ContextVar("dam_eval_probe", default=None)


def _density_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: the `dam` attention unchanged, plus the density probe's count."""
    from dam_cli.runtime.backend import dam_attention_forward

    probe = _PROBE.get()
    if probe is not None:
        probe.count(int(module.layer_idx), query, key)
    return dam_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                 **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dam_cli.runtime.backend import dam_mask

    AttentionInterface.register(PROBE_IMPL, _density_forward)
    AttentionMaskInterface.register(PROBE_IMPL, dam_mask)


def _uses_reference(config: EvalConfig, device: str) -> bool:
    return config.backend == "reference" or (config.backend == "auto" and not device.startswith("cuda"))


@contextlib.contextmanager
def method_active(model, method: str, ctx: _Context, length: int, device: str,
                  measure: bool = False) -> Iterator[None]:
    """Run the body with `model` on `method`'s attention at `length`; restore the model after.

    `measure` (dynamic methods): count the pairs the method allows in the body's prefill of
    `length` tokens and store the measured density in `ctx.measured[(method, length)]`.
    """
    from dam_cli.runtime import backend
    from dam_cli.profiling.capture import attention_implementation

    build = METHOD_BUILDERS[method]
    ref = _uses_reference(ctx.config, device)
    probe = None
    if build is None:
        if ref:
            _register_full()
            with attention_implementation(model, FULL_IMPL):
                yield
            return
        backend.enable_dense(model)
    else:
        prof = build(ctx, length)
        topk = method_topk(ctx, method)
        tail = ctx.config.dynamic_tail_topk if topk else None
        backend.enable_dam(model, prof, backend=ctx.config.backend, topk=topk,
                           topk_block=ctx.config.dynamic_block, tail_topk=tail,
                           topk_score=ctx.config.dynamic_score)
        if measure and topk:
            probe = _DensityProbe(ctx, prof, topk, ctx.config.dynamic_block, length, tail,
                                  ctx.config.dynamic_score)
    try:
        if probe is None:
            yield
        else:
            _register_probe()
            token = _PROBE.set(probe)
            try:
                with attention_implementation(model, PROBE_IMPL):
                    yield
            finally:
                _PROBE.reset(token)
    finally:
        backend.disable_dam(model)
    if probe is not None:
        ctx.measured[(method, length)] = probe.summary()


# ----------------------------------------------------------------------------------------------
# Held-out text
# ----------------------------------------------------------------------------------------------

HELDOUT_MODULES = ("argparse", "collections", "difflib", "fractions", "functools", "heapq", "inspect",
                   "itertools", "json", "logging", "pathlib", "re", "statistics", "string",
                   "textwrap", "typing", "unittest", "zipfile", "decimal", "email.message",
                   "urllib.parse", "subprocess", "threading", "shutil", "tarfile", "datetime")


def heldout_text() -> str:
    """Built-in held-out text: docstrings of a fixed list of stdlib modules and their public members.

    Disjoint from the profiling default (pydoc topics); same Python version, same text.
    """
    import importlib
    import inspect as _inspect

    parts = []
    for name in HELDOUT_MODULES:
        mod = importlib.import_module(name)
        doc = _inspect.getdoc(mod)
        if doc:
            parts.append(doc)
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            d = _inspect.getdoc(obj)
            if d and len(d) > 80:
                parts.append(f"{attr}: {d}")
    return "\n\n".join(parts)


def heldout_tokens(tokenizer, needed: int, text: str | None = None) -> list[int]:
    """At least `needed` token ids of held-out text (a file's text when `text` is a path)."""
    if text is not None:
        try:
            with open(text, encoding="utf-8") as f:
                body = f.read()
        except OSError as e:
            raise DamError(f"cannot read held-out text {text}: {e.strerror}") from None
    else:
        body = heldout_text()
    ids = tokenizer(body, add_special_tokens=False).input_ids
    if len(ids) < needed:
        raise DamError(f"the held-out text has {len(ids)} tokens, fewer than the longest length {needed}: "
                       "pass a longer --text file or shorter --lengths")
    return ids


# ----------------------------------------------------------------------------------------------
# Metrics (pure)
# ----------------------------------------------------------------------------------------------

def score_positions(length: int, count: int) -> torch.Tensor:
    """Up to `count` evenly spaced positions in `[0, length - 2]` whose next token is predicted."""
    n = min(count, length - 1)
    return torch.linspace(0, length - 2, n).round().to(torch.int64).unique()


def alignment_metrics(logp_full: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1 agreement with full, mean KL(full || method) in nats, and perplexity of the method.

    logp_full, logp: float32 `[P, V]` log-probabilities at the same positions; targets `[P]`.
    """
    agree = (logp_full.argmax(-1) == logp.argmax(-1)).double().mean().item()
    kl = (logp_full.exp() * (logp_full - logp)).sum(-1).double().mean().item()
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1).double().mean().item()
    return {"agreement": agree, "kl": kl, "ppl": math.exp(nll), "positions": int(targets.shape[0])}


def attention_recall(q: torch.Tensor, k: torch.Tensor, scale: float, rows: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
    """Share of full causal attention mass inside `allowed`, per head, float64 `[H]`.

    q `[H, n, D]` (the query rows `rows`), k `[H_kv, S, D]`, allowed bool `[H, n, S]`. Computed as
    one minus the mass outside, so a mask that drops nothing scores exactly 1.
    """
    H, n, D = q.shape
    S = k.shape[1]
    G = H // k.shape[0]
    scores = torch.matmul(q.reshape(k.shape[0], G, n, D), k[:, None].transpose(-1, -2)) * scale
    causal = torch.arange(S)[None, :] <= rows[:, None]  # [n, S]
    scores = scores.reshape(H, n, S).masked_fill(~causal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    outside = (probs * (causal & ~allowed)).sum(-1)  # [H, n]
    return 1.0 - outside.double().mean(-1)


_ANSWER_END = re.compile(r"\d+\D")


@torch.no_grad()
def greedy(model, tokenizer, ids: list[int], max_new_tokens: int, device: str) -> str:
    """Greedy continuation of `ids` with a KV cache; stops at EOS or once a number has ended."""
    from dam_cli.runtime.generate import _forward_kwargs, new_cache

    cache = new_cache(model)  # updated in place; passed by this transformers version's keyword
    cache_kw, _ = _forward_kwargs(model)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
    gen = []
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        if tok == eos:
            break
        gen.append(tok)
        if _ANSWER_END.search(tokenizer.decode(gen)):
            break
        out = model(input_ids=torch.tensor([[tok]], device=device), use_cache=True, **{cache_kw: cache})
    return tokenizer.decode(gen, skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, identity: dict, profile, config: EvalConfig, *, device: str = "cpu",
             reporter=None) -> dict:
    """Run every (task, method, length) of `config` on `model`; return the JSON-serialisable result.

    Checks first that the profile matches the model and that the config is valid (DamError /
    DamUsageError). The model is restored to its own attention afterwards.
    """
    from dam_cli.runtime.backend import check_profile_matches

    reporter = reporter or NullReporter()
    validate(config, identity)
    check_profile_matches(profile, identity)
    ctx = _Context(profile=profile, identity=identity, config=config)
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "model": identity.get("name"),
        "profile": {"path": getattr(profile, "path", None), "pcl": profile.pcl,
                    "recipe": profile.meta.recipe},
        "device": device,
        "full_attention": "reference causal (same arithmetic as dam)" if _uses_reference(config, device)
        else "dense SDPA",
        "config": {f.name: (list(v) if isinstance(v, tuple) else v) for f in fields(config)
                   if f.name != "options_profile" for v in [getattr(config, f.name)]},
        "options_profile": None if config.options_profile is None else {
            "path": getattr(config.options_profile, "path", None), "pcl": config.options_profile.pcl,
            "recipe": config.options_profile.meta.recipe},
        "lengths": list(config.lengths),
        "methods": list(config.methods),
        "density": {}, "streaming_window": {}, "alignment": {}, "recall": {}, "retrieval": {},
        "prompts": [], "seconds": {},
    }
    ctx.measure = _measure_forward(model, tokenizer, ctx, device)
    if "alignment" in config.tasks or "recall" in config.tasks:
        _run_alignment(model, tokenizer, ctx, result, device, reporter)
    for task in config.tasks:
        if task in tasks.TASKS:
            _run_retrieval(model, tokenizer, ctx, task, result, device, reporter)
    # Densities last: a dynamic method's is measured on the held-out window (during its alignment
    # forward, or by one forward of its own), and streaming-options-dynamic is matched to it.
    result["dynamic_density"] = {}
    for n in config.lengths:
        key = str(n)
        for m in config.methods:
            if m == "full":
                d = 1.0
            elif m.startswith("streaming"):
                sp = METHOD_BUILDERS[m](ctx, n)
                d = baselines.streaming_density(n, sp.meta.recipe["sink"], sp.meta.recipe["window"])
                result["streaming_window"].setdefault(m, {})[key] = {"sink": sp.meta.recipe["sink"],
                                                                     "window": sp.meta.recipe["window"]}
            elif method_topk(ctx, m):  # measured: the selection depends on the input
                d = ctx.dynamic_density(m, n)
                result["dynamic_density"].setdefault(m, {})[key] = ctx.measured[(m, n)]
            else:
                d = float(METHOD_BUILDERS[m](ctx, n).density(n).mean())
            result["density"].setdefault(m, {})[key] = d
    result["seconds"]["total"] = time.perf_counter() - t_start
    return result


def _measure_forward(model, tokenizer, ctx: _Context, device: str) -> Callable[[str, int], None]:
    """`ctx.measure`: one forward of a dynamic method on the held-out window, through the probe."""
    held: list[list[int]] = []

    def measure(method: str, length: int) -> None:
        if not held:
            held.append(heldout_tokens(tokenizer, max(ctx.config.lengths), ctx.config.text))
        x = torch.tensor([held[0][:length]], dtype=torch.long, device=device)
        with method_active(model, method, ctx, length, device, measure=True), torch.no_grad():
            model(input_ids=x, use_cache=False, logits_to_keep=1)

    return measure


def _run_alignment(model, tokenizer, ctx: _Context, result: dict, device: str, reporter) -> None:
    cfg = ctx.config
    ids = heldout_tokens(tokenizer, max(cfg.lengths), cfg.text)
    want_align, want_recall = "alignment" in cfg.tasks, "recall" in cfg.tasks
    methods = list(cfg.methods)
    if "full" not in methods:  # full is the reference of both measurements
        methods = ["full"] + methods
    # Baselines matched to a dynamic method's measured density run after it (its forward measures).
    methods.sort(key=lambda m: m.startswith("streaming") and m.endswith("-dynamic"))
    total = len(cfg.lengths) * len(methods)
    with reporter.task("alignment / recall", total) as bar:
        for n in cfg.lengths:
            key = str(n)
            x = torch.tensor([ids[:n]], dtype=torch.long, device=device)
            pos = score_positions(n, cfg.align_positions)
            targets = torch.tensor(ids[1:n])[pos]
            rows = torch.linspace(0, n - 1, min(cfg.recall_rows, n)).round().to(torch.int64).unique()
            logp_full = rec = None
            for m in methods:
                t0 = time.perf_counter()
                token = None
                if m == "full" and want_recall and _uses_reference(cfg, device):
                    rec = {"rows": rows.to(device), "q": {}, "k": {}, "scale": {}}
                    token = _RECORD.set(rec)
                try:
                    probe = bool(method_topk(ctx, m)) and (m, n) not in ctx.measured
                    with method_active(model, m, ctx, n, device, measure=probe), torch.no_grad():
                        logits = model(input_ids=x, use_cache=False, logits_to_keep=pos.to(device)).logits
                finally:
                    if token is not None:
                        _RECORD.reset(token)
                logp = torch.log_softmax(logits[0].float().cpu(), dim=-1)
                if m == "full":
                    logp_full = logp
                    if want_recall and rec is None:
                        rec = _record_dense(model, x, rows, device)
                if want_align and m in cfg.methods:
                    result["alignment"].setdefault(m, {})[key] = alignment_metrics(logp_full, logp, targets)
                if want_recall and m in cfg.methods:
                    result["recall"].setdefault(m, {})[key] = _recall_of(ctx, m, n, rec, rows)
                _add_seconds(result, m, time.perf_counter() - t0)
                bar.advance()
            del logp_full, rec


def _record_dense(model, x, rows, device):
    """q/k capture for recall when full runs as SDPA (GPU): one extra forward through the recorder."""
    rec = {"rows": rows.to(device), "q": {}, "k": {}, "scale": {}}
    token = _RECORD.set(rec)
    from dam_cli.profiling.capture import attention_implementation

    _register_full()
    try:
        with attention_implementation(model, FULL_IMPL), torch.no_grad():
            model(input_ids=x, use_cache=False, logits_to_keep=1)
    finally:
        _RECORD.reset(token)
    return rec


def _recall_of(ctx: _Context, method: str, length: int, rec: dict, rows: torch.Tensor) -> dict:
    """Per-layer, per-head recall of `method`'s mask at `length` from the recorded full q/k."""
    build = METHOD_BUILDERS[method]
    n_layers = len(rec["q"])
    if build is None:
        per = [[1.0] * rec["q"][l].shape[0] for l in range(n_layers)]
    else:
        prof = build(ctx, length)
        per = []
        for l in range(n_layers):
            allowed = prof.mask_rows(l, rows, length)
            per.append(attention_recall(rec["q"][l], rec["k"][l], rec["scale"][l], rows, allowed).tolist())
    flat = [v for row in per for v in row]
    return {"mean": sum(flat) / len(flat), "min": min(flat), "per_head": per, "rows": int(rows.shape[0])}


def _run_retrieval(model, tokenizer, ctx: _Context, task: str, result: dict, device: str, reporter) -> None:
    cfg = ctx.config
    prompts = [tasks.make_prompt(task, tokenizer, n, d, i)
               for n in cfg.lengths for d in cfg.depths
               for i in range(cfg.sample_start, cfg.sample_start + cfg.samples)]
    out = result["retrieval"].setdefault(task, {})
    with reporter.task(f"{task} retrieval", len(prompts) * len(cfg.methods)) as bar:
        for m in cfg.methods:
            for n in cfg.lengths:
                batch = [p for p in prompts if p.length == n]
                t0 = time.perf_counter()
                with method_active(model, m, ctx, n, device):
                    for p in batch:
                        text = greedy(model, tokenizer, p.ids, cfg.max_new_tokens, device)
                        ok = tasks.is_correct(text, p.answer)
                        cell = out.setdefault(m, {}).setdefault(str(n), {}).setdefault(
                            f"{p.depth:g}", {"correct": 0, "total": 0})
                        cell["correct"] += int(ok)
                        cell["total"] += 1
                        result["prompts"].append({"task": task, "method": m, "length": n, "depth": p.depth,
                                                  "index": p.index, "tokens": len(p.ids), "answer": p.answer,
                                                  "output": text, "parsed": tasks.parse_answer(text),
                                                  "correct": ok})
                        bar.advance()
                _add_seconds(result, m, time.perf_counter() - t0)
    for m, by_len in out.items():
        for cells in by_len.values():
            for c in cells.values():
                c["accuracy"] = c["correct"] / c["total"]


def _add_seconds(result: dict, method: str, s: float) -> None:
    result["seconds"][method] = result["seconds"].get(method, 0.0) + s


def accuracy(result: dict, task: str, method: str, length: int) -> float | None:
    """Mean accuracy over depths of one (task, method, length) cell of a result, or None."""
    cells = result.get("retrieval", {}).get(task, {}).get(method, {}).get(str(length))
    if not cells:
        return None
    c = sum(v["correct"] for v in cells.values())
    t = sum(v["total"] for v in cells.values())
    return c / t if t else None
