"""Every decoder family through the `dam` and `dam_dense` attention, on tiny random models (CPU, float32).

Per family (4 layers, 4 query / 2 kv heads, the tiny word tokenizer): `dam profile` on the saved model
works; a keep-everything profile generates exactly the tokens of full attention; its logits equal the
model's own eager attention within 1e-5 at every prefill, chunk and decode step; the Triton interpreter
equals the reference. Windowed layers (Mistral, Gemma 2 and 3, Qwen2's upper layers) are tested past their
window, and a random profile against a dense oracle of window AND DAM mask (AND Gemma 2's soft-cap).
"""

from __future__ import annotations

import pytest
import torch
from conftest import WORDS, build_tokenizer
from helpers import all_allowed_profile, random_profile, register_dense_oracle, stepwise_logits
from transformers import AutoModelForCausalLM

from dam_cli.artifact.profile import load_profile
from dam_cli.errors import DamError
from dam_cli.runtime import backend
from dam_cli.runtime.attention import triton_refusal
from dam_cli.runtime.decode import decode_loop, forward_kwargs, graph_decode_loop, new_cache, new_static_cache

W = 8  # the sliding window of windowed families: smaller than every test sequence
VOCAB = len(WORDS) + 3
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 against float32, another summation order
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, tie_word_embeddings=False, initializer_range=0.2)  # larger weights: peaked attention
GEMMA = dict(query_pre_attn_scalar=16, final_logit_softcapping=None)

