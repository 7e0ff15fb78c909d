"""`dam_cli.runtime.dense.dense_attention` of sliding-window layers in query chunks (`WINDOW_CHUNK` rows over
the keys their window reaches) against one masked softmax over every key: equal up to float32 rounding, for
prefill at any start, a cut key range, soft-capping and grouped heads, and a decode step that reads the
window's keys alone."""

from __future__ import annotations

import pytest
import torch

from dam_cli.runtime import dense


def _masked_softmax(q, k, v, start: int, window: int, softcap, key_start: int, scale: float) -> torch.Tensor:
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    s = q.double() @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    i = start + torch.arange(q.shape[2])[:, None]
    j = key_start + torch.arange(k.shape[2])[None, :]
    s = s.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    return (torch.softmax(s, -1) @ v).float()


@pytest.mark.parametrize("Sq,start,key_start,window,softcap", [
    (300, 0, 0, 40, None),     # a prefill from position 0
    (300, 57, 0, 40, None),    # a later chunk of a prompt
    (250, 100, 70, 31, None),  # a cache that dropped keys the window no longer reaches
    (300, 0, 0, 64, 7.5),      # soft-capped scores
    (300, 5, 0, 500, None),    # a window wider than the call: every chunk reads from key 0
    (1, 700, 0, 40, None),     # a decode step: only the window's keys are read
    (3, 700, 100, 40, 7.5),    # a few rows over a cut cache, soft-capped
])
def test_chunks_equal_one_masked_softmax(monkeypatch, Sq, start, key_start, window, softcap):
    monkeypatch.setattr(dense, "WINDOW_CHUNK", 64)
    calls = []
    real = dense._windowed_in_chunks
    monkeypatch.setattr(dense, "_windowed_in_chunks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(Sq + start + window)
    q = torch.randn(1, 4, Sq, 16, generator=g)
    k = torch.randn(1, 2, start + Sq - key_start, 16, generator=g)
    v = torch.randn(1, 2, start + Sq - key_start, 16, generator=g)
    out = dense.dense_attention(q, k, v, start=start, scale=0.3, window=window, softcap=softcap,
                                    key_start=key_start)
    ref = _masked_softmax(q, k, v, start, window, softcap, key_start, 0.3)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), (out - ref).abs().max()
    reached = start + Sq - max(key_start, start - window + 1)  # keys some row's window reaches
    assert calls == ([1] if Sq > 64 and reached > 64 + window else [])  # the chunked path ran where it applies


def test_chunks_read_only_the_keys_their_window_reaches(monkeypatch):
    """The work is S x (chunk + window): no chunk's key range is longer than chunk + window - 1; a decode step
    reads the window's keys only."""
    monkeypatch.setattr(dense, "WINDOW_CHUNK", 64)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[2]) or real(q, k, v, **kw))
    q, k, v = torch.randn(1, 2, 1000, 16), torch.randn(1, 2, 1000, 16), torch.randn(1, 2, 1000, 16)
    dense.dense_attention(q, k, v, start=0, window=32)
    assert len(seen) == -(-1000 // 64) and max(seen) <= 64 + 32 - 1
    seen.clear()
    dense.dense_attention(q[:, :, -1:], k, v, start=999, window=32)
    assert seen == [32]
