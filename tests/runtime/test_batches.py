"""Batches through `dam` and `dam_dense` attention: every batch row gets exactly what a batch of one gives.

Equal-length batches (no padding) and left-padded batches of different lengths (an attention mask with
leading zeros, as `tokenizer(..., padding=True, padding_side="left")` gives) run through `enable_dam` and the
decode loops (`batch_decode_loop`); each row's greedy tokens must equal the row's own run, and the logits of
every step must agree within float32 rounding. Tiny random Llama / Mistral (a sliding window) on the CPU,
the reference and the Triton interpreter; the compiled Triton path and real CUDA graphs on a GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import build_tiny_llama
from dam_kernels.selection import DynamicSelection
from helpers import INTERPRET, SHIPPED_PROFILE, gpu_only, random_profile

from dam_cli.errors import DamError
from dam_cli.runtime import backend
from dam_cli.runtime.decode import batch_decode_loop, decode_loop, graph_decode_loop

TOL = dict(atol=2e-5, rtol=1e-5)  # float32 against float32, another summation order
TRITON = pytest.mark.skipif(not INTERPRET, reason="the Triton interpreter (TRITON_INTERPRET=1) on the CPU; compiled "
                            "Triton: test_cuda_batches_equal_each_prompt_alone")
DYNAMIC = DynamicSelection(1, 16, tail_topk=2)
# (backend, attention, dynamic part): DAM with its static mask only and with the dynamic part, on the reference and
# the Triton kernels (the interpreter on the CPU: slow, so fewer tokens), and the dense peer (SDPA, no kernels)
VARIANTS = [("reference", "dam", None), ("reference", "dam", DYNAMIC), ("reference", "dense", None),
            pytest.param("triton", "dam", None, marks=TRITON)]
TRITON_DYNAMIC = [pytest.param("triton", "dam", DYNAMIC, marks=TRITON)]  # B > 1 through the selection: equal lengths


def recording_picker(seen: list):
    """Greedy picks that keep each step's logits `[B, V]`."""
    def pick(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.detach().clone())
        return logits.argmax(-1)
    return pick


def prompts(lengths: list[int], seed: int = 0, vocab: int = 60) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def left_padded(seqs: list[torch.Tensor], pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids `[B, S]`, attention mask `[B, S]`) with every row ending at the last slot."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad, dtype=torch.long, device=seqs[0].device)
    mask = torch.zeros(len(seqs), S, dtype=torch.long, device=seqs[0].device)
    for b, s in enumerate(seqs):
        ids[b, S - len(s):], mask[b, S - len(s):] = s, 1
    return ids, mask


def switch(model, attention: str, profile, be: str, dynamic=None) -> None:
    if attention == "dam":
        backend.enable_dam(model, profile, backend=be, dynamic=dynamic)
    else:
        backend.enable_dense(model)


def assert_rows_equal_singles(model, seqs, ids, mask, new: int, **loop) -> None:
    """`batch_decode_loop` over (ids, mask) against `decode_loop` (or `graph_decode_loop`) on each row alone."""
    batch_logits: list = []
    rows = batch_decode_loop(model, ids, mask, max_new_tokens=new, pick=recording_picker(batch_logits), **loop)
    assert len(rows) == len(seqs)
    for b, s in enumerate(seqs):
        one_logits: list = []
        if loop.get("graph"):
            one = graph_decode_loop(model, s[None], max_new_tokens=new, pick=recording_picker(one_logits),
                                    use_graph=loop.get("use_graph"))
        else:
            one = decode_loop(model, s[None], max_new_tokens=new, pick=recording_picker(one_logits))
        assert rows[b].tokens == one.tokens, f"row {b}"
        assert rows[b].finish_reason == one.finish_reason == "length"
        assert len(one_logits) == len(batch_logits) == new
        for step, (x, y) in enumerate(zip(batch_logits, one_logits)):
            assert torch.isfinite(x).all()
            d = (x[b] - y[0]).abs().max()
            assert torch.allclose(x[b], y[0], **TOL), f"row {b} step {step}: max diff {d:.3g}"


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(seed=3)