FAMILIES = {  # name -> (config class, its fields beyond BASE)
    "llama": ("llama.LlamaConfig", {}),
    "mistral": ("mistral.MistralConfig", dict(sliding_window=None)),
    "mistral-window": ("mistral.MistralConfig", dict(sliding_window=W)),
    "qwen2": ("qwen2.Qwen2Config", {}),
    "qwen2-window": ("qwen2.Qwen2Config", dict(use_sliding_window=True, sliding_window=W, max_window_layers=2)),
    "qwen3": ("qwen3.Qwen3Config", {}),
    "phi3": ("phi3.Phi3Config", dict(hidden_size=384, head_dim=96, initializer_range=0.08)),  # head dim 96
    "gemma2": ("gemma2.Gemma2Config", dict(GEMMA, sliding_window=W, attn_logit_softcapping=2.0)),
    "gemma3": ("gemma3.Gemma3TextConfig", dict(GEMMA, head_dim=32, sliding_window=W, query_pre_attn_scalar=32,
                                                layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "gemma3-d256": ("gemma3.Gemma3TextConfig", dict(GEMMA, head_dim=256, sliding_window=W, query_pre_attn_scalar=256,
                                                     layer_types=["sliding_attention", "full_attention"] * 2)),
    "olmo2": ("olmo2.Olmo2Config", {}),
}
WINDOWED = ["mistral-window", "qwen2-window", "gemma2", "gemma3"]
SPARSE = dict(L=8, p_m=0.4, p_r=0.3, p_c=0.3)  # the random profile of these tests


def config_of(family: str, **over):
    import importlib

    path, fields = FAMILIES[family]
    module, cls = path.split(".")
    config_cls = getattr(importlib.import_module(f"transformers.models.{module}"), cls)
    return config_cls(**{**BASE, **fields, **over})


def build(family: str, seed: int = 0, **over):
    """The family's tiny random model on its own eager attention, the reference of every comparison."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_of(family, **over), attn_implementation="eager")
    return model.eval()


def layer_windows(model) -> list[int | None]:
    """Each layer's window as the config defines it (not as the attention code reads it)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] \
        * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def assert_close(got, want, what: str) -> None:
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(a, b, **TOL), f"{what}, step {step}: max diff {(a - b).abs().max():.3g}"


def on(model, impl: str, profile=None, be: str = "reference"):
    """Put `model` on `impl`: "eager" (its own), "dense" (dam_dense) or "dam" (with `profile`)."""
    backend.disable_dam(model)
    if impl == "dam":
        backend.enable_dam(model, profile, backend=be)
    elif impl == "dense":
        backend.enable_dense(model)
    return model


def greedy(model, ids, n: int, loop=decode_loop) -> list[int]:
    return loop(model, ids, max_new_tokens=n).tokens


# ---- (a) dam profile on the saved model; (b) greedy text of a keep-everything profile -----------------------

def save_family(family: str, folder) -> None:
    build(family, initializer_range=0.02).save_pretrained(folder)  # near-uniform attention: no pair below eps
    build_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dam_profile_with_a_tiny_tau_keeps_every_pair_the_model_attends(family, tmp_path):
    """Every causal pair, within the window on sliding layers (the model's attention is zero beyond it)."""
    from dam_cli.profiling.run import ProfileConfig, run_profile

    save_family(family, tmp_path / "model")
    calib = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(3)
    calib.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (60,), generator=g)))
    out = tmp_path / "p.safetensors"
    L = 16
    run_profile(ProfileConfig(output=str(out), model=str(tmp_path / "model"), calib=(str(calib),), samples=2,
                              pcl=L, tau=1e-6, device="cpu"))
    prof = load_profile(out)
    model = build(family)
    want = all_allowed_profile(model=model, L=L)
    assert prof.meta.model["config_sha256"] == want.meta.model["config_sha256"]
    mu = prof.meta.recipe["mu"]
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    for layer, w in enumerate(layer_windows(model)):
        if w is None:  # so the all-allowed profile of the tests below
            assert torch.equal(prof.true_mask[layer], want.true_mask[layer])
            assert bool(prof.offsets[layer].all()) and bool(prof.columns[layer].all())
            continue
        band = (j <= i) & (i - j < w)
        assert torch.equal(prof.true_mask[layer], band.expand(4, -1, -1)), f"{family} layer {layer}"
        assert torch.equal(prof.offsets[layer], (torch.arange(L) < w).expand(4, -1))
        kept = band.sum(0).double() >= (L - torch.arange(L)).double() * mu  # a column's kept cells >= mu x its size
        assert torch.equal(prof.columns[layer], kept.expand(4, -1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_everything_generates_the_text_of_full_attention(family, tmp_path):
    """`dam generate` (the library call) with a keep-everything profile, `--attention full` and the model's
    own attention (`sdpa`, eager where the model has no SDPA) give the same greedy text, past window and PCL."""
    from dam_cli.runtime.generate import GenerateConfig, run_generate

    save_family(family, tmp_path / "model")
    path = tmp_path / "keep.safetensors"
    all_allowed_profile(model=build(family), L=16).save(path)
    g = torch.Generator().manual_seed(5)
    prompt = " ".join(WORDS[int(i)] for i in torch.randint(7, len(WORDS), (12,), generator=g))
    texts = {}
    for attention in ("sdpa", "full", "dam"):  # 12 + 16 tokens: positions past the window, below 2 x PCL
        res = run_generate(GenerateConfig(profile=str(path), model=str(tmp_path / "model"), prompt=prompt,
                                          max_new_tokens=16, attention=attention, backend="reference", device="cpu",
                                          dtype="float32", ignore_eos=True))
        assert res.new_tokens == 16 and res.prompt_tokens < 14
        texts[attention] = res.text
    assert texts["dam"] == texts["full"] == texts["sdpa"] and texts["sdpa"].strip()


# ---- (c): keep-everything DAM and dam_dense equal the model's eager attention --------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_everything_logits_equal_eager_at_every_step(family):
    model = build(family, seed=1)
    ids = ids_of(26, seed=1)
    want = stepwise_logits(on(model, "eager"), ids, n_prompt=18, chunk=7)  # chunks 7, 7, 4, then 8 decode steps
    for impl in ("dense", "dam"):
        on(model, impl, all_allowed_profile(model=model, L=16))
        assert_close(stepwise_logits(model, ids, n_prompt=18, chunk=7), want, f"{family} on {impl}")
        if family in WINDOWED:  # the static cache of the graph loop: full-length slots on sliding layers too
            static = greedy(model, ids[:, :12], 8, loop=lambda *a, **k: graph_decode_loop(*a, use_graph=False, **k))
            assert static == greedy(on(model, "eager"), ids[:, :12], 8)
    backend.disable_dam(model)


# ---- window AND DAM mask (AND soft-cap) against a dense oracle ------------------------------------------------

@pytest.mark.parametrize("family", WINDOWED)
def test_random_profile_equals_window_and_mask_oracle(family):
    model = build(family, seed=2)
    prof = random_profile(model=model, seed=1, **SPARSE)
    ids = ids_of(24, seed=2)
    windows = layer_windows(model)
    assert any(w == W for w in windows)
    cap = getattr(model.config, "attn_logit_softcapping", None)
    register_dense_oracle("dam_test_window_oracle", prof, windows, cap)
    model.set_attn_implementation("dam_test_window_oracle")
    want = stepwise_logits(model, ids, n_prompt=14, chunk=5)
    register_dense_oracle("dam_test_no_window", prof, [None] * len(windows), cap)
    model.set_attn_implementation("dam_test_no_window")
    unwindowed = stepwise_logits(model, ids, n_prompt=14, chunk=5)
    model.set_attn_implementation("eager")
    assert max_diff(want, unwindowed) > 1e-3  # the window bites (and the profile, against eager below)
    assert max_diff(want, stepwise_logits(model, ids, n_prompt=14, chunk=5)) > 1e-3
    on(model, "dam", prof)
    assert_close(stepwise_logits(model, ids, n_prompt=14, chunk=5), want, family)
    backend.disable_dam(model)


def test_soft_capping_bites_in_the_gemma2_test_model():
    ids = ids_of(16)
    with torch.no_grad():
        capped = build("gemma2").model(ids).last_hidden_state
        plain = build("gemma2", attn_logit_softcapping=None).model(ids).last_hidden_state
    assert float((capped - plain).abs().max()) > 1e-2


# ---- (d): the Triton interpreter equals the reference --------------------------------------------------------

def _triton_wait_reason(model) -> str | None:
    """Why the Triton kernels do not take this family yet (the lead flips dam_cli.runtime.attention), or None."""
    cfg = model.config
    probe = torch.empty(1, 1, 1, int(backend.model_identity_of(model)["head_dim"]))
    window = W if any(layer_windows(model)) else None
    why = triton_refusal(probe, window=window, softcap=getattr(cfg, "attn_logit_softcapping", None))
    return None if why is None else f"waits for the kernels (dam_cli.runtime.attention.triton_refusal): triton {why}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_interpreter_equals_reference(family):
    model = build(family, seed=4)
    reason = _triton_wait_reason(model)
    if reason:
        pytest.skip(reason)
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no CUDA and no Triton interpreter")
    prof = random_profile(model=model, seed=4, **SPARSE)
    ids = ids_of(22, seed=4)
    want = stepwise_logits(on(model, "dam", prof, "reference"), ids, n_prompt=19)  # 19 rows: the prefill kernel
    got = stepwise_logits(on(model, "dam", prof, "triton"), ids, n_prompt=19)
    backend.disable_dam(model)
    assert_close(got, want, f"{family} triton")


# ---- caches -------------------------------------------------------------------------------------------------

def test_dam_caches_keep_every_key_on_sliding_layers():
    from transformers import DynamicCache

    model = build("gemma3")
    ids = ids_of(20)
    cache = new_cache(model)
    kw, _ = forward_kwargs(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: cache})
    assert [layer.keys.shape[2] for layer in cache.layers] == [20] * 4
    truncating = DynamicCache(config=model.config)  # what transformers makes: W-1 keys on sliding layers
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: truncating})
    assert [layer.keys.shape[2] for layer in truncating.layers] == [W - 1] * 3 + [20]
    static = new_static_cache(model, 40)
    assert {type(layer).__name__ for layer in static.layers} == {"StaticLayer"}


