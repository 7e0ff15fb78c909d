"""`dam inspect` on models with sliding-window layers and logit soft-capping (Gemma 3, Gemma 2, Mistral).

The identities are those `dam profile` records (`model_identity` of tiny random configs). Stage-2
densities of a windowed layer are checked exactly against the math module's full Stage-2 mask AND
the window band, counted over all causal pairs; plain models show no window column and no attention row.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import identity_profile, run_cli

from dam_cli import masks
from dam_cli.artifact.profile import Profile, ProfileMeta, load_profile
from dam_cli.inspection import summary as lib
from dam_cli.inspection.common import attention_text, layer_softcap, layer_windows
from dam_cli.inspection.compare import compare
from dam_cli.runtime.models import model_identity

W = 4  # the window of the tiny models: below PCL 8, so it cuts inside and beyond L
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=256)


def _identity(family: str, **over) -> dict:
    import importlib

    module, cls = {"gemma3": ("gemma3", "Gemma3TextConfig"), "gemma2": ("gemma2", "Gemma2Config"),
                   "mistral": ("mistral", "MistralConfig"), "llama": ("llama", "LlamaConfig")}[family]
    config = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(**{**SMALL, **over})
    return model_identity(config, f"tiny-{family}")


def gemma3_identity() -> dict:
    return _identity("gemma3", sliding_window=W, layer_types=["sliding_attention", "sliding_attention",
                                                              "full_attention"], query_pre_attn_scalar=16)


def _oracle(p: Profile, windows: list[int | None], S: int) -> np.ndarray:
    """Stage-2 density of every head at S: the full Stage-2 mask AND the window, over S (S + 1) / 2."""
    out = np.empty((p.n_layers, p.n_heads))
    i = torch.arange(S)
    for layer, w in enumerate(windows):
        full = p.full_heads[layer] if p.full_heads is not None else None
        m = masks.stage2_mask(p.true_mask[layer], p.offsets[layer], p.columns[layer], S, full)
        if w is not None:
            m = m & ((i[:, None] - i[None, :]) < w)
        out[layer] = m.sum((-1, -2)).numpy() / (S * (S + 1) / 2)
    return out


def _save(tmp_path, identity: dict, L: int = 8, seed: int = 0, name: str = "p", full_heads=None) -> str:
    path = tmp_path / f"{name}.safetensors"
    identity_profile(identity, L, seed=seed, full_heads=full_heads).save(path)
    return str(path)


# ---- reading the identity ------------------------------------------------------------------------------------------

def test_windows_and_softcap_as_the_identities_state_them():
    g3 = gemma3_identity()
    assert layer_windows(g3) == [W, W, None] and layer_softcap(g3) is None
    assert attention_text(g3) == f"sliding window {W} on 2 of 3 layers (global: 2)"
    g2 = _identity("gemma2", sliding_window=W, attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
    assert layer_windows(g2) == [W, None, W] and layer_softcap(g2) == 50.0  # alternating, sliding first
    assert attention_text(g2) == f"sliding window {W} on 2 of 3 layers (global: 1); soft-cap 50.0"
    mistral = _identity("mistral", sliding_window=W)
    assert layer_windows(mistral) == [W] * 3 and attention_text(mistral) == f"sliding window {W} on 3 of 3 layers"
    for plain in (_identity("llama"), _identity("mistral", sliding_window=None)):
        assert layer_windows(plain) == [None] * 3 and layer_softcap(plain) is None and attention_text(plain) is None
    # The 270M layout: a global layer after every five windowed ones.
    g270 = dict(n_layers=18, sliding_window=512, attn_logit_softcapping=50.0,
                layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)])
    assert attention_text(g270) == "sliding window 512 on 15 of 18 layers (global: 5, 11, 17); soft-cap 50.0"
    # Malformed values in a profile file read as no window / no soft-cap, never as a crash.
    assert layer_windows(dict(n_layers=2, sliding_window="4")) == [None, None]
    assert layer_windows(dict(n_layers=2, sliding_window=True)) == [None, None]
    assert layer_softcap(dict(attn_logit_softcapping=float("nan"))) is None


# ---- Stage-2 densities within the window ---------------------------------------------------------------------------

@pytest.mark.parametrize("L,w", [(8, 1), (8, 3), (8, 8), (8, 11), (13, 5), (13, 20), (16, 40)])
def test_windowed_densities_equal_the_stage2_mask_and_the_window(tmp_path, L, w):
    ident = {**gemma3_identity(), "sliding_window": w}
    g = torch.Generator().manual_seed(L * 100 + w)
    full = torch.rand(3, 2, generator=g) < 0.3
    path = _save(tmp_path, ident, L=L, seed=w, full_heads=full)
    p = load_profile(path)
    for S in (1, w, L - 1, L, L + 1, 2 * L - 1, 2 * L, L + w, 3 * L + 5):
        s = lib.summarize(path, S)
        want = _oracle(p, [w, w, None], S)
        got = np.array([[s.head(layer, h).density_length for h in range(2)] for layer in range(3)])
        assert np.array_equal(got, want), (L, w, S, got, want)
        at_pcl = np.array([[s.head(layer, h).density_pcl for h in range(2)] for layer in range(3)])
        assert np.array_equal(at_pcl, _oracle(p, [w, w, None], L)), (L, w, S)


def test_a_window_past_the_length_changes_nothing(tmp_path):
    plain = lib.summarize(_save(tmp_path, _identity("llama"), name="plain", seed=3), 24)
    wide = lib.summarize(_save(tmp_path, {**gemma3_identity(), "sliding_window": 24}, name="wide", seed=3), 24)
    assert [h.density_length for h in wide.heads] == [h.density_length for h in plain.heads]
    assert [h.density_pcl for h in wide.heads] == [h.density_pcl for h in plain.heads]
    narrow = lib.summarize(_save(tmp_path, gemma3_identity(), name="narrow", seed=3), 24)
    assert all(n.density_length < x.density_length for n, x in zip(narrow.heads[:4], plain.heads[:4]))
    assert [h.density_length for h in narrow.heads[4:]] == [h.density_length for h in plain.heads[4:]]  # global


def test_full_heads_of_a_windowed_layer_have_the_window_density(tmp_path):
    full = torch.ones(3, 2, dtype=torch.bool)
    s = lib.summarize(_save(tmp_path, gemma3_identity(), full_heads=full), 2**40)
    S = 2**40
    window = (W * (W + 1) // 2 + (S - W) * W) / (S * (S + 1) // 2)  # sum_i min(i + 1, W) of the causal pairs
    assert [h.density_length for h in s.heads] == [window] * 4 + [1.0] * 2
    assert [h.density_pcl for h in s.heads] == [(W * (W + 1) // 2 + (8 - W) * W) / 36] * 4 + [1.0] * 2


# ---- what is shown -------------------------------------------------------------------------------------------------

def test_text_shows_the_attention_row_the_window_column_and_the_legend(tmp_path):
    ident = {**gemma3_identity(), "attn_logit_softcapping": 50.0}
    path = _save(tmp_path, ident)
    code, out, err = run_cli("inspect", path, "--length", "16", columns=150)
    assert code == 0 and err == ""
    assert f"attention    sliding window {W} on 2 of 3 layers (global: 2), soft-cap 50.0" in out
    s = lib.summarize(path, 16)
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 6 and cells[0].isdigit() and cells[2].endswith("%"):
            rows[int(cells[0])] = cells[1:4]
    from dam_cli.inspection.render import pct

    assert rows == {x.layer: [str(W) if x.window else "global", pct(x.density_pcl), pct(x.density_length)]
                    for x in s.layers}
    assert "window: the layer's sliding window W (global: none)" in out
    assert "within the window (pairs i - j < W, over all causal pairs)" in " ".join(out.split())
    assert "windowed layers count only pairs within their window" in " ".join(out.split())
    code, out, _ = run_cli("inspect", path, "--length", "16", "--layer", "0", "--head", "1", columns=150)
    words = " ".join(out.split())
    assert code == 0 and f"Stage-2 density at S within the window {W}" in words
    assert f"Stage-2 density (within the layer's window {W})" in words and "Stage-2 mask AND window, 16 x 16" in words
    code, out, _ = run_cli("inspect", path, "--length", "16", "--layer", "2", "--head", "1", columns=150)
    assert code == 0 and "Stage-2 mask, 16 x 16" in out and "(within the layer's window" not in out


@pytest.mark.parametrize("full", [False, True])
def test_the_stage2_picture_of_a_windowed_head_is_the_mask_and_the_window(tmp_path, full):
    from dam_cli.inspection.pictures import head_picture, pool

    L, S = 8, 40
    p = load_profile(_save(tmp_path, gemma3_identity(), L=L, seed=5, full_heads=torch.full((3, 2), full)))
    i = torch.arange(S)
    for layer, w in enumerate([W, W, None]):
        for grid in (S, 10):  # exact, then pooled cells (at most 8 rows a cell: every row read)
            pic = head_picture(p, layer, 1, S, grid)
            m = masks.stage2_mask(p.true_mask[layer, 1], p.offsets[layer, 1], p.columns[layer, 1], S,
                                  p.full_heads[layer, 1] if full else None)
            if w is not None:
                m = m & ((i[:, None] - i[None, :]) < w)
            assert pic.stage2_exact and np.array_equal(pic.stage2, pool(m.numpy(), grid)), (layer, grid)


def test_json_carries_window_and_softcap_per_layer(tmp_path):
    path = _save(tmp_path, {**gemma3_identity(), "attn_logit_softcapping": 50.0})
    code, out, _ = run_cli("inspect", path, "--json", columns=150)
    d = json.loads(out)
    assert code == 0 and [(x["window"], x["softcap"]) for x in d["layers"]] == [(W, 50.0), (W, 50.0), (None, 50.0)]
    assert d["header"]["model"]["sliding_window"] == W and d["header"]["model"]["layer_types"][2] == "full_attention"


def test_plain_models_show_no_window(tmp_path):
    path = _save(tmp_path, _identity("llama"))
    code, out, _ = run_cli("inspect", path, "--length", "16", columns=150)
    assert code == 0
    assert "attention " not in out and "window" not in out and "soft-cap" not in out
    code, out, _ = run_cli("inspect", path, "--json", columns=150)
    assert [(x["window"], x["softcap"]) for x in json.loads(out)["layers"]] == [(None, None)] * 3


def _consistent(tmp_path, identity: dict, name: str, seed: int, L: int = 8) -> str:
    """A profile `--check` accepts: R and C matched from its true masks by the spec's rule (mu 0.8)."""
    g = torch.Generator().manual_seed(seed)
    tm = (torch.rand(identity["n_layers"], identity["n_heads"], L, L, generator=g) < 0.4).tril()
    R, C = masks.match_patterns(tm, 0.8)
    meta = ProfileMeta(model=dict(identity), recipe={"pcl": L, "tau": 0.3, "lam": 0.5, "mu": 0.8, "eps": 1e-10},
                       calibration={"source": "test", "samples": 0, "tokens": 0, "token_sha256": ""})
    path = tmp_path / f"{name}.safetensors"
    Profile.from_masks(tm, R, C, meta=meta).save(path)
    return str(path)


def test_compare_and_check_of_windowed_profiles(tmp_path):
    a, b = _consistent(tmp_path, gemma3_identity(), "a", 0), _consistent(tmp_path, gemma3_identity(), "b", 1)
    c = compare(a, b, 16)
    sa, sb = lib.summarize(a, 16), lib.summarize(b, 16)
    assert [d.d_density_length for d in c.heads] == [y.density_length - x.density_length
                                                    for x, y in zip(sa.heads, sb.heads)]
    for args in ((a, b), (a, "--check"), (a, b, "--json")):
        code, _, err = run_cli("inspect", *args, columns=150)
        assert code == 0, err


def test_summary_of_a_windowed_profile_never_imports_torch(tmp_path):
    import subprocess
    import sys

    path = _save(tmp_path, gemma3_identity())
    code = ("import sys; from dam_cli.inspection.summary import summarize; "
            f"s = summarize({path!r}, 64); assert s.layers[0].window == {W}; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

