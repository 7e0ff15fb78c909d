"""The dynamic part's settings as one value: `DynamicSelection(topk, block, tail_topk, score, tail_mass)`.

Carried from the command line (`dam_cli.cli.options`) through `GenerateConfig`, `enable_dam` and
`sparse_attention` to the kernel launchers, and checked in one place, `validate()`. No torch
import, so the CLI reads the defaults without loading it; `dam_kernels.dynamic` re-exports it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

SCORES = ("mean", "bound", "antidiag", "antisum")  # how a key block is scored (module doc of `dam_kernels.dynamic`)
# Scores that estimate a block's attention mass (blocks kept by tail_mass), with the estimate's name in summaries.
MASS_SCORES = {"antidiag": "antidiagonal", "antisum": "summed-antidiagonal"}
# The antidiagonal estimate's sampling stride (score "antidiag"): each query row reads one key in ANTIDIAG_STRIDE
# of every earlier block, 1/16 of the prompt's q.k products. On the development split stride 8 and 16 kept the
# same answers (16 at slightly more density) and 16 costs half (docs/results/accuracy.md). A multiple of 16
# divides every selection block.
ANTIDIAG_STRIDE = 16
# The summed estimate's group size (score "antisum"): rows and keys in groups of ANTISUM_STRIDE, each pair of groups
# scored by its antidiagonal's summed products, XAttention's own estimate (its LLM setting is 8). On the
# development split stride 8 kept more of full attention's answers at lower density than "antidiag" at 16
# (docs/results/accuracy.md); its products cost 1/8 of the prompt's q.k, its softmax 1/64 of the pairs.
ANTISUM_STRIDE = 8
SELECT_HEAD_DIMS = (16, 32, 64, 128, 256)  # head dims the fused decode selection (`select.py`) takes
BLOCK_MULTIPLE = 16  # a selection block holds whole key blocks of the kernels' smallest tile
MAX_BLOCK = 8192  # rows (and keys) of a selection block: larger ones only cost memory, they select nothing finer
MAX_TOPK = 2**31 - 1  # key blocks a query block may add: more than any context holds (larger overflow int64 ranks)
# The fields' names in messages from the command line (`dam generate`, `dam eval`).
CLI_FLAGS = {"topk": "--dynamic-topk", "block": "--dynamic-block", "tail_topk": "--dynamic-tail-topk",
             "score": "--dynamic-score", "tail_mass": "--dynamic-tail-mass", "mass": "--dynamic-mass"}


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class DynamicSelection:
    """The dynamic part's settings, one value carried from the CLI to the kernels.

    Per query block of `block` rows, the `topk` earlier key blocks with the best `score` (one of
    SCORES) join the static mask; `topk` 0 (the default) turns the part off. With `score` "antidiag" the
    blocks are chosen by mass instead: XAttention's antidiagonal estimate of each block's attention mass
    (one key in `ANTIDIAG_STRIDE`), the heaviest added until `tail_mass` of it is kept, at most `topk`
    (`dam_kernels.block_mass.antidiag_select`); "antisum" the same on XAttention's own estimate (groups of
    `ANTISUM_STRIDE` rows and keys, `antisum_select`). Both need `tail_mass`. `tail_topk` (None:
    `topk`) is the budget of a call's last query block instead: a prompt's question, and every
    decode step. `tail_mass` (None: off) switches that last block to the exact-mass rule: its own
    rows' softmax mass per earlier key block, the heaviest added until the kept mass (own block
    included) reaches `tail_mass`, at most `last_topk` of them (`dam_kernels.dynamic.tail_block_mass`).
    `mass` (None: `tail_mass`): the share of the estimated mass the prompt's other query blocks keep with a
    mass score, so the question and decode rows can keep more of their exact mass than the prompt keeps of
    its estimate. Nothing is checked on construction: call `validate()`.
    """

    topk: int = 0
    block: int = 128
    tail_topk: int | None = None
    score: str = "mean"
    tail_mass: float | None = None
    mass: float | None = None

    @property
    def prompt_mass(self) -> float | None:
        """The share of estimated mass the prompt's query blocks (all but a call's last) keep: `mass`, else
        `tail_mass`."""
        return self.tail_mass if self.mass is None else self.mass

    @property
    def on(self) -> bool:
        """Whether any key block is selected (`topk` > 0)."""
        return self.topk > 0

    @property
    def last_topk(self) -> int:
        """The budget of a call's last query block, hence of every decode step: `tail_topk`, else `topk`."""
        return self.topk if self.tail_topk is None else self.tail_topk

    def validate(self, *, cli: bool = False, error: type[Exception] = ValueError) -> DynamicSelection:
        """Return self, or raise `error` with one line naming the value and the rule it breaks.

        Messages name the flags (`--dynamic-topk`, ...) when `cli`, else the fields
        (`DynamicSelection.topk`, ...). `block` is checked only with the part on.
        """
        name = CLI_FLAGS if cli else {f: f"DynamicSelection.{f}" for f in CLI_FLAGS}
        if not _is_int(self.topk) or not 0 <= self.topk <= MAX_TOPK:
            raise error(f"{name['topk']} must be an integer from 0 (the dynamic part off) to {MAX_TOPK:,} (more key "
                        f"blocks than any context holds), got {self.topk!r}")
        if self.on and (not _is_int(self.block) or self.block < BLOCK_MULTIPLE or self.block % BLOCK_MULTIPLE
                        or self.block > MAX_BLOCK):
            raise error(f"{name['block']} must be a positive multiple of {BLOCK_MULTIPLE} up to {MAX_BLOCK}, "
                        f"got {self.block!r}")
        if self.tail_topk is not None:
            if not self.on:
                raise error(f"{name['tail_topk']} needs {name['topk']} > 0 (the dynamic part on), "
                            f"got {name['topk']} {self.topk!r}")
            if not _is_int(self.tail_topk) or not 0 <= self.tail_topk <= MAX_TOPK:
                raise error(f"{name['tail_topk']} must be an integer from 0 to {MAX_TOPK:,}, got {self.tail_topk!r}")
        if self.tail_mass is not None:
            if not self.on:
                raise error(f"{name['tail_mass']} needs {name['topk']} > 0 (the dynamic part on), "
                            f"got {name['topk']} {self.topk!r}")
            x = self.tail_mass
            if not isinstance(x, numbers.Real) or isinstance(x, bool) or not 0 < x <= 1:
                raise error(f"{name['tail_mass']} must be a number in (0, 1] (the share of the last query "
                            f"block's attention mass to keep), got {x!r}")
        if self.mass is not None:
            x = self.mass
            if not isinstance(x, numbers.Real) or isinstance(x, bool) or not 0 < x <= 1:
                raise error(f"{name['mass']} must be a number in (0, 1] (the share of each prompt block's estimated "
                            f"attention mass to keep), got {x!r}")
            if self.score not in MASS_SCORES or self.tail_mass is None:
                raise error(f"{name['mass']} applies to the mass scores: give {name['score']} "
                            f"{' or '.join(MASS_SCORES)} and {name['tail_mass']}")
        if self.score not in SCORES:
            raise error(f"unknown {name['score']} {self.score!r}: choose one of {', '.join(SCORES)}")
        if not self.on and self.score != "mean":
            raise error(f"{name['score']} {self.score} needs {name['topk']} > 0 (the dynamic part on), "
                        f"got {name['topk']} {self.topk!r}")
        if self.score in MASS_SCORES and self.tail_mass is None:
            raise error(f"{name['score']} {self.score} keeps blocks by attention mass: give {name['tail_mass']} "
                        f"(the share to keep, e.g. 0.9), or {name['score']} mean to keep the top-k blocks")
        return self

    def as_dict(self) -> dict:
        """The fields, the tail budget resolved (what `dam generate --json` reports); `tail_mass` and `mass`
        only when set, so the exact-mass rule's absence reads as before."""
        out = {"topk": self.topk, "block": self.block, "tail_topk": self.last_topk, "score": self.score}
        if self.tail_mass is not None:
            out["tail_mass"] = self.tail_mass
        return out if self.mass is None else {**out, "mass": self.mass}