@pytest.mark.parametrize("family", ["mistral-window", "gemma3"])
def test_a_cache_that_drops_sliding_keys_runs_on_the_reference_with_a_key_offset(family):
    """A user's transformers cache (`DynamicCache(config)`) keeps W-1 keys on sliding layers: the keys then
    start at `key_start` > 0, which the reference handles exactly (eager over the same kind of cache)."""
    from transformers import DynamicCache

    model = build(family, seed=5)
    ids = ids_of(24, seed=5)
    want = stepwise_logits(model, ids, n_prompt=10, chunk=4, cache=DynamicCache(config=model.config))
    for impl in ("dense", "dam"):
        on(model, impl, all_allowed_profile(model=model, L=16))
        got = stepwise_logits(model, ids, n_prompt=10, chunk=4, cache=DynamicCache(config=model.config))
        assert_close(got, want, f"{family} on {impl}, cache dropping keys")
    with torch.no_grad():  # transformers' own generate makes such a cache
        out = model.generate(ids[:, :10], attention_mask=torch.ones(1, 10, dtype=torch.long), max_new_tokens=12,
                             do_sample=False, eos_token_id=None)
        on(model, "eager")
        assert torch.equal(out, model.generate(ids[:, :10], attention_mask=torch.ones(1, 10, dtype=torch.long),
                                               max_new_tokens=12, do_sample=False, eos_token_id=None))
    from dam_kernels.selection import DynamicSelection

    backend.enable_dam(model, random_profile(model=model, seed=1, **SPARSE), backend="reference",
                       dynamic=DynamicSelection(1, 16))
    with pytest.raises(DamError, match="dynamic part needs every key"):
        stepwise_logits(model, ids[:, :12], n_prompt=10, cache=DynamicCache(config=model.config))
    backend.disable_dam(model)


