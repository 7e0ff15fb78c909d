"""The `dam` and `dam_dense` attention implementations on a tiny random Llama (GQA 4 q / 2 kv heads).

Every comparison runs the same token stream through prefill and then one decode step per token
over a dynamic cache, and compares the logits of every position at every step. Both sides
compute in float32, so the tolerance is float32 rounding of a different summation order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama
from dam_kernels.selection import DynamicSelection
from helpers import (
    all_allowed_profile,
    profile_for,
    random_masks,
    register_dense_oracle,
    stepwise_logits,
    structured_profile,
)

from dam_cli.artifact.profile import Profile
from dam_cli.errors import DamError
from dam_cli.runtime import backend

TOL = dict(atol=2e-5, rtol=1e-5)  # float32 vs float32, different summation order


def random_profile_with_bare_heads(model, L: int, seed: int = 1):
    """Random causal true masks (0.4) and a few offsets / columns (0.25) per head, different for every head,
    except two heads of layer 0: one with no pattern at all, one whose diagonal is reached only through the guard."""
    NL, H = model.config.num_hidden_layers, model.config.num_attention_heads
    tm, offsets, columns = random_masks(NL, H, L, p_m=0.4, p_r=0.25, p_c=0.25, seed=seed)
    offsets[0, 0] = False  # one head with no pattern at all: rows beyond L keep only the guard
    columns[0, 0] = False
    offsets[0, 1, 0] = False  # and one whose diagonal is reached only through the guard
    return profile_for(model, tm, offsets, columns)


def _assert_steps_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        d = (a - b).abs()
        assert torch.allclose(a, b, **TOL), f"step {step}: max diff {d.max():.3g}, mean {d.mean():.3g}"


@pytest.fixture()
def model():
    return build_tiny_llama(seed=3)


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 60, (batch, n), generator=torch.Generator().manual_seed(seed))


def _triton_ready() -> bool:
    from dam_cli.runtime.attention import sparse_attention

    q = torch.randn(1, 2, 3, 16)
    k = torch.randn(1, 1, 3, 16)
    p = Profile.from_masks(torch.tril(torch.ones(1, 2, 4, 4, dtype=torch.bool)),
                           torch.ones(1, 2, 4, dtype=torch.bool), torch.ones(1, 2, 4, dtype=torch.bool))
    try:
        sparse_attention(q, k, k, p, 0, backend="triton")
    except Exception:  # not built yet, or needs CUDA tensors: the reference tests still run
        return False
    return True


BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ready(), reason="the Triton backend does not run here (not built, or needs CUDA)"))]


# ---- exactness ------------------------------------------------------------------------------

def test_all_allowed_profile_equals_sdpa_prefill_and_each_decode_step(model):
    L = 16
    ids = _ids(2 * L)  # every position < 2L: the all-allowed profile allows every causal pair
    want = stepwise_logits(model, ids, n_prompt=20)
    backend.enable_dam(model, all_allowed_profile(model=model, L=L), backend="reference")
    got = stepwise_logits(model, ids, n_prompt=20)
    backend.disable_dam(model)
    _assert_steps_close(got, want)


@pytest.mark.parametrize("make", [random_profile_with_bare_heads, structured_profile])
@pytest.mark.parametrize("be", BACKENDS)
def test_profile_equals_dense_masked_reference_beyond_L(model, make, be):
    L = 8
    prof = make(model, L)
    ids = _ids(23)  # prompt of 13 > L, then decode positions 13..22, past 2L
    register_dense_oracle("dam_test_masked", prof)
    model.set_attn_implementation("dam_test_masked")
    want = stepwise_logits(model, ids, n_prompt=13)
    model.set_attn_implementation("sdpa")
    dense = stepwise_logits(model, ids, n_prompt=13)
    backend.enable_dam(model, prof, backend=be)
    got = stepwise_logits(model, ids, n_prompt=13)
    backend.disable_dam(model)
    _assert_steps_close(got, want)
    # The oracle must differ from full attention, or this test would prove nothing.
    assert max(float((a - b).abs().max()) for a, b in zip(want, dense)) > 1e-3


def test_chunked_prefill_through_the_cache_matches_reference(model):
    """Sq > 1 over a longer cache (start > 0 with many rows): the prefill path with an offset."""
    prof = random_profile_with_bare_heads(model, 8, seed=5)
    ids = _ids(22, seed=2)
    register_dense_oracle("dam_test_masked2", prof)
    model.set_attn_implementation("dam_test_masked2")
    want = stepwise_logits(model, ids, n_prompt=18, chunk=7)
    model.set_attn_implementation("sdpa")
    backend.enable_dam(model, prof, backend="reference")
    got = stepwise_logits(model, ids, n_prompt=18, chunk=7)
    backend.disable_dam(model)
    _assert_steps_close(got, want)


def test_batch_of_two_unpadded_rows_equals_each_row_alone(model):
    prof = random_profile_with_bare_heads(model, 8)
    ids = _ids(15, batch=2, seed=4)
    backend.enable_dam(model, prof, backend="reference")
    both = stepwise_logits(model, ids, n_prompt=11)
    rows = [stepwise_logits(model, ids[b:b + 1], n_prompt=11) for b in range(2)]
    backend.disable_dam(model)
    for b in range(2):
        _assert_steps_close([x[b:b + 1] for x in both], rows[b])


def test_dense_implementation_equals_sdpa_prefill_decode_and_chunks(model):
    ids = _ids(30, seed=7)
    want = stepwise_logits(model, ids, n_prompt=20)
    backend.enable_dense(model)
    got = stepwise_logits(model, ids, n_prompt=20)
    chunked = stepwise_logits(model, ids, n_prompt=20, chunk=8)
    backend.disable_dam(model)
    _assert_steps_close(got, want)
    _assert_steps_close([torch.cat(chunked[:3], 1), *chunked[3:]], want)  # chunks of 8, 8, 4


# ---- routing, enable / disable --------------------------------------------------------------

def test_enable_disable_round_trip_restores_sdpa_bit_for_bit(model):
    ids = _ids(12)
    with torch.no_grad():
        before = model(ids).logits
    prof = random_profile_with_bare_heads(model, 8)
    backend.enable_dam(model, prof, backend="reference")
    backend.enable_dam(model, prof, backend="reference")  # enabling twice keeps the original to restore
    assert model.config._attn_implementation == "dam"
    backend.reset_seen(model)
    with torch.no_grad():
        during = model(ids).logits
    assert backend.layers_seen(model) == {0, 1}
    backend.check_routed(model)
    backend.disable_dam(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, during, atol=1e-3)
    assert backend.disable_dam(model) is model  # disabling again is harmless


def test_context_manager_disables_on_error(model):
    prof = random_profile_with_bare_heads(model, 8)
    with pytest.raises(RuntimeError):
        with backend.dam_attention(model, prof, backend="reference"):
            assert model.config._attn_implementation == "dam"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_check_routed_reports_layers_that_bypassed_the_registry(model):
    backend.enable_dam(model, random_profile_with_bare_heads(model, 8), backend="reference")
    backend.reset_seen(model)
    with pytest.raises(DamError, match="only 0 of 2 layers"):
        backend.check_routed(model)
    backend.disable_dam(model)


def test_dam_selected_by_name_without_enable_is_a_clear_error(model):
    backend.register()
    model.set_attn_implementation("dam")
    with pytest.raises(DamError, match="enable_dam"):
        with torch.no_grad():
            model(_ids(5))


# ---- refusals -------------------------------------------------------------------------------

def test_profile_of_another_shape_is_refused_with_both_identities(model):
    other = build_tiny_llama(seed=0, layers=3)
    prof = random_profile_with_bare_heads(other, 8)
    with pytest.raises(DamError) as e:
        backend.enable_dam(model, prof)
    msg = str(e.value)
    assert "3 layers" in msg and "2 layers" in msg and "dam profile" in msg and "\n" not in msg
    assert model.config._attn_implementation == "sdpa"


def test_profile_with_another_fingerprint_is_refused_unless_told(model):
    L = 8
    base = random_profile_with_bare_heads(model, L)
    prof = profile_for(model, base.true_mask, base.offsets, base.columns, config_sha256="0" * 64)
    with pytest.raises(DamError, match="config fingerprint"):
        backend.enable_dam(model, prof)
    backend.enable_dam(model, prof, check_fingerprint=False, backend="reference")
    backend.disable_dam(model)


def test_unknown_backend_is_refused(model):
    with pytest.raises(DamError, match="unknown backend"):
        backend.enable_dam(model, random_profile_with_bare_heads(model, 8), backend="cuda-magic")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_triton_without_a_gpu_is_refused_when_enabled(model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # the interpreter runs the kernels on the CPU (the tests' own setting)
    with pytest.raises(DamError, match="backend 'triton' needs a CUDA GPU and none is visible"):
        backend.enable_dam(model, random_profile_with_bare_heads(model, 8), backend="triton")
    assert model.config._attn_implementation != backend.DAM_IMPL  # nothing switched


def test_transformers_generate_works_on_dam(model):
    """`model.generate` (which passes an all-ones attention mask) runs on dam and, with the
    all-allowed profile, picks the same greedy tokens as SDPA."""
    ids = _ids(10, seed=9)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=2, eos_token_id=None)
        with backend.dam_attention(model, all_allowed_profile(model=model, L=16), backend="reference"):
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=2, eos_token_id=None)
    assert torch.equal(got, want)


def _spy_on_sparse_attention(monkeypatch) -> list:
    """Record (dynamic, rows) of every sparse_attention call the attention function makes."""
    import dam_cli.runtime.attention as A

    seen = []
    real = A.sparse_attention

    def spy(*a, **kw):
        seen.append((kw.get("dynamic"), a[0].shape[2]))
        return real(*a, **kw)

    monkeypatch.setattr(A, "sparse_attention", spy)
    return seen


@pytest.mark.parametrize("dynamic", [DynamicSelection(1, 16, tail_topk=5), DynamicSelection(1, 16, score="bound"),
                                     DynamicSelection(2, 16, score="antidiag", tail_mass=0.9),
                                     DynamicSelection(2, 16, score="antisum", tail_mass=0.9)])
def test_dynamic_part_reaches_every_attention_call(model, monkeypatch, dynamic):
    """enable_dam(dynamic=) is handed, whole, to each layer's sparse_attention, in prefill and decode."""
    seen = _spy_on_sparse_attention(monkeypatch)
    backend.enable_dam(model, random_profile_with_bare_heads(model, 8), backend="reference", dynamic=dynamic)
    assert backend.dynamic_of(model) == dynamic
    stepwise_logits(model, _ids(24), n_prompt=20)
    backend.disable_dam(model)
    assert seen and all(d == dynamic for d, _ in seen)
    assert {n for _, n in seen} == {20, 1}  # the prefill and the decode steps
    assert backend.dynamic_of(model) is None