@dataclass(frozen=True)
class DynamicFlags:
    """Some of `DynamicSelection`'s fields, as a command line gives them (`--dynamic-topk 16` alone): each
    replaces that field of a base setting, the profile's recommended one where it has one, and the others
    stay the base's. `values`: (field, value) pairs."""

    values: tuple = ()

    def over(self, base: DynamicSelection) -> DynamicSelection:
        """`base` with the given fields replaced (not validated); `topk` 0 turns the part off, and the base's
        other fields then do not apply. A `tail_mass` given without `mass` leaves the prompt's share as the base
        had it (`--dynamic-tail-mass 1.0` alone changes the question's and decoded tokens' budget, not the
        prompt's, which would otherwise follow it)."""
        given = dict(self.values)
        if given.get("topk") == 0:
            return replace(DynamicSelection(), **given)
        if given.get("tail_mass") == 0:  # 0: the exact-mass rule off (top-k blocks by a pooled score)
            given["tail_mass"] = None
            given.setdefault("mass", None)
            given.setdefault("score", "mean" if base.score in MASS_SCORES else base.score)
        if ("tail_mass" in given and given["tail_mass"] is not None and "mass" not in given
                and base.prompt_mass is not None
                and given.get("score", base.score) in MASS_SCORES and given["tail_mass"] != base.prompt_mass):
            given["mass"] = base.prompt_mass
        return replace(base, **given)

    def over_any(self) -> DynamicSelection:
        """Over a base that is on and sets every field (top-1 x 64, a mass score, tail mass 1): validating the
        result checks what no profile's setting can change, each value's range and the combinations among the
        flags given (`--dynamic-topk 0` with a tail budget), before anything loads. The merged setting is checked
        later."""
        return self.over(DynamicSelection(topk=1, block=64, score="antisum", tail_mass=1.0))


def resolve_dynamic(given, recommended: DynamicSelection | None, default: DynamicSelection) -> DynamicSelection:
    """The dynamic part a run uses: `given` itself when it is a whole `DynamicSelection`; `given`'s fields
    over the profile's `recommended` setting (else over `default`) when it is `DynamicFlags`; with nothing
    given, `recommended`, else `default`. Not validated."""
    base = recommended or default
    if isinstance(given, DynamicFlags):
        return given.over(base)
    return base if given is None else given
