"""Seed splits of the suite and the suite's prompt list.

Each split owns a half-open range of seeds and the ranges never overlap, so a held-out prompt never
shares a seed (hence a haystack, needle or answer stream) with a development prompt. Sample `i` of a
split uses seed `start + i`, index `i` and haystack `HAYSTACKS[i % 3]`.
"""

from __future__ import annotations

from dataclasses import replace

from dam_cli.errors import DamUsageError
from dam_cli.evaluation.suite.haystacks import HAYSTACKS
from dam_cli.evaluation.suite.prompting import Prompt
from dam_cli.evaluation.suite.tasks import SUITE_TASKS, TASKS, check_tasks

SPLIT_SIZE = 1_000_000
SPLITS: dict[str, range] = {
    "development": range(0, SPLIT_SIZE),  # tune and debug here
    "heldout-a": range(SPLIT_SIZE, 2 * SPLIT_SIZE),  # report here
    "heldout-b": range(2 * SPLIT_SIZE, 3 * SPLIT_SIZE),  # a second held-out draw, to check a result holds
}


def split_seeds(split: str, count: int) -> range:
    """The first `count` seeds of `split`."""
    if split not in SPLITS:
        raise DamUsageError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    seeds = SPLITS[split]
    if not 1 <= count <= len(seeds):
        raise DamUsageError(f"samples per task must be in 1..{len(seeds)}, got {count}")
    return seeds[:count]


def split_of(seed: int) -> str | None:
    """The split that owns `seed`, or None when no split does."""
    return next((name for name, seeds in SPLITS.items() if seed in seeds), None)


def suite_prompts(tokenizer, length: int, split: str, per_task: int, *, tasks=SUITE_TASKS,
                  chat: bool | None = None) -> list[Prompt]:
    """`per_task` prompts of at most `length` tokens for each task of `tasks`, from `split`'s seeds:
    task by task, sample by sample. The same arguments give the same list on every machine."""
    tasks = check_tasks(tasks)
    if length < 1:
        raise DamUsageError(f"length must be positive, got {length}")
    out = []
    for task in tasks:
        for i, seed in enumerate(split_seeds(split, per_task)):
            p = TASKS[task].make(tokenizer, length, seed, i, HAYSTACKS[i % len(HAYSTACKS)], chat=chat)
            out.append(replace(p, meta={**p.meta, "split": split}))
    return out