def test_dynamic_part_off_reaches_no_attention_call(model, monkeypatch):
    """topk 0 is the dynamic part off: the attention calls get no selection at all."""
    seen = _spy_on_sparse_attention(monkeypatch)
    backend.enable_dam(model, random_profile_with_bare_heads(model, 8), backend="reference",
                       dynamic=DynamicSelection(0, 64))
    assert backend.dynamic_of(model) is None
    stepwise_logits(model, _ids(12), n_prompt=10)
    backend.disable_dam(model)
    assert seen and all(d is None for d, _ in seen)


@pytest.mark.parametrize("dynamic, needle", [
    (DynamicSelection(0, 128, tail_topk=3), "DynamicSelection.tail_topk needs DynamicSelection.topk > 0"),
    (DynamicSelection(1, 16, score="max"), "unknown DynamicSelection.score 'max'"),
    (DynamicSelection(4, 50), "DynamicSelection.block must be a positive multiple of 16 up to 8192, got 50"),
    (DynamicSelection(4, 64, score="antidiag"), "DynamicSelection.score antidiag keeps blocks by attention mass: "
                                                "give DynamicSelection.tail_mass"),
])
def test_bad_dynamic_part_is_refused_before_switching(model, dynamic, needle):
    with pytest.raises(DamError, match=needle):
        backend.enable_dam(model, random_profile_with_bare_heads(model, 8), dynamic=dynamic)
    assert model.config._attn_implementation == "sdpa"


