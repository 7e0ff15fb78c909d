"""What `dam eval` measures: the frozen `EvalConfig`, its defaults, the `--tasks` names and validation.

`validate` raises `DamUsageError` (exit 2) with one line naming the bad value and the fix; the
method names it accepts are those of `dam_cli.evaluation.methods.METHOD_BUILDERS`. No torch
import at module level: the CLI checks names with it before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dam_kernels.selection import DynamicSelection

from dam_cli.errors import DamUsageError
from dam_cli.evaluation import tasks
from dam_cli.evaluation.suite import aggregation, memo, niah, tracking
from dam_cli.evaluation.suite import tasks as suite_tasks
from dam_cli.evaluation.suite.splits import SPLITS

METHODS = ("full", "dam", "streaming")
TASK_NAMES = ("alignment", "recall") + tasks.TASKS  # the measurements and the depth-swept retrieval tasks
SUITE_TASKS = suite_tasks.SUITE_TASKS  # the RULER-style suite (`dam_cli.evaluation.suite`)
SUITE_GROUP = "suite"  # `--tasks suite`: every suite task
SUITE_PREFIX = "suite:"  # `--tasks suite:passkey`: a suite task by its explicit name (a bare `passkey` is ours)
# Tokens a suite prompt may generate, per task (each generator's `meta["max_new_tokens"]`).
SUITE_MAX_NEW_TOKENS = {"niah_single": niah.MAX_NEW_TOKENS, "niah_multikey": niah.MAX_NEW_TOKENS,
                        "niah_multivalue": niah.MAX_NEW_TOKENS, "niah_multiquery": niah.MAX_NEW_TOKENS,
                        "vt": tracking.MAX_NEW_TOKENS, "cwe": aggregation.CWE_MAX_NEW_TOKENS,
                        "fwe": aggregation.FWE_MAX_NEW_TOKENS, "passkey": suite_tasks.PASSKEY_MAX_NEW_TOKENS,
                        "memo": memo.MAX_NEW_TOKENS}
PROMPT_FORMS = ("chat", "completion")
DEFAULT_SINK = 4  # StreamingLLM's default number of attention-sink tokens
# The *-dynamic methods' settings by default (`dam_cli.cli.options.EVAL_DYNAMIC` holds the same).
DEFAULT_DYNAMIC = DynamicSelection(topk=8, block=64)
RESULT_SCHEMA = 2  # 2: config["dynamic"] as one object, the suite's results under "suite"


def suite_family(task: str) -> str:
    """The family a suite task is reported under: niah, vt, cwe, fwe, passkey or memo."""
    return task.split("_")[0]


@dataclass(frozen=True)
class EvalConfig:
    """What to measure and how much of it."""

    lengths: tuple[int, ...]  # sequence lengths in tokens
    methods: tuple[str, ...] = METHODS  # subset of METHOD_BUILDERS, in report order
    tasks: tuple[str, ...] = TASK_NAMES  # subset of TASK_NAMES
    suite_tasks: tuple[str, ...] = ()  # subset of SUITE_TASKS
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # needle depths for retrieval
    samples: int = 2  # retrieval prompts per (task, length, depth)
    sample_start: int = 0  # index of the first prompt: a later start draws prompts not seen before
    split: str = "development"  # the suite's seed split (`dam_cli.evaluation.suite.SPLITS`)
    per_task: int = 3  # suite prompts per (task, length): the split's first seeds
    prompt_form: str | None = None  # suite prompts as "chat" or "completion"; None: chat when there is a template
    align_positions: int = 512  # teacher-forced positions scored per length (evenly spaced)
    recall_rows: int = 128  # query rows per length whose full attention is measured
    sink: int = DEFAULT_SINK  # StreamingLLM sink tokens
    max_new_tokens: int = 8  # greedy tokens generated per retrieval prompt (suite: each prompt's own budget)
    backend: str = "auto"  # sparse_attention backend for dam / streaming
    cuda_graph: bool = False  # decode answers by the static-cache CUDA-graph loop (dam eval --cuda-graph)
    text: str | None = None  # held-out text for alignment / recall; None: built-in (docs/guides/eval.md)
    options_profile: Any = None  # Profile made with beyond-paper options, for the *-options methods
    dynamic: DynamicSelection = DEFAULT_DYNAMIC  # the dynamic part of the dam-*-dynamic methods


def quick_config(lengths: tuple[int, ...], **kw: Any) -> EvalConfig:
    """Tiny counts for CI: one depth, one prompt, one suite prompt per task, few positions and rows."""
    base = dict(depths=(0.5,), samples=1, per_task=1, align_positions=32, recall_rows=16, max_new_tokens=6)
    base.update(kw)
    return EvalConfig(lengths=lengths, **base)


def default_lengths(pcl: int, max_position: int, quick: bool = False, reserve: int = 0) -> tuple[int, ...]:
    """1x, 2x, 4x, 8x, 16x the PCL, capped at the model's context less `reserve` positions
    (room for the tokens a retrieval prompt generates; `--quick`: 1x and 2x)."""
    mults = (1, 2) if quick else (1, 2, 4, 8, 16)
    cap = max_position - reserve if max_position > 0 else 1 << 30
    out = sorted({min(pcl * m, cap) for m in mults})
    return tuple(out)


def generating_tasks(config: EvalConfig) -> list[str]:
    """The tasks of `config` that generate text: retrieval and suite tasks."""
    return [t for t in config.tasks if t in tasks.TASKS] + list(config.suite_tasks)


def generated_tokens(config: EvalConfig) -> int:
    """The most tokens any prompt of `config` generates (0: nothing is generated)."""
    most = config.max_new_tokens if any(t in tasks.TASKS for t in config.tasks) else 0
    return max([most] + [SUITE_MAX_NEW_TOKENS[t] for t in config.suite_tasks])


def uses_reference(config: EvalConfig, device: str) -> bool:
    """Whether DAM runs the exact PyTorch reference (then `full` runs it too, with the causal mask only)."""
    return config.backend == "reference" or (config.backend == "auto" and not device.startswith("cuda"))


def split_task_names(names) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`--tasks` names as (TASK_NAMES part, SUITE_TASKS part), each in the order given, repeats dropped.

    `suite` stands for every suite task and `suite:NAME` names one explicitly (the suite's passkey
    is `suite:passkey`: a bare `passkey` is the depth-swept task). Unknown names: DamUsageError.
    """
    ours: list[str] = []
    suite: list[str] = []
    for name in names:
        if name in TASK_NAMES:
            picked = [(ours, name)]
        elif name == SUITE_GROUP:
            picked = [(suite, t) for t in SUITE_TASKS]
        elif name.removeprefix(SUITE_PREFIX) in SUITE_TASKS:
            picked = [(suite, name.removeprefix(SUITE_PREFIX))]
        else:
            choices = list(TASK_NAMES) + [f"{SUITE_GROUP} (every suite task)"]
            choices += [t for t in SUITE_TASKS if t not in TASK_NAMES] + [SUITE_PREFIX + t for t in SUITE_TASKS
                                                                          if t in TASK_NAMES]
            raise DamUsageError(f"unknown task {name!r}: choose from {', '.join(choices)}")
        for into, task in picked:
            if task not in into:
                into.append(task)
    return tuple(ours), tuple(suite)