def test_triton_refuses_a_cache_that_dropped_keys():
    from dam_cli.runtime.attention import sparse_attention

    model = build("llama")
    prof = random_profile(model=model, seed=1, **SPARSE)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, W, 16)  # row 20 over the keys its window reaches
    with pytest.raises(DamError, match="dropped some"):
        sparse_attention(q, k, k, prof, 0, start=20, key_start=21 - W, window=W, backend="triton")
    with pytest.raises(DamError, match="row 20 may attend earlier"):  # a window wider than the keys held
        sparse_attention(q, k, k, prof, 0, start=20, key_start=21 - W, window=W + 1, backend="reference")
    want = sparse_attention(q, torch.cat([torch.randn(1, 2, 21 - W, 16), k], 2),
                            torch.cat([torch.randn(1, 2, 21 - W, 16), k], 2), prof, 0, start=20, window=W,
                            backend="reference")
    got = sparse_attention(q, k, k, prof, 0, start=20, key_start=21 - W, window=W, backend="reference")
    assert torch.allclose(got, want, **TOL)


# ---- what stays refused, with the feature named ------------------------------------------------------------------

def test_bidirectional_gemma3_is_refused():
    model = build("gemma3", use_bidirectional_attention=True)
    backend.enable_dam(model, all_allowed_profile(model=model, L=16), backend="reference")
    with pytest.raises(DamError, match="beyond the causal ones|bidirectional|not causal") as e, torch.no_grad():
        model(ids_of(10))
    assert "\n" not in str(e.value)
    backend.disable_dam(model)


@pytest.mark.parametrize("family", ["llama", "mistral-window"])
def test_packed_sequences_are_refused(family):
    model = build(family)
    backend.enable_dense(model)
    with pytest.raises(DamError, match="packed sequences"), torch.no_grad():
        model(ids_of(10), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]), use_cache=False)
    backend.disable_dam(model)


def test_chunked_and_padded_masks_are_refused_by_name():
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        chunked_overlay,
        padding_mask_function,
        sliding_window_causal_mask_function,
    )

    from dam_cli.runtime.masking import WindowMask, dam_mask, sliding_window_of

    chunked = and_masks(chunked_overlay(4, torch.zeros(1, dtype=torch.long)), causal_mask_function)
    with pytest.raises(DamError, match="chunked attention"):
        dam_mask(1, 6, 6, mask_function=chunked)
    padded = and_masks(sliding_window_causal_mask_function(W), padding_mask_function(torch.ones(1, 6, dtype=bool)))
    with pytest.raises(DamError, match="padded batches"):
        dam_mask(1, 6, 6, mask_function=padded, local_size=W)
    assert sliding_window_of(sliding_window_causal_mask_function(5)) == 5
    assert sliding_window_of(padded) is None
    assert dam_mask(1, 1, 12, q_offset=11, mask_function=sliding_window_causal_mask_function(5),
                    local_size=5) == WindowMask(5, 11)
    with pytest.raises(DamError):  # a window other than the one the builder names: not taken for it
        dam_mask(1, 6, 6, mask_function=sliding_window_causal_mask_function(5), local_size=7)
    assert dam_mask(1, 6, 6, mask_function=causal_mask_function) is None
