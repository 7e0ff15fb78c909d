"""The suite's task registry: name -> generator, metric and generation budget, plus the passkey adapter.

Every generator has the signature `make(tokenizer, n_tokens, seed, index, haystack, *, chat=None)` and
returns a `Prompt` whose `ids` fit in `n_tokens`. The passkey task is `dam eval`'s own generator
(`dam_cli.evaluation.tasks.passkey_prompt`), reused unchanged and keyed from (seed, index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dam_cli.errors import DamUsageError
from dam_cli.evaluation.suite.aggregation import common_words, frequent_words
from dam_cli.evaluation.suite.memo import memo
from dam_cli.evaluation.suite.niah import niah_multikey, niah_multiquery, niah_multivalue, niah_single
from dam_cli.evaluation.suite.prompting import Prompt, use_chat
from dam_cli.evaluation.suite.rng import Rng, key_state
from dam_cli.evaluation.suite.tracking import variable_tracking
from dam_cli.evaluation.tasks import passkey_prompt

PASSKEY_MAX_NEW_TOKENS = 16


class _RecordingTokenizer:
    """A tokenizer wrapper that remembers the text of every encoding and can hide the chat template,
    so the passkey generator can be driven in either form and its prompt text recovered exactly."""

    def __init__(self, tokenizer, chat: bool):
        self._tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None) if chat else None
        self.texts: dict[tuple[int, ...], str] = {}

    def __call__(self, text, **kwargs):
        encoding = self._tokenizer(text, **kwargs)
        self.texts[tuple(encoding.input_ids)] = text
        return encoding

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def passkey(tokenizer, n_tokens: int, seed: int, index: int, haystack: str | None = None, *,
            chat: bool | None = None) -> Prompt:
    """`dam eval`'s passkey prompt at a seeded depth; `haystack` is ignored (the task has its own filler)."""
    chat = use_chat(tokenizer, chat)
    depth = round(Rng.keyed("passkey-depth", seed, index).random(), 3)
    recorder = _RecordingTokenizer(tokenizer, chat)
    # a 64-bit key as the sample number: distinct (seed, index) pairs get distinct passkey streams
    old = passkey_prompt(recorder, n_tokens, depth, key_state("passkey", seed, index))
    meta = {"task": "passkey", "seed": seed, "index": index, "haystack": "passkey-filler", "length": n_tokens,
            "tokens": len(old.ids), "format": "chat" if chat else "completion", "depths": [depth],
            "needles": [old.needle], "distractors": [], "metric": "all", "max_new_tokens": PASSKEY_MAX_NEW_TOKENS}
    return Prompt(recorder.texts[tuple(old.ids)], (old.answer,), meta, list(old.ids))


@dataclass(frozen=True)
class SuiteTask:
    """One task of the suite: its generator, the metric that scores it and what it measures."""

    name: str
    make: Callable[..., Prompt]
    metric: str  # a key of scoring.METRICS
    uses_haystack: bool  # False: the task brings its own context and ignores `haystack`
    summary: str


TASKS: dict[str, SuiteTask] = {t.name: t for t in (
    SuiteTask("niah_single", niah_single, "all", True, "one needle, one key"),
    SuiteTask("niah_multikey", niah_multikey, "all", True, "one asked needle among needles with other keys"),
    SuiteTask("niah_multivalue", niah_multivalue, "all", True, "one key with several values, all asked"),
    SuiteTask("niah_multiquery", niah_multiquery, "all", True, "several keys asked at once"),
    SuiteTask("vt", variable_tracking, "all", True, "chains of variable assignments (multi-hop)"),
    SuiteTask("cwe", common_words, "all", False, "the 10 most common words of a numbered list"),
    SuiteTask("fwe", frequent_words, "all", False, "the 3 most frequent coded words of a Zipf text"),
    SuiteTask("passkey", passkey, "all", False, "dam eval's passkey in repeated filler"),
    SuiteTask("memo", memo, "all", False, "a five-digit code in a memo of varied prose sentences"),
)}
SUITE_TASKS = tuple(TASKS)


def check_tasks(names) -> tuple[str, ...]:
    """`names` as a tuple when every one is a suite task, else a usage error listing the choices."""
    names = tuple(names)
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise DamUsageError(f"unknown suite task {', '.join(unknown) or '(none given)'}: "
                            f"choose from {', '.join(SUITE_TASKS)}")
    return names


def make_prompt(task: str, tokenizer, n_tokens: int, seed: int, index: int, haystack: str, *,
                chat: bool | None = None) -> Prompt:
    """Dispatch to the generator of `task` (one of SUITE_TASKS)."""
    check_tasks([task])
    return TASKS[task].make(tokenizer, n_tokens, seed, index, haystack, chat=chat)
