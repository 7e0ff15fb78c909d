"""Greedy answers to `dam eval`'s prompts, through `dam_cli.runtime.decode.decode_loop` (every decode
loop lives there): the retrieval tasks stop once a number has ended, the suite at its token budget."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

_ANSWER_END = re.compile(r"\d+\D")


def number_ended(tokenizer) -> Callable[[list[int]], bool]:
    """A `stop` for `greedy_answer`: true once the decoded tokens hold a number followed by another character."""
    return lambda tokens: _ANSWER_END.search(tokenizer.decode(tokens)) is not None


def greedy_answer(model, tokenizer, ids: list[int], max_new_tokens: int, device: str,
                  stop: Callable[[list[int]], bool] | None = None, graph: bool = False) -> str:
    """Greedy continuation of `ids` (at most `max_new_tokens` >= 1 tokens, KV cache) as text, special tokens
    dropped; stops at the tokenizer's EOS (not part of the answer) or once `stop(tokens)` is true. `graph`:
    decode over a static cache, replaying one CUDA graph per token on a GPU (`dam eval --cuda-graph`), with
    the same tokens as the dynamic-cache loop."""
    from dam_cli.runtime.decode import decode_loop, graph_decode_loop

    eos = tokenizer.eos_token_id
    x = torch.tensor([ids], dtype=torch.long, device=device)
    loop = graph_decode_loop if graph else decode_loop
    out = loop(model, x, max_new_tokens=max_new_tokens, eos_ids=() if eos is None else (eos,), stop=stop)
    tokens = out.tokens[:-1] if out.finish_reason == "eos" else out.tokens
    return tokenizer.decode(tokens, skip_special_tokens=True)
