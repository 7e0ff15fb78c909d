"""Variable tracking (RULER's multi-hop "vt" task): chains of assignments hidden in a haystack.

A chain starts with `VAR ABCDE = 12345.` and continues with `VAR FGHIJ = VAR ABCDE.`; the statements of
all chains are interleaved (each chain keeps its order) and placed at seeded depths. The question gives
the first chain's number and asks for every variable that ends up holding it; the other chains are
distractors with other numbers.
"""

from __future__ import annotations

from dam_cli.evaluation.suite.haystacks import Haystack
from dam_cli.evaluation.suite.prompting import Prompt, fit_count, insert_at, render, use_chat
from dam_cli.evaluation.suite.rng import Rng

CHAINS = 2  # the asked chain and one distractor chain
HOPS = 4  # assignments after the first one: a chain names HOPS + 1 variables
MAX_NEW_TOKENS = 30
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_RESERVED = {"DEBUG", "ERROR", "FATAL", "TRACE", "PATCH", "QUOTA", "LEVEL", "LIMIT", "PRICE", "SCORE",
             "TOTAL", "COUNT", "ORDER", "BATCH", "CACHE", "FRAME", "TOKEN", "ROUTE", "CHUNK", "LAYER"}


def variable_names(rng: Rng, n: int) -> list[str]:
    """`n` distinct 5-letter upper-case names, none a word the haystacks use in capitals."""
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(_UPPER) for _ in range(5))
        if name not in _RESERVED and name not in out:
            out.append(name)
    return out


def chain_statements(names: list[str], value: int) -> list[str]:
    """The statements of one chain: the first name gets the number, each next name the previous one."""
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)]


def variable_tracking(tokenizer, n_tokens: int, seed: int, index: int, haystack: str, *,
                      chat: bool | None = None) -> Prompt:
    """A vt prompt of at most `n_tokens` tokens; answers are the asked chain's variable names."""
    chat = use_chat(tokenizer, chat)
    rng = Rng.keyed("vt", seed, index, haystack)
    names = variable_names(rng, CHAINS * (HOPS + 1))
    chains = [names[c * (HOPS + 1):(c + 1) * (HOPS + 1)] for c in range(CHAINS)]
    values: list[int] = []
    while len(values) < CHAINS:
        v = rng.randint(10000, 99999)
        if v not in values:
            values.append(v)
    pending = [chain_statements(chain, v) for chain, v in zip(chains, values, strict=True)]
    turns = [c for c in range(CHAINS) for _ in range(HOPS + 1)]
    rng.shuffle(turns)  # interleave the chains; each chain's own order is kept
    statements = [pending[c].pop(0) for c in turns]
    depths = sorted(rng.random() for _ in statements)
    user_head = ("Memorize the variable assignments hidden in the text below; "
                 "you will be asked about them afterwards.\n")
    user_tail = (f"\nQuestion: which variables are assigned the value {values[0]} in the text above, "
                 "directly or through other variables? Name them all.")
    cue = f"The variables assigned the value {values[0]} are:"
    hay = Haystack(haystack, seed)

    def build(n: int):
        body = hay.join(insert_at(hay.units(n), statements, depths))
        return render(tokenizer, user_head + body + user_tail, cue, chat)

    units, (text, ids) = fit_count(build, n_tokens, 1, "variable-tracking")
    meta = {"task": "vt", "seed": seed, "index": index, "haystack": haystack, "length": n_tokens,
            "tokens": len(ids), "format": "chat" if chat else "completion", "units": units,
            "value": str(values[0]), "needles": statements, "depths": [round(d, 4) for d in depths],
            "distractors": [n for chain in chains[1:] for n in chain], "metric": "all",
            "max_new_tokens": MAX_NEW_TOKENS}
    return Prompt(text, tuple(chains[0]), meta, ids)
