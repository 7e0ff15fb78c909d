"""Needle-in-a-haystack tasks: single, multi-key, multi-value and multi-query (after RULER's NIAH family).

A needle is the sentence "One hidden <kind> for <key> is <value>." placed at a seeded depth of a haystack;
keys are adjective-noun pairs and values are 7-digit numbers, words or UUID-like strings. Needle words
are chosen so no haystack generator emits them: the needle is the only place a value appears.
"""

from __future__ import annotations

from dam_cli.evaluation.suite.haystacks import HAYSTACKS, Haystack
from dam_cli.evaluation.suite.prompting import Prompt, fit_count, insert_at, join_names, render, use_chat
from dam_cli.evaluation.suite.rng import Rng

VALUE_KINDS = ("number", "word", "uuid")
_PLURAL = {"number": "numbers", "word": "words", "uuid": "UUIDs"}
NEEDLES = 4  # needles of the multi-key, multi-value and multi-query tasks (RULER's default)
MAX_NEW_TOKENS = 128

_KEY_ADJ = ("abrupt agile boreal brisk cobalt cryptic dapper dusky elfin feral frugal gaunt gilded hardy inky "
            "jaunty kindly lanky lucid mauve mossy nimble opal placid plucky quaint rosy russet sable scarlet "
            "shrewd somber spry stoic tawny umber vapid wiry woolly zany").split()
_KEY_NOUN = ("abacus albatross anvil armadillo baton bellows bobbin cactus caravan cauldron chisel compass "
             "cymbal dirigible easel flagon gazebo gondola harpoon hourglass igloo jackal kayak kettledrum "
             "lute marmot mongoose narwhal obelisk ocelot parasol pelican quill sextant sphinx tambourine "
             "toucan trombone walrus yak").split()
WORD_VALUES = ("almond apricot avocado banjo basil bison blueberry bonsai buffalo camel cardamom cashew cello "
               "cinnamon clarinet cobra coconut cricket cumin dolphin eggplant falafel flamingo gecko gorilla "
               "guava hazelnut hibiscus iguana jaguar kiwi koala lavender lemur lychee mandolin mango marimba "
               "mustard nutmeg oboe okapi oregano papaya parsley peacock penguin piccolo pistachio platypus "
               "quince raccoon saffron sardine sesame sitar sloth squid tamarind tapir thyme tortoise turmeric "
               "ukulele vanilla violin wombat yogurt zebra zucchini").split()


def needle_kind(index: int) -> str:
    """The value kind of sample `index`: it changes every 3 samples, so with the suite's haystack
    rotation (haystack = index mod 3) nine consecutive samples cover every (haystack, kind) pair."""
    return VALUE_KINDS[(index // len(HAYSTACKS)) % len(VALUE_KINDS)]


def make_keys(rng: Rng, n: int) -> list[str]:
    """`n` distinct adjective-noun keys such as "plucky-sextant"."""
    picks = rng.sample(range(len(_KEY_ADJ) * len(_KEY_NOUN)), n)
    return [f"{_KEY_ADJ[p // len(_KEY_NOUN)]}-{_KEY_NOUN[p % len(_KEY_NOUN)]}" for p in picks]


def make_values(rng: Rng, kind: str, n: int) -> list[str]:
    """`n` distinct needle values of `kind`: 7-digit numbers, words, or 8-4-4-4-12 hex strings."""
    if kind == "word":
        return rng.sample(WORD_VALUES, n)
    out: list[str] = []
    while len(out) < n:
        if kind == "number":
            v = str(rng.randint(1_000_000, 9_999_999))
        else:
            h = f"{rng.next64():016x}{rng.next64():016x}"
            v = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        if v not in out:
            out.append(v)
    return out


def needle(kind: str, key: str, value: str) -> str:
    """The needle sentence that states one value of `key`."""
    return f"One hidden {kind if kind != 'uuid' else 'UUID'} for {key} is {value}."


def _build_niah(task: str, tokenizer, n_tokens: int, seed: int, index: int, haystack: str, chat: bool | None,
                n_keys: int, n_values: int, n_queries: int) -> Prompt:
    """A NIAH prompt with `n_keys` keys (the first `n_queries` asked) and `n_values` values per asked key;
    the other keys are distractors with one value each."""
    chat = use_chat(tokenizer, chat)
    rng = Rng.keyed(task, seed, index, haystack)
    kind = needle_kind(index)
    keys = make_keys(rng, n_keys)
    values = make_values(rng, kind, n_queries * n_values + (n_keys - n_queries))
    pairs = [(keys[q], values[q * n_values + v]) for q in range(n_queries) for v in range(n_values)]
    distract = [(keys[n_queries + j], values[n_queries * n_values + j]) for j in range(n_keys - n_queries)]
    needles = [needle(kind, k, v) for k, v in pairs + distract]
    depths = [rng.random() for _ in needles]
    asked = join_names(keys[:n_queries])
    plural = _PLURAL[kind]
    user_head = (f"Some hidden {plural} are scattered through the text below. Memorize them: "
                 f"you will be asked about them afterwards.\n")
    user_tail = f"\nWhat are all the hidden {plural} for {asked} in the text above?"
    cue = f"The hidden {plural} for {asked} in the text above are:"
    hay = Haystack(haystack, seed)

    def build(n: int):
        body = hay.join(insert_at(hay.units(n), needles, depths))
        return render(tokenizer, user_head + body + user_tail, cue, chat)

    units, (text, ids) = fit_count(build, n_tokens, 1, task)
    meta = {"task": task, "seed": seed, "index": index, "haystack": haystack, "length": n_tokens,
            "tokens": len(ids), "format": "chat" if chat else "completion", "units": units, "values": kind,
            "keys": keys[:n_queries], "depths": [round(d, 4) for d in depths], "needles": needles,
            "distractors": [v for _, v in distract], "metric": "all", "max_new_tokens": MAX_NEW_TOKENS}
    return Prompt(text, tuple(v for _, v in pairs), meta, ids)


def niah_single(tokenizer, n_tokens: int, seed: int, index: int, haystack: str, *, chat: bool | None = None):
    """One needle; the question asks for its value."""
    return _build_niah("niah_single", tokenizer, n_tokens, seed, index, haystack, chat, 1, 1, 1)


def niah_multikey(tokenizer, n_tokens: int, seed: int, index: int, haystack: str, *, chat: bool | None = None):
    """One asked needle among `NEEDLES - 1` distractor needles with other keys."""
    return _build_niah("niah_multikey", tokenizer, n_tokens, seed, index, haystack, chat, NEEDLES, 1, 1)


def niah_multivalue(tokenizer, n_tokens: int, seed: int, index: int, haystack: str, *, chat: bool | None = None):
    """`NEEDLES` needles with one key and different values; every value must be returned."""
    return _build_niah("niah_multivalue", tokenizer, n_tokens, seed, index, haystack, chat, 1, NEEDLES, 1)


def niah_multiquery(tokenizer, n_tokens: int, seed: int, index: int, haystack: str, *, chat: bool | None = None):
    """`NEEDLES` needles with different keys, all asked in one question; every value must be returned."""
    return _build_niah("niah_multiquery", tokenizer, n_tokens, seed, index, haystack, chat, NEEDLES, 1, NEEDLES)
