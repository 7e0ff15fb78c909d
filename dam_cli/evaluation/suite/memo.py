"""The memo task: one five-digit code in a memo of varied prose sentences, asked for at the end.

The plainest long-context probe users run by hand, and the one the retrieval and long-context issues
measured with: no keys, no distractor needles, the prose haystack (never one repeated sentence), and an answer cue
in the needle's own words ("The code is", as RULER's answer prefixes repeat their needles' wording) that a base model
completes as readily as a chat model. Until 2026-12-06 the cue was "The code in the memo is:", which Gemma 3 270M (a
base model) answered with a new line as often as with the code, even with full attention: it measured that model's
reading of the cue more than retrieval (docs/results/long-context.md). The prose grammar writes numbers of at most
four digits (years, times), so the code is the only five-digit number of the prompt.
"""

from __future__ import annotations

from dam_cli.evaluation.suite.haystacks import Haystack
from dam_cli.evaluation.suite.prompting import Prompt, fit_count, insert_at, render, use_chat
from dam_cli.evaluation.suite.rng import Rng

MAX_NEW_TOKENS = 16
_HEAD = "Below is a memo. Somewhere in it is a code; you will be asked for it.\n"
_TAIL = "\nWhat is the code in the memo?"
_CUE = "The code is"  # the needle's words: "The code is 12345."


def memo(tokenizer, n_tokens: int, seed: int, index: int, haystack: str | None = None, *,
         chat: bool | None = None) -> Prompt:
    """A memo of prose sentences of `seed`'s haystack with the code sentence at a seeded depth; `haystack`
    is ignored (always prose)."""
    chat = use_chat(tokenizer, chat)
    rng = Rng.keyed("memo", seed, index)
    code = str(rng.randint(10000, 99999))
    depth = rng.random()
    needle = f"The code is {code}."
    hay = Haystack("prose", Rng.keyed("memo-haystack", seed, index).randint(0, 1 << 30))

    def build(n: int):
        return render(tokenizer, _HEAD + hay.join(insert_at(hay.units(n), [needle], [depth])) + _TAIL, _CUE, chat)

    units, (text, ids) = fit_count(build, n_tokens, 1, "memo")
    meta = {"task": "memo", "seed": seed, "index": index, "haystack": "prose", "length": n_tokens,
            "tokens": len(ids), "format": "chat" if chat else "completion", "units": units,
            "depths": [round(depth, 4)], "needles": [needle], "distractors": [], "metric": "all",
            "max_new_tokens": MAX_NEW_TOKENS}
    return Prompt(text, (code,), meta, ids)
