"""Attention recall against the model's real attention: zero outside a sliding window, soft-capped scores.

`attention_recall` on hand-made q/k (a mask equal to the window keeps all of a windowed layer's mass),
then `dam eval` on a tiny random Gemma 3 whose profile is exactly the window on its windowed layers.
"""

from __future__ import annotations

import pytest
import torch

from dam_cli.artifact.profile import Profile, ProfileMeta
from dam_cli.evaluation.config import quick_config
from dam_cli.evaluation.metrics import attention_recall
from dam_cli.evaluation.run import evaluate
from dam_cli.runtime.models import model_identity

W = 8  # the window of the tiny Gemma 3, below every measured length


def _band(rows: torch.Tensor, S: int, w: int) -> torch.Tensor:
    """bool `[len(rows), S]`: the causal window, key `j` with `0 <= i - j < w`."""
    d = rows[:, None] - torch.arange(S)[None, :]
    return (d >= 0) & (d < w)


def test_a_mask_equal_to_the_window_keeps_all_of_a_windowed_layers_mass():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 5, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    rows = torch.tensor([0, 7, 8, 20, 39])
    window = _band(rows, 40, W).expand(4, -1, -1)
    got = attention_recall(q, k, 0.25, rows, window, window=W)
    assert torch.equal(got, torch.ones(4, dtype=torch.float64))
    # Against plain causal attention the same mask loses the mass of the keys beyond the window.
    plain = attention_recall(q, k, 0.25, rows, window)
    assert (plain < 1).all() and (plain > 0).all()
    # A mask beyond the window changes nothing: the model gives those keys no attention.
    causal = _band(rows, 40, 40).expand(4, -1, -1)
    assert torch.equal(attention_recall(q, k, 0.25, rows, causal, window=W), got)
    # A mask of half the window keeps part of it.
    half = attention_recall(q, k, 0.25, rows, _band(rows, 40, W // 2).expand(4, -1, -1), window=W)
    assert (half < 1).all() and (half > 0).all()


@pytest.mark.parametrize("window", [None, 6])
def test_recall_uses_soft_capped_scores(window):
    g = torch.Generator().manual_seed(1)
    q, k = 3 * torch.randn(2, 4, 8, generator=g), 3 * torch.randn(1, 24, 8, generator=g)  # large scores
    rows = torch.tensor([3, 10, 17, 23])
    allowed = _band(rows, 24, 3).expand(2, -1, -1)
    cap = 2.0
    got = attention_recall(q, k, 0.5, rows, allowed, window=window, softcap=cap)
    # The model's attention in float64: capped scores, causal within the window, softmax; the mass inside.
    s = cap * torch.tanh(torch.einsum("hnd,sd->hns", q.double(), k[0].double()) * 0.5 / cap)
    seen = _band(rows, 24, window or 24)
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
    want = (p * allowed).sum(-1).mean(-1)
    assert torch.allclose(got, want, rtol=0, atol=1e-6)
    uncapped = attention_recall(q, k, 0.5, rows, allowed, window=window)
    assert (got - uncapped).abs().min() > 1e-3  # the cap changes the figure: it is applied


# ---- dam eval on a tiny random Gemma 3 -----------------------------------------------------------------------------

def _gemma3():
    from conftest import WORDS
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                           max_position_embeddings=256, sliding_window=W, final_logit_softcapping=None,
                           layer_types=["sliding_attention"] * 3 + ["full_attention"], bos_token_id=1,
                           eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def _window_profile(identity: dict, L: int, w: int = W) -> Profile:
    """Windowed layers: M, R exactly a window `w` (offsets 0 .. w-1), no column; the global layer: every pair
    up to 2L (causal M, every offset and column)."""
    NL, H = identity["n_layers"], identity["n_heads"]
    d = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    tm = ((d >= 0) & (d < w)).expand(NL, H, L, L).clone()
    R = (torch.arange(L) < w).expand(NL, H, L).clone()
    C = torch.zeros(NL, H, L, dtype=torch.bool)
    tm[3], R[3], C[3] = d >= 0, True, True
    meta = ProfileMeta(model=dict(identity), recipe={"pcl": L, "tau": 0.3, "lam": 0.5, "mu": 0.8, "eps": 1e-10},
                       calibration={"source": "test", "samples": 0, "tokens": 0, "token_sha256": ""})
    return Profile.from_masks(tm, R, C, meta=meta)


def test_eval_recall_of_the_window_is_one_on_a_gemma3(tiny_tokenizer, tmp_path):
    model = _gemma3()
    identity = model_identity(model.config, "tiny-gemma3")
    text = tmp_path / "heldout.txt"
    text.write_text("the cat is on the tree and the dog is in the house . what is the number ? 1 2 3 . " * 40)
    cfg = quick_config((32,), tasks=("recall",), methods=("full", "dam"), text=str(text))
    res = evaluate(model, tiny_tokenizer, identity, _window_profile(identity, 16), cfg)
    per = res["recall"]["dam"]["32"]["per_head"]
    assert per == [[1.0] * 4] * 4 and res["recall"]["dam"]["32"]["mean"] == 1.0
    # A profile of half the window keeps less on the windowed layers, all on the global one.
    half = _window_profile(identity, 16, W // 2)
    per = evaluate(model, tiny_tokenizer, identity, half, cfg)["recall"]["dam"]["32"]["per_head"]
    assert all(0 < v < 1 for row in per[:3] for v in row) and per[3] == [1.0] * 4


def test_measured_density_counts_a_windowed_layers_full_heads_as_their_window(tiny_tokenizer, tmp_path):
    """The density probe counts, in a sliding-window layer, only the cells inside the window: heads on the
    full-heads path there read their window, not every causal key (which the probe once counted)."""
    import dataclasses

    from dam_kernels.selection import DynamicSelection

    model = _gemma3()
    identity = model_identity(model.config, "tiny-gemma3")
    text = tmp_path / "heldout.txt"
    text.write_text("the cat is on the tree and the dog is in the house . what is the number ? 1 2 3 . " * 40)
    full = torch.zeros(4, 4, dtype=torch.bool)
    full[:3] = True  # every head of the three windowed layers
    prof = dataclasses.replace(_window_profile(identity, 16), full_heads=full)
    cfg = quick_config((32,), tasks=("alignment",), methods=("full", "dam-dynamic"), text=str(text),
                       dynamic=DynamicSelection(topk=1, block=16))
    res = evaluate(model, tiny_tokenizer, identity, prof, cfg)
    per_layer = res["dynamic_density"]["dam-dynamic"]["32"]["per_layer"]
    i, j = torch.arange(32)[:, None], torch.arange(32)[None, :]
    window_share = int(((j <= i) & (i - j < W)).sum()) / (32 * 33 / 2)
    assert per_layer[:3] == pytest.approx([window_share] * 3, abs=1e-12) and window_share < 0.5
    assert per_layer[3] == 1.0  # the global layer's profile allows every causal pair