MAX_PER_TASK = 10_000  # as --samples (dam_cli.cli.eval.MAX_SAMPLES); a split holds 1,000,000 seeds


def check_options(methods, dynamic: DynamicSelection, split: str, per_task: int, prompt_form: str | None) -> None:
    """Raise DamUsageError on an unknown method, split or prompt form, a bad dynamic part, or a
    `*-dynamic` method with the dynamic part off (all checked before any loading)."""
    from dam_cli.evaluation.methods import METHOD_BUILDERS  # methods imports this module

    for m in methods:
        if m not in METHOD_BUILDERS:
            raise DamUsageError(f"unknown method {m!r}: choose from {', '.join(METHOD_BUILDERS)}")
    dynamic.validate(cli=True, error=DamUsageError)
    if not dynamic.on and any(m.endswith("-dynamic") for m in methods):
        raise DamUsageError(f"--dynamic-topk must be at least 1 for the *-dynamic methods, got {dynamic.topk}: "
                            "pass e.g. --dynamic-topk 8, or drop those methods")
    if split not in SPLITS:
        raise DamUsageError(f"unknown --split {split!r}: choose from {', '.join(SPLITS)}")
    if not 1 <= per_task <= MAX_PER_TASK:  # each a prompt a method and length: more is days of GPU time
        raise DamUsageError(f"--per-task must be from 1 to {MAX_PER_TASK:,} (suite prompts a task and length), got "
                            f"{per_task:,}")
    if prompt_form is not None and prompt_form not in PROMPT_FORMS:
        raise DamUsageError(f"unknown --prompt-form {prompt_form!r}: choose from {', '.join(PROMPT_FORMS)}")


def validate(config: EvalConfig, identity: dict) -> None:
    """Raise DamUsageError on unknown names, bad options or depths, or lengths outside the model's context."""
    check_options(config.methods, config.dynamic, config.split, config.per_task, config.prompt_form)
    for t in config.tasks:
        if t not in TASK_NAMES:
            raise DamUsageError(f"unknown task {t!r}: choose from {', '.join(TASK_NAMES)}")
    for t in config.suite_tasks:
        if t not in SUITE_TASKS:
            raise DamUsageError(f"unknown suite task {t!r}: choose from {', '.join(SUITE_TASKS)}")
    for m in config.methods:
        if "options" in m and config.options_profile is None:
            raise DamUsageError(f"method {m} needs --options-profile: a profile made with beyond-paper options")
    if not config.methods or not (config.tasks or config.suite_tasks) or not config.lengths:
        raise DamUsageError("nothing to evaluate: give at least one method, one task and one length")
    cap = int(identity.get("max_position") or 0)
    for n in config.lengths:
        if n < 16:
            raise DamUsageError(f"length {n} is too short: use lengths of at least 16 tokens")
        if cap and n > cap:
            raise DamUsageError(f"length {n} is beyond the model's context of {cap} tokens: "
                                f"use --lengths up to {cap}")
    new = generated_tokens(config)
    if cap and new:
        # A prompt of n tokens and its generated answer reach n + new - 1 positions.
        room = cap - new + 1
        for n in config.lengths:
            if n > room:
                raise DamUsageError(f"prompts of {n} tokens plus {new} generated tokens go beyond the model's "
                                    f"context of {cap} tokens: use --lengths up to {room} with the tasks "
                                    f"{', '.join(generating_tasks(config))}")
    for d in config.depths:
        if not 0.0 <= d <= 1.0:
            raise DamUsageError(f"depth {d} is outside [0, 1]: pass --depths like 0.1,0.5,0.9")
    if config.samples < 1 or config.align_positions < 1 or config.recall_rows < 1 or config.max_new_tokens < 1:
        raise DamUsageError("counts (samples, positions, rows, new tokens) must be at least 1")
    if config.sample_start < 0:
        raise DamUsageError(f"--sample-start must be >= 0, got {config.sample_start}")
