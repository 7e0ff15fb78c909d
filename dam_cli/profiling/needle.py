"""Needle scoring of heads (beyond the paper): which heads fetch a fact from far back.

`--retrieval-by needle` chooses the retrieval heads of `dam profile` by what they do, not by
how badly their patterns cover them: synthetic prompts hide a five-digit code in calibration
text, ask for it, and append the answer (teacher forcing). A head's needle score is the mean,
over the rows that predict the answer's tokens, of the attention probability it puts on the
code's tokens inside the haystack. Heads that copy the code score near 1, heads that attend
locally near 0. The idea of finding retrieval heads by their attention on a copied needle is
from Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality" (2024).

Prompts come from the calibration text with fixed seeds (same inputs, same prompts); the
evaluation's passkey and lines prompts (`dam_cli.evaluation.tasks`) share neither their filler nor their
wording. Prompt building needs only a tokenizer; `needle_scores` is pure math.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dam_cli.errors import DamError
from dam_cli.profiling.capture import allowed_keys, capped_scores

NEEDLE_SEED = 20261130  # changing it changes every needle prompt: profiles would no longer match
NEEDLE_PRE, NEEDLE_POST = " The secret code is ", ". "  # the code's digits go between
QUESTION = "\nWhat is the secret code?\nThe secret code is "


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]  # haystack with the needle, question, answer prefix, answer (teacher-forced)
    needle: list[int]  # positions of the code's tokens inside the haystack
    rows: list[int]  # positions whose next token is one of the answer's tokens


def needle_prompts(tokenizer, documents, length: int, n: int, seed: int = NEEDLE_SEED) -> list[NeedlePrompt]:
    """`n` prompts of `length` tokens at most, needles at depths (i + 0.5) / n of the haystack.

    `documents` yields (name, text) like `calib.builtin_documents`; their tokens, concatenated,
    are the haystack, each prompt starting at its own seeded offset.
    """
    if n < 1:
        raise DamError(f"--needle-samples must be at least 1, got {n}")
    rng = random.Random(seed)
    codes = [str(rng.randint(10000, 99999)) for _ in range(n)]
    enc = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    q_ids, pre, post = enc(QUESTION), enc(NEEDLE_PRE), enc(NEEDLE_POST)
    answers = [enc(c) for c in codes]
    hay_len = length - len(q_ids) - len(pre) - len(post) - 2 * max(len(a) for a in answers)
    if hay_len < 64:
        raise DamError(f"needle prompts of {length} tokens leave no room for a haystack: use --needle-length "
                       f"of at least {length - hay_len + 64}")
    pool: list[int] = []
    for _, text in documents:
        if text:
            pool.extend(enc(text))
        if len(pool) >= hay_len * 2:
            break
    if len(pool) < hay_len:
        raise DamError(f"the calibration text holds {len(pool)} tokens, fewer than the {hay_len} a needle "
                       f"haystack needs: lower --needle-length or give more text with --calib")
    prompts = []
    for i, answer in enumerate(answers):
        off = rng.randint(0, len(pool) - hay_len)
        hay = pool[off: off + hay_len]
        at = int((i + 0.5) / n * len(hay))
        # The pieces are tokenized apart, so the code's tokens in the needle are exactly the answer's.
        prefix = hay[:at] + pre + answer + post + hay[at:] + q_ids
        code_pos = list(range(at + len(pre), at + len(pre) + len(answer)))
        rows = list(range(len(prefix) - 1, len(prefix) - 1 + len(answer)))
        prompts.append(NeedlePrompt(ids=prefix + answer, needle=code_pos, rows=rows))
    return prompts


def needle_scores(q: torch.Tensor, k: torch.Tensor, scale: float, needle: list[int], rows: list[int], *,
                  window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Per query head, the mean over `rows` of the softmax mass on the `needle` keys: causal, within
    the layer's sliding `window` when set, scores soft-capped by `softcap` when set (as the model does).

    q `[H, n, D]`, k `[H_kv, n, D]` (one layer of one prompt, post-rotary); float32 `[H]`.
    """
    H, n, D = q.shape
    G = H // k.shape[0]
    r = torch.tensor(rows, dtype=torch.long)
    s = torch.matmul(q[:, r].float().reshape(k.shape[0], G, len(rows), D), k.float().transpose(-1, -2)[:, None])
    s = capped_scores(s.reshape(H, len(rows), n) * scale, softcap)
    s = s.masked_fill(~allowed_keys(r, n, window)[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p[:, :, torch.tensor(needle, dtype=torch.long)].sum(-1).mean(-1)


def choose_top(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """bool like `scores` `[N_L, H]`: the `budget` highest scores, ties to the earlier (layer, head)."""
    flat = scores.reshape(-1).double()
    budget = min(budget, flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    full = torch.zeros(flat.numel(), dtype=torch.bool)
    full[order[:budget]] = True
    return full.reshape(scores.shape)
