"""Measured density of the dynamic methods of `dam eval`: the static Stage-2 mask united
with the blocks `select_blocks` picks, counted exactly without an `S x S` mask, checked by hand and
against brute-force dense masks; and the eval's probe, which counts during the method's own forward."""

from __future__ import annotations

import json

import pytest
import torch
from dam_kernels.dynamic import dynamic_rows, select_blocks, static_block_counts, union_pair_counts
from dam_kernels.selection import DynamicSelection
from helpers import identity_profile

from dam_cli import masks
from dam_cli.artifact.profile import Profile
from dam_cli.evaluation import baselines
from dam_cli.evaluation.config import EvalConfig
from dam_cli.evaluation.heldout import heldout_tokens
from dam_cli.evaluation.methods import _Context, dynamic_extra_density, method_active, method_topk
from dam_cli.evaluation.probes import FULL_IMPL, PROBE_IMPL, _DensityProbe
from dam_cli.evaluation.run import evaluate
from dam_cli.runtime.models import model_identity

TEXT = ("the cat is on the tree and the dog is in the house . what is the number ? 1 2 3 . " * 40)


def _rows_fn(dense: torch.Tensor):
    """mask_rows of a dense static mask bool `[H, S, S]`."""
    return lambda rows, n: dense[:, rows, :n]


def _brute_union(static: torch.Tensor, chosen: torch.Tensor, block: int) -> torch.Tensor:
    """Allowed pairs per (batch, head) of static | dynamic_rows, from the dense masks: int64 `[B, H]`."""
    S = static.shape[-1]
    dyn = dynamic_rows(chosen, torch.arange(S), S, block)  # [B, H, S, S]
    union = static[None] | dyn
    assert not bool((union & ~torch.ones(S, S, dtype=torch.bool).tril()).any())  # causal
    return union.sum((-1, -2))


