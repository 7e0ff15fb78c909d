"""What every suite task shares: the `Prompt` record, the chat and completion forms, sizing to a token
budget, and needle insertion.

Sizing tokenizes the whole prompt (template and answer cue included), so `len(prompt.ids) <= length`
always holds and the largest unit count that fits is chosen. No model runs here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dam_cli.errors import DamError, DamUsageError


@dataclass(frozen=True)
class Prompt:
    """One suite prompt: its text and ids (template and answer cue included), the expected answer items and
    what produced it (`meta`: task, seed, index, haystack, length, tokens, format, needle depths, ...)."""

    text: str  # the full prompt as text; the completion form leaves the BOS token to `ids`
    answers: tuple[str, ...]  # every item a correct answer contains, verbatim
    meta: dict = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)  # what the model is fed, `len(ids) <= meta["length"]`


def use_chat(tokenizer, chat: bool | None) -> bool:
    """The form to use: `chat` when given, else chat exactly when the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return has_template
    if chat and not has_template:
        raise DamUsageError("the chat form needs a tokenizer with a chat template: use the completion form "
                            "for a base model")
    return bool(chat)


def render(tokenizer, user: str, cue: str, chat: bool) -> tuple[str, list[int]]:
    """Text and ids of `user` followed by the answer cue, as a chat turn or as plain completion text.

    The cue (e.g. "The hidden numbers for x are:") makes the model answer at once, in the expected
    format, so a small model is measured on retrieval, not on instruction following.
    """
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True) + cue
        return text, tokenizer(text, add_special_tokens=False).input_ids
    text = f"{user}\n{cue}"
    return text, tokenizer(text, add_special_tokens=True).input_ids


def fit_count(build: Callable[[int], tuple], length: int, least: int, what: str):
    """The largest count `n >= least` whose `build(n)` (a tuple whose item 1 is the ids) fits in `length`
    tokens, with that build. Estimates `n` from two probes, then gallops and bisects around it."""
    cache: dict[int, tuple] = {}

    def fits(n: int) -> bool:
        if n not in cache:
            cache[n] = build(n)
        return len(cache[n][1]) <= length

    if not fits(least):
        raise DamError(f"length {length} is too short for a {what} prompt "
                       f"(the smallest one takes {len(cache[least][1])} tokens): use a longer length")
    fits(least + 32)
    per_unit = max(1e-3, (len(cache[least + 32][1]) - len(cache[least][1])) / 32)
    guess = max(least, int(least + (length - len(cache[least][1])) / per_unit))
    step = max(1, guess // 64)
    if fits(guess):
        lo = guess
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = guess
        while True:
            cand = max(least, hi - step)
            if fits(cand):
                lo = cand
                break
            hi, step = cand, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, cache[lo]


def insert_at(units: list[str], needles: list[str], depths: list[float]) -> list[str]:
    """`units` with needle k placed at fraction `depths[k]` of them (0 = before all, 1 = after all);
    needles at equal depth keep their given order."""
    n = len(units)
    slots: dict[int, list[str]] = {}
    for needle, depth in zip(needles, depths, strict=True):
        slots.setdefault(min(n, max(0, round(depth * n))), []).append(needle)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(slots.get(i, ()))
        if i < n:
            out.append(units[i])
    return out


def join_names(names: list[str]) -> str:
    """"a", "a and b", "a, b and c": a list as English."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
