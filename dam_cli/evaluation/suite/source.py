"""Source-code haystack: Python-like blocks (functions, classes, constants, tests) with varied identifiers.

Block `i` of seed `s` is a pure function of (s, i). The code is plausible, not runnable as a whole:
it only has to look and tokenize like real source. No I/O.
"""

from __future__ import annotations

from dam_cli.evaluation.suite.rng import Rng

_VERBS = ("load parse merge build fetch render validate compute normalize export index resolve encode decode "
          "schedule filter group rank split track update archive collect sync measure rebuild").split()
_NOUNS = ("order invoice user session record batch packet frame token route shipment sensor reading account "
          "ledger ticket metric report profile segment chunk layer node edge tile cache voucher parcel").split()
_ATTRS = ("total count weight size price score offset limit level status name label region owner created_at "
          "priority retries deadline quota version").split()
_SUFFIX = "Store Builder Index Queue Cache Registry Tracker Buffer Pool Manager View Window Planner".split()
_PREFIX = "MAX DEFAULT MIN BASE STALE HARD SOFT".split()
_SEPS = (",", ";", "|", "\\t", ":")


def _camel(noun: str, suffix: str) -> str:
    return noun.capitalize() + suffix


def _accumulate(r: Rng) -> list[str]:
    verb, noun, a, b = r.choice(_VERBS), r.choice(_NOUNS), r.choice(_ATTRS), r.choice(_ATTRS)
    item, limit = noun[:1] + noun[-1:], r.choice(("limit", "floor", "cutoff", "threshold"))
    return [f"def {verb}_{noun}s({noun}s, {limit}={r.randint(0, 500)}):",
            f'    """{verb.capitalize()} every {noun} and return the summed {b} above the {limit}."""',
            "    total = 0",
            f"    for {item} in {noun}s:",
            f"        if {item}.{a} > {limit}:",
            f"            total += {item}.{b}",
            "    return total"]


def _grouping(r: Rng) -> list[str]:
    noun, a, other = r.choice(_NOUNS), r.choice(_ATTRS), r.choice(_NOUNS)
    return [f"def group_{noun}s_by_{a}({noun}s, min_size={r.randint(1, 9)}):",
            f'    """Count {noun}s per {a}; groups smaller than min_size go under "{other}"."""',
            "    groups = {}",
            f"    for item in {noun}s:",
            f"        groups.setdefault(item.{a}, []).append(item)",
            f'    return {{key if len(v) >= min_size else "{other}": len(v) for key, v in groups.items()}}']


def _klass(r: Rng) -> list[str]:
    noun, other, a, b, verb = r.choice(_NOUNS), r.choice(_NOUNS), r.choice(_ATTRS), r.choice(_ATTRS), r.choice(_VERBS)
    if a == b:
        b = f"{b}_{r.randint(2, 9)}"
    return [f"class {_camel(noun, r.choice(_SUFFIX))}:",
            f'    """Keeps the {a} and {b} of one {other}."""',
            "",
            f"    def __init__(self, {a}, {b}={r.randint(1, 999)}):",
            f"        self.{a} = {a}",
            f"        self.{b} = {b}",
            "",
            f"    def {verb}(self, factor={r.randint(2, 12)}):",
            f"        return self.{b} * factor + {r.randint(1, 99)}"]


def _constants(r: Rng) -> list[str]:
    lines = []
    for _ in range(r.randint(2, 5)):
        name = f"{r.choice(_PREFIX)}_{r.choice(_NOUNS)}_{r.choice(_ATTRS)}".upper()
        kind = r.below(3)
        if kind == 0:
            lines.append(f"{name} = {r.randint(2, 86400)}")
        elif kind == 1:
            lines.append(f'{name} = "{r.choice(_NOUNS)}-{r.choice(_VERBS)}-{r.randint(1, 99)}"')
        else:
            lines.append(f"{name} = ({r.randint(1, 64)}, {r.randint(65, 512)}, {r.randint(513, 4096)})")
    return lines


def _reader(r: Rng) -> list[str]:
    verb, noun, sep = r.choice(_VERBS), r.choice(_NOUNS), r.choice(_SEPS)
    return [f"def {verb}_{noun}_file(path, limit={r.randint(10, 5000)}):",
            "    try:",
            f'        with open(path, encoding="{r.choice(("utf-8", "latin-1", "ascii"))}") as handle:',
            "            text = handle.read()",
            "    except OSError as error:",
            f'        raise RuntimeError(f"cannot {verb} {noun} file {{path}}: {{error}}") from None',
            f'    return text.split("{sep}")[:limit]']


def _comprehension(r: Rng) -> list[str]:
    verb, noun, a, b = r.choice(_VERBS), r.choice(_NOUNS), r.choice(_ATTRS), r.choice(_ATTRS)
    threshold = f"{r.randint(1, 99)}.{r.randint(0, 9)}"
    return [f"def {verb}_top_{noun}_{a}(items, threshold={threshold}, keep={r.randint(2, 20)}):",
            f"    values = [x.{a} for x in items if x.{b} >= threshold]",
            f"    # the {r.choice(('largest', 'newest', 'cheapest', 'slowest'))} {noun}s come last after sorting",
            "    return sorted(values)[-keep:]"]


def _test(r: Rng) -> list[str]:
    verb, noun, a = r.choice(_VERBS), r.choice(_NOUNS), r.choice(_ATTRS)
    x, y = r.randint(1, 500), r.randint(1, 500)
    return [f"def test_{verb}_{noun}_keeps_{a}():",
            f"    {noun} = {_camel(noun, r.choice(_SUFFIX))}({x}, {y})",
            f"    assert {noun}.{a} == {x}",
            f"    assert {noun}.{r.choice(_VERBS)}() != {x + y}"]


_BLOCKS = (_accumulate, _grouping, _klass, _constants, _reader, _comprehension, _test)


def code_block(seed: int, index: int) -> str:
    """Block `index` of the code haystack of `seed`: a few lines of Python-like source."""
    r = Rng.keyed("code", seed, index)
    return "\n".join(r.choice(_BLOCKS)(r))