# ---- sliding windows reach the attention functions through the mask builder ----------------------------------

def test_window_comes_from_the_mask_even_without_the_keyword(model):
    """Models whose window lives in the mask only (Qwen2-MoE, PhiMoE pass no `sliding_window`) still get it;
    a keyword that disagrees with the mask is refused, as the model's own attention would be ambiguous."""
    from dam_cli.runtime.attention import sparse_attention
    from dam_cli.runtime.masking import WindowMask

    prof = random_profile_with_bare_heads(model, 8)
    backend.enable_dam(model, prof, backend="reference")
    attn = model.model.layers[1].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 20, 16, generator=g) for h in (4, 2, 2))
    got, _ = backend.dam_attention_forward(attn, q[:, :, -6:], k, v, WindowMask(5, 14), scaling=0.25)
    want = sparse_attention(q[:, :, -6:], k, v, prof, 1, start=14, window=5, scale=0.25, backend="reference")
    assert torch.equal(got, want.transpose(1, 2))
    assert not torch.allclose(want, sparse_attention(q[:, :, -6:], k, v, prof, 1, start=14, scale=0.25), atol=1e-3)
    with pytest.raises(DamError, match="sliding window of 6 but its attention mask has 5"):
        backend.dam_attention_forward(attn, q, k, v, WindowMask(5, 0), sliding_window=6)
    with pytest.raises(DamError, match="sliding window of 6 but its attention mask has none"):
        backend.dam_attention_forward(attn, q, k, v, None, sliding_window=6)
    backend.enable_dense(model)
    out, _ = backend.dense_attention_forward(attn, q[:, :, -6:], k, v, WindowMask(5, 14), scaling=0.25)
    i, j = torch.arange(14, 20)[:, None], torch.arange(20)[None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, -6:], k.repeat_interleave(2, 1),
                                                           v.repeat_interleave(2, 1), scale=0.25,
                                                           attn_mask=(j <= i) & (i - j < 5))
    assert torch.allclose(out, ref.transpose(1, 2), **TOL)
    backend.disable_dam(model)


