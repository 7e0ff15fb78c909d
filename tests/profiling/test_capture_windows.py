"""Profiling sliding-window and soft-capped models exactly (Gemma 2, Gemma 3, Mistral with a window).

The capture records each layer's window and soft-cap as the model's attention call asks for them; the
probabilities it recomputes, the needle scores and `dam eval`'s full-attention reference then equal the
model's own eager attention weights, past the window (PCL 32, window 8). The capture file keeps the windows,
so `--from-capture` derives the same profile; an older capture without them reads as no window.
"""

from __future__ import annotations

import importlib
import json

import h5py
import pytest
import torch
from conftest import WORDS, build_tokenizer
from transformers import AutoModelForCausalLM

from dam_cli.artifact.profile import load_profile
from dam_cli.errors import DamError
from dam_cli.profiling import capture
from dam_cli.profiling.capture_file import CaptureReader, CaptureWriter, config_attention
from dam_cli.profiling.needle import needle_scores
from dam_cli.profiling.run import ProfileConfig, run_profile

W = 8  # the sliding window: a quarter of the PCL
PCL = 32
VOCAB = len(WORDS) + 3
TOL = dict(atol=2e-6, rtol=1e-5)
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, tie_word_embeddings=False, initializer_range=0.2)  # larger weights: peaked attention
GEMMA = dict(query_pre_attn_scalar=16, final_logit_softcapping=None, sliding_window=W)
FAMILIES = {  # name -> (config class, its fields beyond BASE)
    "gemma3": ("gemma3.Gemma3TextConfig", dict(GEMMA, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "mistral-window": ("mistral.MistralConfig", dict(sliding_window=W)),
    "gemma2": ("gemma2.Gemma2Config", dict(GEMMA, attn_logit_softcapping=2.0)),
    "llama": ("llama.LlamaConfig", {}),
}
WINDOWED = ["gemma3", "mistral-window", "gemma2"]


def build(family: str, seed: int = 0, **over):
    path, fields = FAMILIES[family]
    module, cls = path.split(".")
    config = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(**{**BASE, **fields, **over})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def config_windows(model) -> list[int | None]:
    """Each layer's window as the config defines it (not as the attention call passes it)."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention" if window else "full_attention"] \
        * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def ids_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def eager_run(model, ids: list[int]):
    """(attention weights per layer `[H, n, n]`, logits) of the model's own eager attention."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    return [a[0].float() for a in out.attentions], out.logits[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_probabilities_equal_eager_attention_weights(family):
    model = build(family)
    ids = ids_of(PCL)
    eager, _ = eager_run(model, ids)
    cap = capture.capture_qk(model, [ids], "cpu")
    assert model.config._attn_implementation == "eager"  # restored
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    assert cap.windows == config_windows(model)
    assert cap.softcaps == [softcap] * 4
    if family in WINDOWED:
        assert W in cap.windows
    for layer, ref in enumerate(eager):
        q, k, w = cap.q[layer][0], cap.k[layer][0], cap.windows[layer]
        for h in range(4):
            got = capture.attention_probs(q, k, cap.scaling[layer], h, window=w, softcap=cap.softcaps[layer])
            torch.testing.assert_close(got, ref[h], **TOL)
            if w is not None:  # exactly zero beyond the window, and the window bites
                assert not bool(torch.tril(got, -w).any())
                plain = capture.attention_probs(q, k, cap.scaling[layer], h, softcap=cap.softcaps[layer])
                assert float((plain - ref[h]).abs().max()) > 1e-3
            if softcap is not None:
                uncapped = capture.attention_probs(q, k, cap.scaling[layer], h, window=w)
                assert float((uncapped - ref[h]).abs().max()) > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_sums_equal_summed_eager_weights(family):
    model = build(family, seed=1)
    samples = [ids_of(PCL, seed=1), ids_of(20, seed=2)]  # a short last window counts too
    eager = [eager_run(model, ids)[0] for ids in samples]
    cap = capture.capture_qk(model, samples, "cpu")
    for layer in range(4):
        want = torch.zeros(4, PCL, PCL)
        for attns, ids in zip(eager, samples, strict=True):
            want[:, :len(ids), :len(ids)] += attns[layer]
        got = capture.layer_attention_sum(cap.q[layer], cap.k[layer], cap.scaling[layer], PCL,
                                          window=cap.windows[layer], softcap=cap.softcaps[layer])
        torch.testing.assert_close(got, want, atol=5e-6, rtol=1e-5)
        if cap.windows[layer] is None and cap.softcaps[layer] is None:  # the positional call: plain causal
            torch.testing.assert_close(
                capture.layer_attention_sum(cap.q[layer], cap.k[layer], cap.scaling[layer], PCL), want,
                atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("family", WINDOWED)
def test_the_capture_forward_is_the_models_own_attention(family):
    """The forward the capture runs (its output feeds the next layer's q and k) equals eager's logits."""
    model = build(family, seed=2)
    ids = ids_of(PCL, seed=3)
    _, want = eager_run(model, ids)
    capture.register_capture()
    with capture.attention_implementation(model, capture.CAPTURE_IMPL), torch.no_grad():
        got = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", WINDOWED)
def test_needle_scores_follow_the_window_and_softcap(family):
    model = build(family, seed=3)
    ids = ids_of(PCL, seed=4)
    eager, _ = eager_run(model, ids)
    cap = capture.capture_qk(model, [ids], "cpu")
    rows = list(range(20, PCL))
    for needle in ([3, 4], [PCL - 4]):  # far behind every scored row's window, and inside some
        for layer, ref in enumerate(eager):
            w = cap.windows[layer]
            got = needle_scores(cap.q[layer][0], cap.k[layer][0], cap.scaling[layer], needle, rows, window=w,
                                softcap=cap.softcaps[layer])
            want = ref[:, rows][:, :, needle].sum(-1).mean(-1)
            torch.testing.assert_close(got, want, **TOL)
            if w is not None and needle == [3, 4]:
                assert float(got.max()) == 0.0
                plain = needle_scores(cap.q[layer][0], cap.k[layer][0], cap.scaling[layer], needle, rows,
                                      softcap=cap.softcaps[layer])
                assert float(plain.min()) > 0.0


@pytest.mark.parametrize("family", WINDOWED)
def test_eval_full_reference_is_the_models_own_attention(family):
    from dam_cli.evaluation.probes import full_reference, record_full_qk

    model = build(family, seed=4)
    ids = ids_of(PCL, seed=5)
    _, want = eager_run(model, ids)
    x = torch.tensor([ids])
    with full_reference(model), torch.no_grad():
        got = model(input_ids=x, use_cache=False).logits[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rec = record_full_qk(model, x, torch.tensor([5, 20, PCL - 1]), "cpu")
    assert [rec["window"][layer] for layer in range(4)] == config_windows(model)
    assert [rec["softcap"][layer] for layer in range(4)] == [getattr(model.config, "attn_logit_softcapping",
                                                                     None)] * 4


# ---- the capture file and --from-capture -------------------------------------------------------------------------

def _save(family: str, folder) -> None:
    build(family, initializer_range=0.02).save_pretrained(folder)  # near-uniform attention: no pair below eps
    build_tokenizer().save_pretrained(folder)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_from_capture_round_trip_keeps_windows(family, tmp_path):
    _save(family, tmp_path / "model")
    calib = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(3)
    calib.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (80,), generator=g)))
    common = dict(samples=2, pcl=PCL, tau=1e-6, device="cpu")
    direct, h5 = tmp_path / "direct.safetensors", tmp_path / "cap.h5"
    run_profile(ProfileConfig(output=str(direct), model=str(tmp_path / "model"), calib=(str(calib),),
                              save_capture=str(h5), **common))
    again = tmp_path / "again.safetensors"
    run_profile(ProfileConfig(output=str(again), from_capture=str(h5), **common))
    model = build(family)
    reader = CaptureReader(str(h5))
    try:
        assert reader.windows == config_windows(model)
        assert reader.softcaps == [getattr(model.config, "attn_logit_softcapping", None)] * 4
    finally:
        reader.close()
    a, b = load_profile(direct), load_profile(again)
    assert a.meta.model == b.meta.model and a.meta.model.get("sliding_window") == W
    assert torch.equal(a.true_mask, b.true_mask)
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.columns, b.columns)
    # A tiny tau keeps every pair the model attends: the whole causal triangle, within each layer's window.
    i, j = torch.arange(PCL)[:, None], torch.arange(PCL)[None, :]
    for layer, w in enumerate(config_windows(model)):
        seen = (j <= i) & ((i - j < w) if w is not None else True)
        assert torch.equal(a.true_mask[layer], seen.expand(4, -1, -1)), f"layer {layer} (window {w})"


