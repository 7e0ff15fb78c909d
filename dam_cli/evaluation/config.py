"""What `dam eval` measures: the frozen `EvalConfig`, its defaults and its validation.

`validate` raises `DamUsageError` (exit 2) with one line naming the bad value and the fix; the
method names it accepts are those of `dam_cli.evaluation.methods.METHOD_BUILDERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dam_cli.errors import DamUsageError
from dam_cli.evaluation import baselines, tasks
from dam_cli.runtime.attention import TOPK_SCORES

METHODS = ("full", "dam", "streaming")
TASK_NAMES = ("alignment", "recall") + tasks.TASKS
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
    text: str | None = None  # held-out text for alignment / recall; None: built-in (docs/guides/eval.md)
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


def uses_reference(config: EvalConfig, device: str) -> bool:
    """Whether DAM runs the exact PyTorch reference (then `full` runs it too, with the causal mask only)."""
    return config.backend == "reference" or (config.backend == "auto" and not device.startswith("cuda"))


def check_names(methods: tuple[str, ...], task_names: tuple[str, ...], dynamic_score: str) -> None:
    """Raise DamUsageError on an unknown method, `--dynamic-score` or task (checked before any loading)."""
    from dam_cli.evaluation.methods import METHOD_BUILDERS  # methods imports this module

    for m in methods:
        if m not in METHOD_BUILDERS:
            raise DamUsageError(f"unknown method {m!r}: choose from {', '.join(METHOD_BUILDERS)}")
    if dynamic_score not in TOPK_SCORES:
        raise DamUsageError(f"unknown --dynamic-score {dynamic_score!r}: choose one of {', '.join(TOPK_SCORES)}")
    for t in task_names:
        if t not in TASK_NAMES:
            raise DamUsageError(f"unknown task {t!r}: choose from {', '.join(TASK_NAMES)}")


def validate(config: EvalConfig, identity: dict) -> None:
    """Raise DamUsageError on unknown methods/tasks, bad depths, or lengths outside the model's context."""
    check_names(config.methods, config.tasks, config.dynamic_score)
    for m in config.methods:
        if "options" in m and config.options_profile is None:
            raise DamUsageError(f"method {m} needs --options-profile: a profile made with beyond-paper options")
    if any(m.endswith("dynamic") for m in config.methods) and (
            config.dynamic_topk < 1 or config.dynamic_block < 16 or config.dynamic_block % 16):
        raise DamUsageError("--dynamic-topk must be >= 1 and --dynamic-block a positive multiple of 16")
    if config.dynamic_tail_topk is not None and config.dynamic_tail_topk < 0:
        raise DamUsageError(f"--dynamic-tail-topk must be >= 0, got {config.dynamic_tail_topk}")
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