@pytest.mark.parametrize("be, built", [("auto", True), ("gathered", True), ("compiled", True), ("reference", False)])
def test_enable_on_the_cpu_builds_the_gathered_tables_before_any_prompt(model, be, built):
    """`enable_dam` on the CPU makes each layer's word tables and block summaries (what the gathered path's first
    call would), so a prompt's first token does not wait for them; other backends build nothing."""
    from dam_kernels import block_words, layout

    prof = random_profile_with_bare_heads(model, L=16)
    layout._MASKS.clear()
    block_words._TABLES.clear()
    backend.enable_dam(model, prof, backend=be, dynamic=None)
    try:
        layers = {key[1] for key in layout._MASKS if key[0] == id(prof)}
        assert layers == (set(range(model.config.num_hidden_layers)) if built else set())
        assert len(block_words._TABLES) == (len(layers) if built else 0)
        if built:  # and the first prefill then equals the reference
            ids = _ids(40)
            with torch.no_grad():
                got = model(ids).logits
            backend.disable_dam(model)
            backend.enable_dam(model, prof, backend="reference", dynamic=None)
            with torch.no_grad():
                want = model(ids).logits
            assert torch.allclose(got, want, **TOL)
    finally:
        backend.disable_dam(model)


def test_a_profile_path_is_loaded_and_wrong_arguments_are_one_dam_error(model, tmp_path):
    """`enable_dam(model, "p.safetensors")` loads the file; a missing file, a non-profile, a non-model and
    `disable_dam(None)` are one DamError each (they were AttributeError / TypeError), the model left unchanged."""
    from dam_cli.artifact.format import save_profile

    path = tmp_path / "p.safetensors"
    save_profile(random_profile_with_bare_heads(model, 8), path)
    for given in (str(path), path):
        backend.enable_dam(model, given, backend="reference")
        assert model.config._attn_implementation == backend.DAM_IMPL
        backend.disable_dam(model)
    with pytest.raises(DamError, match="missing.safetensors"):
        backend.enable_dam(model, str(tmp_path / "missing.safetensors"))
    for bad in (None, 5, {"masks": 1}):
        with pytest.raises(DamError, match=f"must be a Profile .* got {type(bad).__name__}"):
            backend.enable_dam(model, bad)
    odd = torch.nn.Linear(2, 2)
    odd.config = __import__("types").SimpleNamespace(num_hidden_layers=30)  # a config, not a transformers one
    for bad in ("model-dir", None, odd):
        with pytest.raises(DamError, match=f"enable_dam takes a loaded transformers model .* got {type(bad).__name__}"):
            backend.enable_dam(bad, str(path))
        with pytest.raises(DamError, match="disable_dam takes a loaded transformers model"):
            backend.disable_dam(bad)
        with pytest.raises(DamError, match="enable_dense takes a loaded transformers model"):
            backend.enable_dense(bad)
    assert model.config._attn_implementation == "sdpa"


def test_sparse_attention_refuses_an_empty_batch_and_a_scale_that_is_not_finite(model):
    from dam_cli.runtime.attention import sparse_attention

    prof = random_profile_with_bare_heads(model, 8)
    H, Hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    D = model.config.hidden_size // H
    q, k = torch.randn(1, H, 8, D), torch.randn(1, Hkv, 8, D)
    with pytest.raises(DamError, match="batch size 0"):
        sparse_attention(q[:0], k[:0], k[:0], prof, 0, backend="gathered")
    for scale in (float("nan"), float("inf"), "0.1", True):
        with pytest.raises(DamError, match="scale must be a finite number"):
            sparse_attention(q, k, k, prof, 0, backend="gathered", scale=scale)
    assert torch.isfinite(sparse_attention(q, k, k, prof, 0, backend="gathered", scale=0.25)).all()


def test_a_profile_of_another_model_names_both_and_the_fix(tiny_llama):
    """`enable_dam` with a profile of another shape: one line naming both models; an in-memory model without a
    name reads as "unnamed" (it once read "this model model"), and the fix is `dam profile --output PROFILE`."""
    import pytest as pt

    from dam_cli.artifact.profile import Profile
    from dam_cli.errors import DamError
    from dam_cli.runtime.backend import enable_dam

    m = torch.ones(1, 2, 8, 8, dtype=torch.bool).tril()
    o = torch.zeros(1, 2, 8, dtype=torch.bool)
    other = Profile.from_masks(m, o, o, name="other-model")
    with pt.raises(DamError) as e:
        enable_dam(tiny_llama, other)
    msg = str(e.value)
    assert "was made for other-model" in msg and "model model" not in msg and "\n" not in msg, msg
    assert "`dam profile" in msg and "--output PROFILE`" in msg, msg
