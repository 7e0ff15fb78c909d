"""Retrieval tasks for `dam eval`, generated locally with fixed seeds (docs/eval.md).

- `lines`: LongEval-style line retrieval (LongChat's "lines" task): many lines
  `line <label>: REGISTER_CONTENT is <value>` with random word-pair labels and 5-digit values;
  the question asks for one line's value.
- `passkey`: a 5-digit pass key hidden in repeated filler text.

Every prompt is sized with the model's tokenizer to at most a target token length, and the
needle is placed at a given depth (0 = start of the haystack, 1 = end). Same arguments, same
prompt, on every machine: seeds come from the arguments through a fixed formula, never `hash()`.
Pure logic apart from tokenizing; no model runs here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dam_cli.errors import DamError

TASKS = ("lines", "passkey")
BASE_SEED = 20250611  # changing it changes every prompt: results would no longer compare

_ADJ = ("amber agile ancient bold brave bright calm clever cosmic crisp curious daring distant eager "
        "fancy fierce gentle golden grand happy hidden humble icy jolly keen lively lucky mellow "
        "merry misty noble odd proud quiet rapid royal rustic silent silver sleepy smooth solar "
        "steady sunny swift tender tidy vivid wild witty young zesty").split()
_NOUN = ("anchor apple arrow badge banner beacon bridge canyon castle cedar comet coral crystal "
         "delta dragon ember falcon feather forest galaxy garden glacier harbor island jungle "
         "lantern meadow meteor mirror nebula ocean orchard otter panda pebble pepper planet "
         "prairie quartz rabbit ribbon river rocket saddle shadow summit temple thunder tiger "
         "tulip valley violet walrus willow").split()

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about it.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
LINES_INTRO = "Below is a record of lines I want you to remember. Each line has a label and a number."


@dataclass(frozen=True)
class Prompt:
    """One retrieval prompt: its token ids and the answer a correct model gives."""

    task: str  # "lines" or "passkey"
    length: int  # target token length the prompt was sized to (len(ids) <= length)
    depth: float  # needle depth in [0, 1]
    index: int  # sample number at this (task, length, depth)
    ids: list[int]  # the full prompt, chat template and answer prefix included
    answer: str  # the expected digits
    needle: str  # the line or sentence that holds the answer, for reports


def seed_for(task: str, length: int, depth: float, index: int) -> int:
    """The RNG seed of one prompt: a fixed function of its arguments (stable across runs)."""
    t = TASKS.index(task) if task in TASKS else 7
    return BASE_SEED + 1_000_003 * t + 10_007 * length + 101 * round(depth * 1000) + index


def _wrap(tokenizer, user: str, answer_prefix: str) -> list[int]:
    """Token ids of `user` as a chat turn (when the tokenizer has a template) plus the answer prefix.

    The answer prefix makes a small model answer in the expected format right away, so the
    measured quantity is retrieval, not instruction following.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text + answer_prefix, add_special_tokens=False).input_ids
    return tokenizer(user + "\n" + answer_prefix, add_special_tokens=True).input_ids


def _fit(build, lo: int, hi: int, length: int):
    """Largest unit count `n` in [lo, hi] whose prompt `build(n)` fits in `length` tokens."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = build(mid)
        if len(ids[0]) <= length:
            best, lo = ids, mid + 1
        else:
            hi = mid - 1
    return best


def _labels(rng: random.Random, n: int) -> list[str]:
    pool = [f"{a}-{b}" for a in _ADJ for b in _NOUN]
    if n > len(pool):
        raise DamError(f"line retrieval needs {n} labels but only {len(pool)} exist: use a shorter length")
    return rng.sample(pool, n)


def lines_prompt(tokenizer, length: int, depth: float, index: int = 0) -> Prompt:
    """A LongEval-style line-retrieval prompt of at most `length` tokens, asking for the line at `depth`."""
    _check(length, depth)
    rng = random.Random(seed_for("lines", length, depth, index))
    max_lines = 2500
    labels = _labels(rng, max_lines)
    values = [str(rng.randint(10000, 99999)) for _ in range(max_lines)]

    def build(n: int):
        target = min(n - 1, round(depth * (n - 1)))
        body = "\n".join(f"line {labels[i]}: REGISTER_CONTENT is <{values[i]}>" for i in range(n))
        user = (f"{LINES_INTRO}\n{body}\nNow the record is over. "
                f"Tell me what is the REGISTER_CONTENT in line {labels[target]}? I need the number.")
        prefix = f"The REGISTER_CONTENT in line {labels[target]} is <"
        return _wrap(tokenizer, user, prefix), target

    got = _fit(build, 1, max_lines, length)
    if got is None:
        raise DamError(f"length {length} is too short for a line-retrieval prompt: use at least 128 tokens")
    ids, target = got
    return Prompt("lines", length, depth, index, ids, values[target],
                  f"line {labels[target]}: REGISTER_CONTENT is <{values[target]}>")


def passkey_prompt(tokenizer, length: int, depth: float, index: int = 0) -> Prompt:
    """A passkey prompt of at most `length` tokens with the key sentence at `depth` of the filler."""
    _check(length, depth)
    rng = random.Random(seed_for("passkey", length, depth, index))
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."

    def build(n: int):
        at = round(depth * n)
        parts = [PASSKEY_FILLER] * at + [needle] + [PASSKEY_FILLER] * (n - at)
        user = f"{PASSKEY_INTRO}\n" + " ".join(parts) + "\nWhat is the pass key?"
        return _wrap(tokenizer, user, "The pass key is "), at

    got = _fit(build, 0, max(1, length // 4), length)  # a filler sentence is > 4 tokens
    if got is None:
        raise DamError(f"length {length} is too short for a passkey prompt: use at least 128 tokens")
    return Prompt("passkey", length, depth, index, got[0], key, needle)


def make_prompt(task: str, tokenizer, length: int, depth: float, index: int = 0) -> Prompt:
    """Dispatch to the generator of `task` (one of TASKS)."""
    if task == "lines":
        return lines_prompt(tokenizer, length, depth, index)
    if task == "passkey":
        return passkey_prompt(tokenizer, length, depth, index)
    raise DamError(f"unknown retrieval task {task!r}: choose from {', '.join(TASKS)}")


_NUMBER = re.compile(r"\d+")


def parse_answer(output: str) -> str | None:
    """The first run of digits in a model's output (LongEval's rule), or None when there is none."""
    m = _NUMBER.search(output)
    return m.group(0) if m else None


def is_correct(output: str, answer: str) -> bool:
    """True when the first number in `output` is exactly `answer`."""
    return parse_answer(output) == answer


def _check(length: int, depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise DamError(f"needle depth {depth} is outside [0, 1]: pass depths like 0.1,0.5,0.9")
    if length < 1:
        raise DamError(f"length must be positive, got {length}")
