"""Exact-match scoring of suite answers (RULER's "string match all" and "string match part").

The answer text is the whole generated continuation (bounded by the prompt's `max_new_tokens`),
lower-cased, with control characters turned into spaces. An expected item counts as found when it
occurs there verbatim (case aside) and is not glued to another letter or digit: "1234567" is not
found in "12345678". Pure functions, no I/O.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def answer_text(output: str) -> str:
    """The normalized text answers are searched in: lower case, control characters as spaces, trimmed."""
    return _CONTROL.sub(" ", output).lower().strip()


def found_items(output: str, answers) -> list[bool]:
    """For each expected item, whether it occurs verbatim in `output` as a whole token."""
    text = answer_text(output)
    return [re.search(rf"(?<![0-9a-z]){re.escape(item.lower())}(?![0-9a-z])", text) is not None
            for item in answers]


def match_all(output: str, answers) -> float:
    """The share of expected items found (RULER's string match all): 1.0 only when every item is there."""
    hits = found_items(output, answers)
    return sum(hits) / len(hits) if hits else 0.0


def match_part(output: str, answers) -> float:
    """1.0 when at least one expected item is found, else 0.0 (RULER's string match part)."""
    return 1.0 if any(found_items(output, answers)) else 0.0


METRICS = {"all": match_all, "part": match_part}


def score(prompt, output: str) -> float:
    """The score of `output` for a suite prompt, with the metric its task declares (`meta["metric"]`)."""
    return METRICS[prompt.meta.get("metric", "all")](output, prompt.answers)