@pytest.fixture(scope="module")
def profile(model):
    return random_profile(model=model, L=8, p_m=0.4, p_r=0.25, p_c=0.25, seed=1)


@pytest.mark.parametrize("be, attention, dynamic", VARIANTS + TRITON_DYNAMIC)
def test_equal_length_batch_rows_equal_each_prompt_alone(model, profile, be, attention, dynamic):
    seqs = prompts([21, 21, 21], seed=4)
    switch(model, attention, profile, be, dynamic)
    try:
        assert_rows_equal_singles(model, seqs, torch.stack(seqs), None, new=2 if be == "triton" else 8)
    finally:
        backend.disable_dam(model)


@pytest.mark.parametrize("be, attention, dynamic", VARIANTS)
def test_left_padded_batch_rows_equal_each_prompt_alone(model, profile, be, attention, dynamic):
    seqs = prompts([7, 26, 15], seed=5)  # beyond L = 8 and across dynamic blocks of 16
    ids, mask = left_padded(seqs)
    switch(model, attention, profile, be, dynamic)
    try:
        assert_rows_equal_singles(model, seqs, ids, mask, new=2 if be == "triton" else 8)
    finally:
        backend.disable_dam(model)


def test_padding_is_what_makes_the_difference(model, profile):
    """Without its mask the padded batch gives other tokens: the test above checks something real."""
    seqs = prompts([7, 26, 15], seed=5)
    ids, mask = left_padded(seqs)
    with backend.dam_attention(model, profile, backend="reference"):
        padded = batch_decode_loop(model, ids, mask, max_new_tokens=6)
        unmasked = batch_decode_loop(model, ids, None, max_new_tokens=6)
    assert padded[0].tokens != unmasked[0].tokens or padded[2].tokens != unmasked[2].tokens


def test_windowed_model_left_padded_batch(profile):
    """Mistral with a sliding window of 8: the window counts from each row's own positions."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=63, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    mistral = MistralForCausalLM(cfg).eval()
    prof = random_profile(model=mistral, L=8, p_m=0.4, p_r=0.25, p_c=0.25, seed=2)
    seqs = prompts([5, 19, 12], seed=6)
    ids, mask = left_padded(seqs)
    for attention in ("dam", "dense"):
        switch(mistral, attention, prof, "reference")
        try:
            assert_rows_equal_singles(mistral, seqs, ids, mask, new=6)
        finally:
            backend.disable_dam(mistral)


def test_padded_query_rows_attend_to_nothing_and_give_zeros(model, profile):
    seqs = prompts([3, 9], seed=7)
    ids, mask = left_padded(seqs)
    inputs = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]))
    try:
        with backend.dam_attention(model, profile, backend="reference"), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    finally:
        hook.remove()
    attn = inputs[0]  # [B, S, H * D]: the attention output of every slot
    assert torch.isfinite(out.logits).all() and torch.isfinite(attn).all()
    assert bool((attn[0, :6] == 0).all())  # row 0's six pad slots
    assert bool((attn[0, 6:].abs().sum(-1) > 0).all()) and bool((attn[1].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("rows, what", [
    ([[1, 1, 1, 1, 0, 0], [1] * 6], "left-padded batches only"),  # right padding
    ([[1, 0, 1, 1, 1, 1], [1] * 6], "left-padded batches only"),  # a hole
    ([[0] * 6, [1] * 6], "all padding"),
])
@pytest.mark.parametrize("attention", ["dam", "dense"])
def test_other_padding_is_refused(model, profile, rows, what, attention):
    switch(model, attention, profile, "reference")
    try:
        with pytest.raises(DamError, match=what), torch.no_grad():
            model(input_ids=torch.randint(3, 60, (2, 6)), attention_mask=torch.tensor(rows))
    finally:
        backend.disable_dam(model)


def test_static_cache_loop_batches_equal_lengths_and_refuses_padding(model, profile):
    """The CUDA-graph loop's steps (run eagerly here) take equal-length rows; padded ones get one clear line."""
    seqs = prompts([13, 13], seed=8)
    with backend.dam_attention(model, profile, backend="reference"):
        assert_rows_equal_singles(model, seqs, torch.stack(seqs), None, new=6, graph=True, use_graph=False)
        ids, mask = left_padded(prompts([4, 13], seed=8))
        with pytest.raises(DamError, match="padded batches do not decode under --cuda-graph"):
            batch_decode_loop(model, ids, mask, max_new_tokens=4, graph=True, use_graph=False)


