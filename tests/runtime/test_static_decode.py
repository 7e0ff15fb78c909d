"""Decoding over a static KV cache with the fill level on the device (the `--cuda-graph` loop).

- The decode kernel with `valid_len` (a device tensor) equals the kernel with a host `start`
  over the filled slots only, while the unfilled slots hold NaN (they must never be read).
- `sparse_attention(valid_len=...)` and the dense static decode equal their sliced versions.
- The whole loop (`graph_decode_loop`) gives, at every step, the logits of the dynamic-cache
  loop `decode_loop` on a tiny random Llama, for `dam` (a real-looking profile, one with
  retrieval heads) and `dam_dense`. On the CPU the loop runs eagerly (no graphs); on a CUDA
  machine the same tests also run with the graph captured and replayed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import build_tiny_llama  # noqa: E402
from dam_kernels.selection import DynamicSelection  # noqa: E402
from helpers import INTERPRET, KERNEL_DEVICE, random_profile, structured_profile  # noqa: E402

from dam_cli.artifact.profile import Profile  # noqa: E402
from dam_cli.errors import DamError  # noqa: E402
from dam_cli.runtime import backend  # noqa: E402
from dam_cli.runtime.attention import sparse_attention  # noqa: E402
from dam_cli.runtime.decode import decode_loop, graph_decode_loop  # noqa: E402

CUDA = torch.cuda.is_available() and not INTERPRET


def _static_inputs(B, H, H_kv, n_valid, slots, Sq, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.full((B, H_kv, slots, D), float("nan"))
    v = torch.full((B, H_kv, slots, D), float("nan"))
    k[:, :, :n_valid] = torch.randn(B, H_kv, n_valid, D, generator=g)
    v[:, :, :n_valid] = torch.randn(B, H_kv, n_valid, D, generator=g)
    return [t.to(dtype).to(KERNEL_DEVICE) for t in (q, k, v)]


@pytest.mark.skipif(KERNEL_DEVICE is None, reason="compiled Triton needs CUDA")
@pytest.mark.parametrize("n_valid, Sq", [(5, 1), (16, 1), (23, 1), (31, 2), (32, 1), (57, 3), (90, 1)])
def test_decode_kernel_reads_the_fill_level_on_the_device(n_valid, Sq):
    # L = 16, blocks of 16 keys: fill levels below, at and beyond L and beyond 2L, rows 1-3.
    from dam_kernels.decode import dam_decode
    from dam_kernels.layout import device_masks

    prof = random_profile(heads=6, p_r=0.2, p_c=0.2, seed=n_valid)
    dtype = torch.float32 if INTERPRET else torch.float16
    q, k, v = _static_inputs(2, 6, 2, n_valid, 128, Sq, 16, dtype, seed=n_valid)
    masks = device_masks(prof, 0, q.device)
    valid = torch.tensor([n_valid], device=q.device)
    got = dam_decode(q, k, v, masks, start=0, scale=0.25, block_n=16, valid_len=valid)
    ks, vs = k[:, :, :n_valid].contiguous(), v[:, :, :n_valid].contiguous()
    want = dam_decode(q, ks, vs, masks, start=n_valid - Sq, scale=0.25, block_n=16)
    assert not torch.isnan(got).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    # And the exact float32 reference on the filled slots.
    ref = sparse_attention(q.float().cpu(), ks.float().cpu(), vs.float().cpu(), prof, 0, start=n_valid - Sq,
                           backend="reference", scale=0.25)
    torch.testing.assert_close(got.float().cpu(), ref, **tol)


def test_sparse_attention_valid_len_equals_the_sliced_call():
    prof = random_profile(heads=6, p_r=0.2, p_c=0.2, seed=3)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 2, 16, generator=g)
    k = torch.randn(1, 2, 64, 16, generator=g)
    v = torch.randn(1, 2, 64, 16, generator=g)
    got = sparse_attention(q, k, v, prof, 0, valid_len=torch.tensor([41]), backend="reference")
    want = sparse_attention(q, k[:, :, :41], v[:, :, :41], prof, 0, start=39, backend="reference")
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad, needle", [(torch.tensor([4.0]), "integer tensor"), (torch.tensor([1, 2]), "one-element"),
                                         (torch.tensor([1]), "must cover"), (torch.tensor([65]), "must cover")])
def test_bad_valid_len_is_refused(bad, needle):
    prof = random_profile(heads=6, p_r=0.2, p_c=0.2, seed=4)
    q = torch.randn(1, 6, 2, 16)
    k = torch.randn(1, 2, 64, 16)
    with pytest.raises(DamError, match=needle):
        sparse_attention(q, k, k, prof, 0, valid_len=bad, backend="reference")


def test_dense_static_decode_equals_sdpa_on_the_filled_slots():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 3, 16, generator=g)
    k = torch.randn(2, 2, 40, 16, generator=g)
    v = torch.randn(2, 2, 40, 16, generator=g)
    k[:, :, 30:] = float("nan")  # unfilled slots: their scores are masked out
    v[:, :, 30:] = 0.0  # as in a StaticCache, whose buffers start as zeros
    got = backend._dense_static_decode(q, k, v, torch.tensor([30]), None)
    rows = torch.arange(27, 30)[:, None]
    mask = torch.arange(30)[None, :] <= rows
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :30].repeat_interleave(3, 1),
                                                            v[:, :, :30].repeat_interleave(3, 1), attn_mask=mask)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


# ---- the whole loop on a tiny Llama ----------------------------------------------------------

def _retrieval_profile(model, L):
    """The structured profile with two heads of layer 1 kept on full attention."""
    p = structured_profile(model, L)
    full = torch.zeros(p.n_layers, p.n_heads, dtype=torch.bool)
    full[1, 0] = full[1, 3] = True
    out = Profile.from_masks(p.true_mask, p.offsets, p.columns, meta=p.meta, full_heads=full)
    assert out.full_heads is not None and int(out.full_heads.sum()) == 2
    return out


def _logits_of(loop, model, ids, n, **kw):
    seen = []

    def pick(logits):
        seen.append(logits.detach().float().cpu().clone())
        return logits.argmax(-1)

    res = loop(model, ids, max_new_tokens=n, pick=pick, **kw)
    return res, seen


CASES = [("dam", "structured"), ("dam", "retrieval"), ("dense", None)]
GPU_CASES = CASES + [("dam", "dynamic"), ("dam", "dynamic-bound")]


def _enable(model, impl, which, L, backend_name):
    if impl == "dense":
        return backend.enable_dense(model)
    if which in ("dynamic", "dynamic-bound"):  # the dynamic part: top-2 blocks of 64, with retrieval heads
        score = "bound" if which == "dynamic-bound" else "mean"
        return backend.enable_dam(model, _retrieval_profile(model, L), backend=backend_name,
                                  dynamic=DynamicSelection(2, 64, score=score))
    prof = structured_profile(model, L) if which == "structured" else _retrieval_profile(model, L)
    return backend.enable_dam(model, prof, backend=backend_name)


@pytest.mark.parametrize("impl, which", CASES)
def test_static_loop_equals_the_dynamic_cache_loop_on_cpu(impl, which):
    model = build_tiny_llama(seed=7, layers=2, heads=4, kv_heads=2, head_dim=16)
    L = 8
    ids = torch.randint(3, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    _enable(model, impl, which, L, "reference")
    try:
        r1, want = _logits_of(decode_loop, model, ids, 12)
        r2, got = _logits_of(graph_decode_loop, model, ids, 12, use_graph=False)
    finally:
        backend.disable_dam(model)
    assert r1.tokens == r2.tokens and len(got) == len(want) == 12  # 13 + 12 tokens: decode beyond 2L
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


def test_graph_loop_refuses_odd_dynamic_blocks_and_cpu_graphs():
    model = build_tiny_llama(seed=7, layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    backend.enable_dam(model, structured_profile(model, 8), backend="reference", dynamic=DynamicSelection(2, 16))
    try:
        with pytest.raises(DamError, match="multiple of 64"):
            graph_decode_loop(model, ids, max_new_tokens=2)
    finally:
        backend.disable_dam(model)
    with pytest.raises(DamError, match="CUDA graphs need"):
        graph_decode_loop(model, ids, max_new_tokens=2, use_graph=True)


def test_static_loop_with_dynamic_part_equals_the_dynamic_cache_loop_on_cpu():
    # The dynamic part (top-k key blocks) in the static loop: same logits as the dynamic-cache loop.
    model = build_tiny_llama(seed=7, layers=2, heads=4, kv_heads=2, head_dim=16)
    ids = torch.randint(3, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(2))
    backend.enable_dam(model, structured_profile(model, 8), backend="reference", dynamic=DynamicSelection(1, 64))
    try:
        r1, want = _logits_of(decode_loop, model, ids, 6)
        r2, got = _logits_of(graph_decode_loop, model, ids, 6, use_graph=False)
    finally:
        backend.disable_dam(model)
    assert r1.tokens == r2.tokens
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.skipif(KERNEL_DEVICE is None, reason="compiled Triton needs CUDA")
@pytest.mark.parametrize("n_valid", [65, 100, 128, 129, 200])
def test_dynamic_selection_and_decode_read_the_fill_level_on_the_device(n_valid):
    # select_blocks_one and the decode kernel with `valid_len` over a NaN-padded static cache
    # equal their host-position versions over the filled slots (blocks of 32 keys, L = 16).
    from dam_kernels.decode import dam_decode
    from dam_kernels.dynamic import select_blocks_one
    from dam_kernels.layout import device_masks

    prof = random_profile(heads=6, p_r=0.2, p_c=0.2, seed=n_valid)
    dtype = torch.float32 if INTERPRET else torch.float16
    q, k, v = _static_inputs(1, 6, 2, n_valid, 256, 1, 16, dtype, seed=n_valid)
    valid = torch.tensor([n_valid], device=q.device)
    ks, vs = k[:, :, :n_valid].contiguous(), v[:, :, :n_valid].contiguous()
    sel = select_blocks_one(q, k, 0, 2, 32, valid_len=valid)
    want_sel = select_blocks_one(q, ks, n_valid - 1, 2, 32)
    assert torch.equal(sel[..., : want_sel.shape[-1]], want_sel) and not sel[..., want_sel.shape[-1]:].any()
    masks = device_masks(prof, 0, q.device)
    bn = 16 if INTERPRET else 32
    got = dam_decode(q, k, v, masks, start=0, scale=0.25, block_n=bn, dyn=sel, dyn_block=32,
                     max_extra=2 * 3 * (32 // bn), valid_len=valid)
    want = dam_decode(q, ks, vs, masks, start=n_valid - 1, scale=0.25, block_n=bn, dyn=want_sel, dyn_block=32,
                      max_extra=2 * 3 * (32 // bn))
    assert not torch.isnan(got).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got, want, **tol)


def _both_loops_then_disable(model, ids, n):
    """(result, logits) of the dynamic-cache loop and of the captured graph loop, DAM turned off after."""
    try:
        return (*_logits_of(decode_loop, model, ids, n), *_logits_of(graph_decode_loop, model, ids, n, use_graph=True))
    finally:
        backend.disable_dam(model)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run with TRITON_INTERPRET=0 on one)")
@pytest.mark.parametrize("impl, which", GPU_CASES)
def test_graph_loop_equals_the_dynamic_cache_loop_on_gpu(impl, which):
    model = build_tiny_llama(seed=7, layers=2, heads=4, kv_heads=2, head_dim=16).cuda()
    L = 32
    n = 230 if which in ("dynamic", "dynamic-bound") else 70  # dynamic: 3-4 earlier blocks of 64 to choose from
    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(1)).cuda()
    _enable(model, impl, which, L, "triton" if impl == "dam" else "auto")
    r1, want, r2, got = _both_loops_then_disable(model, ids, 24)
    assert r1.tokens == r2.tokens and len(got) == 24
    for step, (a, b) in enumerate(zip(got, want)):
        # float32 model; the decode kernels' dots run in tf32 on the GPU
        torch.testing.assert_close(a, b, atol=3e-3, rtol=3e-3, msg=lambda m, s=step: f"step {s}: {m}")


def test_a_static_cache_longer_than_the_model_is_not_taken_for_positions():
    # The graph loop rounds its cache up to whole selection blocks, so the buffer may hold more slots than the model
    # has positions (32,641 prompt tokens: 32,832 slots for a 32,768-position model). The shape check of the static
    # path must not read the buffer length as a position; the host path still refuses positions past the maximum.
    from dam_cli.runtime.attention import _check

    prof = structured_profile(build_tiny_llama(seed=7, layers=2, heads=4, kv_heads=2, head_dim=16), 8)
    prof.meta.model["max_position"] = 100
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 128, 16)
    _check(q, k, k, prof, 0, 127, positions=False)
    with pytest.raises(DamError, match="exceed the model's maximum of 100"):
        _check(q, k, k, prof, 0, 127)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (run with TRITON_INTERPRET=0 on one)")
def test_graph_loop_runs_up_to_the_model_maximum_with_a_rounded_cache():
    # 230 prompt tokens + 24 new = 254 positions of a 255-position model; the cache rounds up to 256 slots.
    model = build_tiny_llama(seed=7, layers=2, heads=4, kv_heads=2, head_dim=16, max_pos=255).cuda()
    ids = torch.randint(3, model.config.vocab_size, (1, 230), generator=torch.Generator().manual_seed(1)).cuda()
    prof = _retrieval_profile(model, 32)
    prof.meta.model["max_position"] = 255
    backend.enable_dam(model, prof, backend="triton", dynamic=DynamicSelection(2, 64))
    r1, _, r2, got = _both_loops_then_disable(model, ids, 24)
    assert r1.tokens == r2.tokens and len(got) == 24
