"""Capture equals the model's own eager attention; the pipeline equals a brute-force spec."""

from __future__ import annotations

import math

import pytest
import torch

from dam_cli.artifact.profile import load_profile
from dam_cli.profiling import calib, capture
from dam_cli.profiling.run import ProfileConfig, run_profile

TEXT = ("the cat of the house is on the tree . what is the value of the key ? the dog was by the river "
        "and the code is a secret number . ") * 6


def _eager_attentions(model, ids):
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(prev)
    return [a[0].float() for a in out.attentions]  # [layer] -> [H, n, n]


def test_captured_attention_equals_eager(tiny_llama, tiny_tokenizer):
    ids = tiny_tokenizer(TEXT)["input_ids"][:40]
    cap = capture.capture_qk(tiny_llama, [ids], "cpu")
    eager = _eager_attentions(tiny_llama, ids)
    H = tiny_llama.config.num_attention_heads
    assert tiny_llama.config.num_key_value_heads < H  # grouped-query heads are exercised
    for layer, ref in enumerate(eager):
        q, k = cap.q[layer][0], cap.k[layer][0]
        assert q.shape == (H, 40, 16) and k.shape == (2, 40, 16)
        for h in range(H):
            got = capture.attention_probs(q, k, cap.scaling[layer], h)
            torch.testing.assert_close(got, ref[h], atol=2e-6, rtol=1e-5)
    # The model's attention implementation is restored afterwards.
    assert tiny_llama.config._attn_implementation != capture.CAPTURE_IMPL


def _brute_force(attns_per_sample, lengths, L, lam, tau, mu, eps=1e-10):
    """The spec, literally: loops, explicit pattern cell lists, a true global minimum."""
    NL = len(attns_per_sample[0])
    H = attns_per_sample[0][0].shape[0]
    S = torch.zeros(NL, H, L, L, dtype=torch.float64)
    C = torch.zeros(L, L, dtype=torch.float64)
    for attns, n in zip(attns_per_sample, lengths, strict=True):
        for layer in range(NL):
            S[layer, :, :n, :n] += attns[layer].double()
        C[:n, :n] += 1
    abar = S / (C + eps)
    X = torch.clamp(abar, min=eps)
    B = (X**lam - 1) / lam if lam != 0 else torch.log(X)
    At = B - B.min()  # the true global minimum, not the constant
    M = At >= tau
    R = torch.zeros(NL, H, L, dtype=torch.bool)
    Cc = torch.zeros(NL, H, L, dtype=torch.bool)
    for layer in range(NL):
        for h in range(H):
            for r in range(L):
                cells = [(i, i - r) for i in range(r, L)]
                R[layer, h, r] = sum(bool(M[layer, h, i, j]) for i, j in cells) / len(cells) >= mu
            for c in range(L):
                cells = [(i, c) for i in range(c, L)]
                Cc[layer, h, c] = sum(bool(M[layer, h, i, j]) for i, j in cells) / len(cells) >= mu
    return M, R, Cc


@pytest.mark.parametrize("lam,tau,mu", [(0.5, 0.3, 0.8), (0.5, 0.5, 0.8), (0.0, 20.5, 0.6)])
def test_pipeline_equals_brute_force_spec(tiny_model_dir, tiny_llama, tiny_tokenizer, tmp_path, lam, tau, mu):
    L = 24
    doc = tmp_path / "calib.txt"
    doc.write_text(" ".join(TEXT.split()[:58]))  # windows of 24, 24, 10: the short one still counts
    cal = calib.load_calibration(tiny_tokenizer, [str(doc)], L, 3)
    assert cal.lengths[0] == L and cal.lengths[-1] < L
    out = tmp_path / "p.safetensors"
    run_profile(ProfileConfig(output=str(out), model=tiny_model_dir, calib=(str(doc),), samples=3, pcl=L,
                              tau=tau, lam=lam, mu=mu, device="cpu"))
    prof = load_profile(out)
    attns = [_eager_attentions(tiny_llama, w) for w in cal.windows]
    M, R, C = _brute_force(attns, cal.lengths, L, lam, tau, mu)
    assert torch.equal(prof.true_mask, M)
    assert torch.equal(prof.offsets, R)
    assert torch.equal(prof.columns, C)
    causal = M.shape[0] * M.shape[1] * L * (L + 1) // 2
    assert 0 < M.sum() <= causal and torch.equal(M, torch.tril(M))
    if tau > 0.3:  # a random model's attention is near uniform: higher tau must cut some pairs
        assert M.sum() < causal
    assert prof.meta.calibration["token_sha256"] == cal.token_sha256
    assert prof.meta.model["n_kv_heads"] == 2
    assert math.isfinite(float(prof.stats["stats.mass_kept"].mean()))