def _band_sums(L: int, heads: int, window: int | None) -> torch.Tensor:
    """Uniform attention over each row's causal keys (within `window`): one sample's probabilities `[H, L, L]`."""
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = (j <= i) & ((i - j < window) if window is not None else True)
    return (allowed / allowed.sum(-1, keepdim=True)).float().expand(heads, -1, -1).contiguous()


def _write(path, windows=None, *, identity_extra=None, sums_windows=(4, None)) -> None:
    model = dict(n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, **(identity_extra or {}))
    meta = {"model": model, "calibration": {"source": "test", "samples": 1, "tokens": 8}, "pcl": 8}
    w = CaptureWriter(str(path), meta, [8], 8, 2, windows=windows)
    for layer, sw in enumerate(sums_windows):
        w.write_layer(layer, _band_sums(8, 2, sw))
    w.close(True)


def test_capture_file_windows_default_old_files_and_refusals(tmp_path):
    # Not given, the writer stores the windows the identity states (Gemma 3's layer types).
    ident = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4, attn_logit_softcapping=30.0)
    assert config_attention(dict(n_layers=2, **ident)) == ([4, None], [30.0, 30.0])
    assert config_attention(dict(n_layers=3, sliding_window=5)) == ([5, 5, 5], [None] * 3)  # Mistral: every layer
    _write(tmp_path / "stated.h5", identity_extra=ident)
    r = CaptureReader(str(tmp_path / "stated.h5"))
    assert (r.windows, r.softcaps) == ([4, None], [30.0, 30.0])
    assert len(list(r.layers())) == 2
    r.close()
    # A capture written before windows were stored reads as no window on any layer.
    old = tmp_path / "old.h5"
    _write(old, windows=[4, None])
    with h5py.File(old, "r+") as f:
        meta = json.loads(f.attrs["dam.meta"])
        assert meta["attention"]["windows"] == [4, None]
        del meta["attention"]
        f.attrs["dam.meta"] = json.dumps(meta)
    r = CaptureReader(str(old))
    assert (r.windows, r.softcaps) == ([None, None], [None, None])
    r.close()
    # Sums with attention beyond a layer's stated window are refused, as are malformed windows.
    _write(tmp_path / "beyond.h5", windows=[4, None], sums_windows=(None, None))
    r = CaptureReader(str(tmp_path / "beyond.h5"))
    with pytest.raises(DamError, match="beyond its sliding window of 4"):
        list(r.layers())
    r.close()
    bad = tmp_path / "bad.h5"
    _write(bad, windows=[4, None])
    with h5py.File(bad, "r+") as f:
        meta = json.loads(f.attrs["dam.meta"])
        meta["attention"]["windows"] = [0, None]
        f.attrs["dam.meta"] = json.dumps(meta)
    r = CaptureReader(str(bad))  # checked at first use, after the checks of the layers
    with pytest.raises(DamError, match="window must be an integer"):
        list(r.layers())
    r.close()