# ----------------------------------------------------------------------------------------------
# Pure counting
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, expected_static, expected_union", [(8, 15, 21), (7, 13, 18)])
def test_union_hand_worked(length, expected_static, expected_union):
    # One head, blocks of 2. Static: the diagonal (guard) and column 0, i.e. S + (S - 1) cells.
    S, B = length, 2
    static = torch.eye(S, dtype=torch.bool)
    static[:, 0] = True
    static = static[None]
    # Query block 3 (rows 6, 7) takes key block 0 (keys 0, 1); query block 2 (rows 4, 5) key block 1.
    nb = -(-S // B)
    chosen = torch.zeros(1, 1, nb, nb, dtype=torch.bool)
    chosen[0, 0, 3, 0] = True
    chosen[0, 0, 2, 1] = True
    blocks = static_block_counts(_rows_fn(static), S, B)
    assert int(blocks.sum()) == expected_static
    # S = 8: block (3, 0) adds 4 cells less (6, 0), (7, 0) already static = 2; block (2, 1) adds 4.
    # S = 7: block (3, 0) holds row 6 only: 2 cells less (6, 0) = 1; block (2, 1) adds 4.
    got = union_pair_counts(chosen, blocks, S, B)
    assert got.tolist() == [[expected_union]]
    assert torch.equal(got, _brute_union(static, chosen, B))
    # Nothing selected: the static count itself.
    assert union_pair_counts(torch.zeros_like(chosen), blocks, S, B).tolist() == [[expected_static]]


@pytest.mark.parametrize("length, block, chunk", [(37, 8, 8), (37, 8, 256), (64, 16, 16), (50, 16, 40)])
def test_static_block_counts_match_dense(length, block, chunk):
    g = torch.Generator().manual_seed(3)
    H, L = 3, 16
    tm = (torch.rand(1, H, L, L, generator=g) < 0.3).tril()
    prof = Profile.from_masks(tm, torch.rand(1, H, L, generator=g) < 0.2, torch.rand(1, H, L, generator=g) < 0.2,
                              full_heads=torch.tensor([[False, True, False]]))
    got = static_block_counts(lambda rows, n: prof.mask_rows(0, rows, n), length, block, chunk)
    dense = prof.mask(0, length)
    nb = -(-length // block)
    pad = torch.zeros(H, nb * block, nb * block, dtype=torch.bool)
    pad[:, :length, :length] = dense
    want = pad.reshape(H, nb, block, nb, block).sum((2, 4))
    assert torch.equal(got, want)
    # Totals per head are the Stage-2 counts of the profile (full head: every causal pair).
    per_row = masks.allowed_per_row(prof.layer_true_mask(0), prof.offsets[0], prof.columns[0], length,
                                    prof.full_heads[0])
    assert torch.equal(got.sum((-1, -2)), per_row.sum(-1))
    assert int(got[1].sum()) == length * (length + 1) // 2


@pytest.mark.parametrize("length, block, window", [(45, 8, 5), (64, 16, 20), (50, 16, 64)])
def test_static_counts_of_a_windowed_layer_stop_at_the_window(length, block, window):
    """In a sliding-window layer the probe counts the static cells inside the window, the cells the kernels
    compute: a full head's rows are its window, not every causal key; a window longer than the prompt changes
    nothing."""
    g = torch.Generator().manual_seed(length + window)
    H, L = 3, 16
    tm = (torch.rand(1, H, L, L, generator=g) < 0.3).tril()
    prof = Profile.from_masks(tm, torch.rand(1, H, L, generator=g) < 0.2, torch.rand(1, H, L, generator=g) < 0.4,
                              full_heads=torch.tensor([[False, True, False]]))
    config = EvalConfig(lengths=(length,), dynamic=DynamicSelection(topk=1, block=block))
    ctx = _Context(profile=None, identity={}, config=config)
    got = ctx.static_block_counts(prof, 0, length, window)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    inside = prof.mask(0, length) & (i - j < window)
    nb = -(-length // block)
    pad = torch.zeros(H, nb * block, nb * block, dtype=torch.bool)
    pad[:, :length, :length] = inside
    assert torch.equal(got, pad.reshape(H, nb, block, nb, block).sum((2, 4)))
    whole = ctx.static_block_counts(prof, 0, length)
    if window >= length:
        assert torch.equal(got, whole)
    else:  # the full head: its window's pairs alone, fewer than every causal pair
        assert int(got[1].sum()) == int(((j <= i) & (i - j < window)).sum()) < int(whole[1].sum())
    assert ctx.static_block_counts(prof, 0, length, window) is got  # cached per window


@pytest.mark.parametrize("length, block, window", [(45, 16, 5), (45, 16, 20), (64, 16, 40), (50, 8, 3), (33, 32, 70)])
def test_union_in_a_windowed_layer_matches_brute_force(length, block, window):
    """With a window, selected blocks add only their cells inside it (a partial last query block included)."""
    g = torch.Generator().manual_seed(length + window)
    H, L, D = 3, 16, 8
    tm = (torch.rand(1, H, L, L, generator=g) < 0.3).tril()
    prof = Profile.from_masks(tm, torch.rand(1, H, L, generator=g) < 0.15, torch.rand(1, H, L, generator=g) < 0.15,
                              full_heads=torch.tensor([[False, True, False]]))
    q, k = torch.randn(1, H, length, D, generator=g), torch.randn(1, H, length, D, generator=g)
    chosen = select_blocks(q, k, 0, 2, block)
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    band = i - j < window
    def windowed(rows, n):
        return prof.mask_rows(0, rows, n) & (rows[:, None] - torch.arange(n) < window)

    blocks = static_block_counts(windowed, length, block)
    got = union_pair_counts(chosen, blocks, length, block, window)
    want = ((prof.mask(0, length) | dynamic_rows(chosen, torch.arange(length), length, block)[0]) & band).sum((-1, -2))
    assert torch.equal(got[0], want)
    if window < length:  # the window really cuts the count
        assert bool((got <= union_pair_counts(chosen, blocks, length, block)).all())
        assert int(got[0, 1]) == int(((j <= i) & band).sum())  # the full head: its window


@pytest.mark.parametrize("length, block, topk", [(45, 16, 1), (45, 16, 2), (64, 16, 1), (96, 16, 3), (33, 32, 1)])
def test_union_matches_brute_force(length, block, topk):
    g = torch.Generator().manual_seed(length + topk)
    Bt, H, H_kv, L, D = 2, 4, 2, 16, 8
    tm = (torch.rand(1, H, L, L, generator=g) < 0.3).tril()
    prof = Profile.from_masks(tm, torch.rand(1, H, L, generator=g) < 0.15, torch.rand(1, H, L, generator=g) < 0.15,
                              full_heads=torch.tensor([[False, False, True, False]]))
    q = torch.randn(Bt, H, length, D, generator=g)
    k = torch.randn(Bt, H_kv, length, D, generator=g)
    chosen = select_blocks(q, k, 0, topk, block)
    blocks = static_block_counts(lambda rows, n: prof.mask_rows(0, rows, n), length, block, chunk=block)
    got = union_pair_counts(chosen, blocks, length, block)
    want = _brute_union(prof.mask(0, length), chosen, block)
    assert torch.equal(got, want)
    static_total = blocks.sum((-1, -2))
    assert bool((got >= static_total).all())
    assert bool((got[:, 2] == length * (length + 1) // 2).all())  # the full head gains nothing
    nb = -(-length // block)
    if nb > 2:
        assert bool((got[:, [0, 1, 3]] > static_total[[0, 1, 3]]).any())  # the selection adds pairs


@pytest.mark.parametrize("length, block", [(45, 16), (64, 16), (80, 32)])
def test_topk_covering_every_earlier_block(length, block):
    """k >= number of earlier blocks: static united with every earlier block, whatever q and k."""
    g = torch.Generator().manual_seed(7)
    H, L, D = 2, 16, 8
    tm = (torch.rand(1, H, L, L, generator=g) < 0.3).tril()
    prof = Profile.from_masks(tm, torch.rand(1, H, L, generator=g) < 0.15, torch.rand(1, H, L, generator=g) < 0.15)
    nb = -(-length // block)
    q = torch.randn(1, H, length, D, generator=g)
    k = torch.randn(1, H, length, D, generator=g)
    chosen = select_blocks(q, k, 0, nb, block)
    blocks = static_block_counts(lambda rows, n: prof.mask_rows(0, rows, n), length, block)
    got = union_pair_counts(chosen, blocks, length, block)
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    every_earlier = (j // block) < (i // block)
    want = (prof.mask(0, length) | every_earlier).sum((-1, -2))
    assert torch.equal(got[0], want)
    # By formula: the earlier blocks are whole, plus the static cells inside each query's own block.
    own = (prof.mask(0, length) & ((j // block) == (i // block))).sum((-1, -2))
    assert torch.equal(got[0], own + int(every_earlier.sum()))


def test_union_refuses_mismatched_shapes():
    blocks = torch.zeros(1, 3, 3, dtype=torch.int64)
    with pytest.raises(ValueError):
        union_pair_counts(torch.zeros(1, 1, 2, 2, dtype=torch.bool), blocks, 48, 16)
    bad = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    bad[0, 0, 1, 1] = True  # not strictly before its query block
    with pytest.raises(ValueError):
        union_pair_counts(bad, blocks, 48, 16)


# ----------------------------------------------------------------------------------------------
# The eval's probe
# ----------------------------------------------------------------------------------------------

def _identity(model):
    return model_identity(model.config, "tiny-llama")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    p = tmp_path_factory.mktemp("evald") / "heldout.txt"
    p.write_text(TEXT)
    return str(p)


def _config(heldout, opts, topk, tail=None, score="mean", **kw):
    base = dict(lengths=(96,), methods=("full", "dam-options-dynamic", "streaming-options-dynamic"),
                tasks=("alignment",), align_positions=16, recall_rows=8, text=heldout, options_profile=opts,
                dynamic=DynamicSelection(topk, 16, tail, score), samples=1, depths=(0.5,), max_new_tokens=4)
    base.update(kw)
    return EvalConfig(**base)


def test_eval_density_every_earlier_block(tiny_llama, tiny_tokenizer, heldout):
    """k = 99 covers every earlier block: the measured density is input-independent and known."""
    ident = _identity(tiny_llama)
    NL, H = ident["n_layers"], ident["n_heads"]
    full = torch.zeros(NL, H, dtype=torch.bool)
    full[0, 1] = True
    opts = identity_profile(ident, 16, seed=2, full_heads=full)
    res = evaluate(tiny_llama, tiny_tokenizer, ident, identity_profile(ident, 16, seed=1), _config(heldout, opts, 99))
    n, S, block = "96", 96, 16
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    earlier = (j // block) < (i // block)
    per = torch.stack([(opts.mask(l, S) | earlier).sum((-1, -2)) for l in range(NL)]).double() / (S * (S + 1) / 2)
    want = float(per.mean())
    assert res["density"]["dam-options-dynamic"][n] == want
    dd = res["dynamic_density"]["dam-options-dynamic"][n]
    assert dd["density"] == want
    assert dd["static"] == pytest.approx(float(opts.density(S).mean()), abs=1e-15)
    assert dd["static"] < want <= dd["upper_bound"]
    # The baseline follows the measured density (not the upper bound).
    w = res["streaming_window"]["streaming-options-dynamic"][n]["window"]
    assert w == baselines.matched_window(S, want, 4)
    assert w != baselines.matched_window(S, dd["upper_bound"], 4)
    json.dumps(res)
    assert tiny_llama.config._attn_implementation not in ("dam", FULL_IMPL, PROBE_IMPL)  # restored


@pytest.mark.parametrize("tail, score", [(None, "mean"), (99, "mean"), (None, "bound")])
def test_eval_density_input_dependent_matches_brute_force(tiny_llama, tiny_tokenizer, heldout, monkeypatch, tail,
                                                          score):
    """k = 1: the probe counts, on each layer's own q and k of the method's forward, what
    static | dynamic_rows allows (dense brute force from the same q and k). With a tail budget
    (--dynamic-tail-topk) the last query block's wider selection is counted too."""
    ident = _identity(tiny_llama)
    opts = identity_profile(ident, 16, seed=4)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    calls = []
    count = _DensityProbe.count

    def spy(self, layer, query, key, window=None):
        calls.append(layer)
        seen[layer] = (query.detach().clone(), key.detach().clone())
        return count(self, layer, query, key, window)

    monkeypatch.setattr(_DensityProbe, "count", spy)
    res = evaluate(tiny_llama, tiny_tokenizer, ident, identity_profile(ident, 16, seed=1),
                   _config(heldout, opts, 1, tail, score))
    S, block = 96, 16
    NL = ident["n_layers"]
    # One probed forward (dam-options-dynamic's alignment forward); the StreamingLLM baseline runs
    # without the dynamic part and is not probed.
    assert calls == list(range(NL))
    ctx = _Context(profile=None, identity=ident, config=_config(heldout, opts, 1))
    assert method_topk(ctx, "streaming-options-dynamic") == 0 and method_topk(ctx, "dam-options-dynamic") == 1
    per = []
    for l in range(NL):
        q, k = seen[l]
        assert q.shape[2] == S and k.shape[2] == S
        chosen = select_blocks(q, k, 0, 1, block, tail_topk=tail, score=score)
        if tail:  # the last query block takes every earlier block
            assert chosen[0, :, -1, :-1].all()
        per.append(_brute_union(opts.mask(l, S), chosen, block)[0])
    if score == "bound":  # the score really changes the selection the probe counts
        assert any(not torch.equal(select_blocks(*seen[l], 0, 1, block, score="bound"),
                                   select_blocks(*seen[l], 0, 1, block)) for l in range(NL))
    per_t = torch.stack(per).double() / (S * (S + 1) / 2)
    d = res["density"]["dam-options-dynamic"]["96"]
    assert d == float(per_t.mean())
    dd = res["dynamic_density"]["dam-options-dynamic"]["96"]
    assert dd["static"] < d < dd["upper_bound"]
    assert dd["per_layer"] == per_t.mean(-1).tolist()
    assert res["streaming_window"]["streaming-options-dynamic"]["96"]["window"] == baselines.matched_window(S, d, 4)


def test_probe_changes_no_output_and_lazy_measure_agrees(tiny_llama, tiny_tokenizer, heldout):
    """The probe forward returns the dam attention unchanged; without alignment (retrieval only) the
    density is measured by a forward of its own on the same held-out window, with the same result."""
    ident = _identity(tiny_llama)
    opts = identity_profile(ident, 16, seed=5)
    prof = identity_profile(ident, 16, seed=1)
    cfg = _config(heldout, opts, 2)
    ctx = _Context(profile=prof, identity=ident, config=cfg)
    ids = heldout_tokens(tiny_tokenizer, 96, heldout)
    x = torch.tensor([ids[:96]])
    outs = []
    for measure in (False, True):
        with method_active(tiny_llama, "dam-options-dynamic", ctx, 96, "cpu", measure=measure), torch.no_grad():
            outs.append(tiny_llama(input_ids=x, use_cache=False).logits)
    assert torch.equal(outs[0], outs[1])
    measured = ctx.measured[("dam-options-dynamic", 96)]["density"]
    res = evaluate(tiny_llama, tiny_tokenizer, ident, prof,
                   _config(heldout, opts, 2, tasks=("passkey",), methods=("dam-options-dynamic",
                                                                          "streaming-options-dynamic")))
    assert res["density"]["dam-options-dynamic"]["96"] == measured
    assert res["retrieval"]["passkey"]["streaming-options-dynamic"]["96"]["0.5"]["total"] == 1
    assert tiny_llama.config._attn_implementation not in ("dam", FULL_IMPL, PROBE_IMPL)


def test_dynamic_extra_density_with_tail_hand_worked():
    # 64 positions in blocks of 16: query blocks 0..3 get min(topk, qb) earlier blocks of 16.
    total = 64 * 65 / 2
    assert dynamic_extra_density(64, 1, 16) == (0 + 1 + 1 + 1) * 16 * 16 / total
    # tail 3: the last block (qb 3) gets all three earlier blocks.
    assert dynamic_extra_density(64, 1, 16, 3) == (0 + 1 + 1 + 3) * 16 * 16 / total
    assert dynamic_extra_density(64, 1, 16, 0) == (0 + 1 + 1 + 0) * 16 * 16 / total