def test_rows_stop_at_their_own_end_of_sequence(model, profile):
    seqs = prompts([5, 11, 8], seed=9)
    ids, mask = left_padded(seqs)
    with backend.dam_attention(model, profile, backend="reference"):
        full = batch_decode_loop(model, ids, mask, max_new_tokens=8)
        eos = full[1].tokens[2]  # row 1 stops at its third token; the others where that id first appears
        cut = batch_decode_loop(model, ids, mask, max_new_tokens=8, eos_ids=[eos])
    for f, c in zip(full, cut):
        want = f.tokens[: f.tokens.index(eos) + 1] if eos in f.tokens else f.tokens
        assert c.tokens == want
        assert c.finish_reason == ("eos" if eos in f.tokens else "length")
        assert 0 <= c.decode_s <= max(x.decode_s for x in cut) and c.ttft_s == cut[0].ttft_s


def test_transformers_generate_with_left_padding_equals_each_prompt_alone(model, profile):
    """`model.generate` (its own position ids from the mask) on dam, a left-padded batch against each row."""
    seqs = prompts([6, 14], seed=10)
    ids, mask = left_padded(seqs)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    with backend.dam_attention(model, profile, backend="reference"), torch.no_grad():
        both = model.generate(ids, attention_mask=mask, **kw)
        for b, s in enumerate(seqs):
            one = model.generate(s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long), **kw)
            assert torch.equal(both[b, ids.shape[1]:], one[0, len(s):]), f"row {b}"


@gpu_only
@pytest.mark.parametrize("attention, dynamic", [("dam", None), ("dam", DynamicSelection(1, 64, tail_topk=2)),
                                                ("dense", None)])
def test_cuda_batches_equal_each_prompt_alone(attention, dynamic):
    """Compiled Triton kernels (prefill, decode, the dynamic part's selection) and real CUDA graphs, float32."""
    model = build_tiny_llama(seed=3, max_pos=2048).cuda()
    prof = random_profile(model=model, L=64, p_m=0.3, p_r=0.2, p_c=0.2, seed=1)
    switch(model, attention, prof, "triton", dynamic)
    try:
        seqs = [s.cuda() for s in prompts([150, 300, 77], seed=11)]
        ids, mask = left_padded(seqs)
        assert_rows_equal_singles(model, seqs, ids, mask, new=6)
        same = [s.cuda() for s in prompts([200, 200, 200], seed=12)]
        assert_rows_equal_singles(model, same, torch.stack(same), None, new=6)
        assert_rows_equal_singles(model, same, torch.stack(same), None, new=6, graph=True, use_graph=True)
    finally:
        backend.disable_dam(model)


@pytest.mark.slow
def test_smollm2_padded_batch_of_chat_prompts_equals_each_alone():
    """The embedded SmolLM2 on the CPU with the shipped profile: a left-padded batch of chat prompts, greedy."""
    if not os.path.exists(SHIPPED_PROFILE):
        pytest.skip("shipped SmolLM2 profile not built")
    from dam_cli.artifact.profile import load_profile
    from dam_cli.runtime.generate import encode_prompt
    from dam_cli.runtime.models import load_model

    loaded = load_model(None, device="cpu", dtype=torch.float64)  # float32's reduction order varies by CPU
    texts = ["What is the capital of France?", "Name a colour.",
             "The keeper wrote the date, the weather and the ships he saw in his log. " * 4 + "What did he write?"]
    seqs = [torch.tensor(encode_prompt(loaded.tokenizer, t, chat=True)) for t in texts]
    assert len({len(s) for s in seqs}) == 3  # really padded
    ids, mask = left_padded(seqs, pad=loaded.tokenizer.pad_token_id or 0)
    with backend.dam_attention(loaded.model, load_profile(SHIPPED_PROFILE), backend="reference"):
        assert_rows_equal_singles(loaded.model, seqs, ids, mask, new=4)
