"""Aggregation tasks (after RULER's cwe and fwe): the answer depends on counting over the whole context.

- cwe: a numbered list of made-up words; 10 words appear `common` times each, every other word `rare`
  times (30 and 3 from 4096 tokens on, else 6 and 1, down to 3 and 1 when that does not fit either);
  the answer is the 10 common words.
- fwe: a coded text drawn from a Zipf law with exponent 2 (word of rank k appears n // k^2 times, rank 1
  being the noise token "...."); the answer is the coded words of ranks 2 to 4.
Counts are exact, never sampled, so the asked words always lead strictly. Neither task uses a haystack.
"""

from __future__ import annotations

from dam_cli.errors import DamError
from dam_cli.evaluation.suite.prompting import Prompt, fit_count, render, use_chat
from dam_cli.evaluation.suite.rng import Rng

COMMON_WORDS = 10
CWE_MAX_NEW_TOKENS = 120
FWE_MAX_NEW_TOKENS = 50
FWE_ANSWERS = 3
FWE_NOISE = "...."
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh", "tr", "pl")
_VOWELS = ("a", "e", "i", "o", "u")
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class _Pool:
    """Distinct words from a seeded generator; `first(n)` is stable as `n` grows."""

    def __init__(self, rng: Rng, word):
        self.rng, self.word, self.words, self.seen = rng, word, [], set()

    def first(self, n: int) -> list[str]:
        while len(self.words) < n:
            w = self.word(self.rng)
            if w not in self.seen:
                self.seen.add(w)
                self.words.append(w)
        return self.words[:n]


def made_up_word(rng: Rng) -> str:
    """A pronounceable made-up word of two to four syllables, such as "tavoru"."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4)))


def coded_word(rng: Rng) -> str:
    """Six random lower-case letters."""
    return "".join(rng.choice(_LETTERS) for _ in range(6))


CWE_REPEATS = ((30, 3), (6, 1), (4, 1), (3, 1))  # (common, rare) repeats per word, preferred first


def cwe_repeats(n_tokens: int) -> tuple[tuple[int, int], ...]:
    """The (common, rare) repeats to try, in order: a short context cannot hold 30 copies of 10 words."""
    return CWE_REPEATS if n_tokens >= 4096 else CWE_REPEATS[1:]


def common_words(tokenizer, n_tokens: int, seed: int, index: int, haystack: str | None = None, *,
                 chat: bool | None = None) -> Prompt:
    """A cwe prompt of at most `n_tokens` tokens; `haystack` is ignored (the word list is the haystack)."""
    chat = use_chat(tokenizer, chat)
    pool = _Pool(Rng.keyed("cwe-words", seed, index), made_up_word)
    user_head = ("Below is a numbered list of words. Some words appear more often than others: "
                 "keep track of the ones that appear most often.\n")
    user_tail = f"\nQuestion: which {COMMON_WORDS} words appear most often in the list above?"
    cue = f"The {COMMON_WORDS} words that appear most often in the list are:"

    def builder(common: int, rare: int):
        def build(n: int):
            words = pool.first(COMMON_WORDS + n)
            entries = words[:COMMON_WORDS] * common + words[COMMON_WORDS:] * rare
            Rng.keyed("cwe-order", seed, index, n).shuffle(entries)
            body = " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
            return render(tokenizer, user_head + body + user_tail, cue, chat)
        return build

    tries = cwe_repeats(n_tokens)
    for k, (common, rare) in enumerate(tries):
        try:
            n, (text, ids) = fit_count(builder(common, rare), n_tokens, COMMON_WORDS, "common-words")
            break
        except DamError:
            if k == len(tries) - 1:
                raise
    meta = {"task": "cwe", "seed": seed, "index": index, "haystack": "word-list", "length": n_tokens,
            "tokens": len(ids), "format": "chat" if chat else "completion", "units": n,
            "repeats": {"common": common, "rare": rare},
            "distractors": pool.first(COMMON_WORDS + n)[COMMON_WORDS:COMMON_WORDS + 20],  # a sample of rare words
            "metric": "all", "max_new_tokens": CWE_MAX_NEW_TOKENS}
    return Prompt(text, tuple(pool.first(COMMON_WORDS)), meta, ids)


def fwe_counts(n: int, vocab: int) -> list[int]:
    """Occurrences of the words of rank 1..vocab: n // k^2, zeros dropped."""
    counts = [n // (k * k) for k in range(1, vocab + 1)]
    return [c for c in counts if c > 0]


def frequent_words(tokenizer, n_tokens: int, seed: int, index: int, haystack: str | None = None, *,
                   chat: bool | None = None) -> Prompt:
    """A fwe prompt of at most `n_tokens` tokens; `haystack` is ignored (the coded text is the haystack)."""
    chat = use_chat(tokenizer, chat)
    vocab = max(8, n_tokens // 50)
    words = [FWE_NOISE] + _Pool(Rng.keyed("fwe-words", seed, index), coded_word).first(vocab - 1)
    user_head = ("Read the coded text below and keep count of how often each coded word occurs. "
                 f"Ignore the dots '{FWE_NOISE}'.\n")
    user_tail = (f"\nQuestion: which {FWE_ANSWERS} coded words occur most often in the coded text above? "
                 "Ignore the dots.")
    cue = f"The {FWE_ANSWERS} coded words that occur most often are:"

    def build(n: int):
        tokens = [w for w, c in zip(words, fwe_counts(n, vocab), strict=False) for _ in range(c)]
        Rng.keyed("fwe-order", seed, index, n).shuffle(tokens)
        return render(tokenizer, user_head + " ".join(tokens) + user_tail, cue, chat)

    # n >= 50 keeps the counts of ranks 2..5 strictly decreasing: the answer is never a tie
    n, (text, ids) = fit_count(build, n_tokens, 50, "frequent-words")
    counts = fwe_counts(n, vocab)
    meta = {"task": "fwe", "seed": seed, "index": index, "haystack": "coded-text", "length": n_tokens,
            "tokens": len(ids), "format": "chat" if chat else "completion", "units": n,
            "counts": dict(zip(words, counts, strict=False)), "distractors": words[FWE_ANSWERS + 1:len(counts)],
            "metric": "all", "max_new_tokens": FWE_MAX_NEW_TOKENS}
    return Prompt(text, tuple(words[1:FWE_ANSWERS + 1]), meta, ids)
