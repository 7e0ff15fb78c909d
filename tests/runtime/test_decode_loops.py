"""The decode loops of `dam_cli.runtime.decode`: how `token_loop` stops (end-of-sequence, the
caller's `stop`, the token budget), `decode_loop` on a tiny Llama, and the module layout (the
loops import nothing from `dam_cli.runtime.generate`)."""

from __future__ import annotations

import ast
import os

import pytest
import torch
from conftest import build_tiny_llama

from dam_cli.runtime import decode
from dam_cli.runtime.decode import decode_loop, token_loop


def _scripted(ids: list[int], vocab: int = 10):
    """prefill/step that make the greedy picker emit `ids` in order, and the steps' inputs."""
    def logits_of(t: int) -> torch.Tensor:
        x = torch.zeros(1, vocab)
        x[0, t] = 1.0
        return x

    fed: list[tuple[int, int]] = []

    def step(tok: torch.Tensor, n: int) -> torch.Tensor:
        fed.append((int(tok[0]), n))
        return logits_of(ids[n])

    return (lambda: logits_of(ids[0])), step, fed


@pytest.mark.parametrize("kw, tokens, reason", [
    (dict(max_new_tokens=4), [3, 4, 5, 6], "length"),
    (dict(max_new_tokens=1), [3], "length"),
    (dict(max_new_tokens=9, eos_ids=[5]), [3, 4, 5], "eos"),
    (dict(max_new_tokens=9, eos_ids=[3]), [3], "eos"),
    (dict(max_new_tokens=9, stop=lambda t: sum(t) >= 7), [3, 4], "stop"),
    (dict(max_new_tokens=9, eos_ids=[4], stop=lambda t: sum(t) >= 7), [3, 4], "eos"),  # eos wins a tie
    (dict(max_new_tokens=2, stop=lambda t: sum(t) >= 7), [3, 4], "stop"),  # stop is checked on the last token too
])
def test_token_loop_stops_at_eos_stop_or_budget(kw, tokens, reason):
    prefill, step, fed = _scripted([3, 4, 5, 6, 7, 8, 9, 1, 2])
    seen: list[int] = []
    res = token_loop(prefill, step, on_token=seen.append, **kw)
    assert res.tokens == tokens and seen == tokens and res.finish_reason == reason
    # Each generated token but the last is fed back, with its index.
    assert fed == [(t, n) for n, t in enumerate(tokens[:-1], start=1)]
    assert res.ttft_s >= 0 and res.decode_s >= 0


def test_decode_loop_stop_and_eos_cut_the_same_greedy_stream():
    model = build_tiny_llama(seed=2)
    ids = torch.randint(3, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    full = decode_loop(model, ids, max_new_tokens=8)
    assert len(full.tokens) == 8 and full.finish_reason == "length"
    cut = decode_loop(model, ids, max_new_tokens=8, stop=lambda t: len(t) == 3)
    assert cut.tokens == full.tokens[:3] and cut.finish_reason == "stop"
    eos = full.tokens[4]
    first = full.tokens.index(eos)
    at_eos = decode_loop(model, ids, max_new_tokens=8, eos_ids=[eos])
    assert at_eos.tokens == full.tokens[: first + 1] and at_eos.finish_reason == "eos"


def _imported_modules(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_loops_do_not_import_the_generate_command():
    """generate.py imports the loops; decode.py must never import generate.py back."""
    mods = _imported_modules(decode.__file__)
    assert "dam_cli.runtime.generate" not in mods
    gen = os.path.join(os.path.dirname(decode.__file__), "generate.py")
    assert "dam_cli.runtime.decode" in _imported_modules(gen)


@pytest.mark.parametrize("temperature", [1e-308, 1e-40, 1e-30])
def test_a_temperature_too_small_for_float32_samples_the_best_token(temperature):
    """A positive temperature under float32's smallest normal number would round to 0 (0 / 0 for the best logit):
    the picker divides by that number instead, which leaves all the mass on the best token."""
    logits = torch.tensor([[1.0, 3.0, 2.5, -float("inf")], [0.5, 0.25, 0.0, 0.125]])
    for top in ({}, {"top_k": 2}, {"top_p": 0.5}):
        pick = decode.make_picker(temperature, generator=torch.Generator().manual_seed(0), **top)
        assert pick(logits).tolist() == [1, 0]


@pytest.mark.parametrize("top_p", [1e-300, 1e-46])
def test_a_top_p_that_rounds_to_zero_keeps_the_best_token(top_p):
    """top_p below float32's smallest number compares as 0: every token's mass before it would reach it, the best
    one's included; the best one always stays (was a multinomial over no token)."""
    logits = torch.tensor([[1.0, 3.0, 2.5], [0.5, 0.25, 0.0]])
    pick = decode.make_picker(1.0, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert pick(logits).tolist() == [1, 0]


def test_sampling_at_an_ordinary_temperature_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    pick = decode.make_picker(1.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.cat([pick(logits) for _ in range(4000)]), minlength=3).float() / 4000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.03, rtol=0)
