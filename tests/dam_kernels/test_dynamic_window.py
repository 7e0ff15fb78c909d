"""The dynamic part in sliding-window layers: both rules stay inside the layer's own attention.

Candidates are the earlier blocks the window of the query block's first row reaches; the exact mass is each
row's softmax over the keys in its window (a float64 oracle), so blocks left of every window are never
chosen, and the mass of the blocks inside is the layer's attention, not a share of keys it cannot see. The
fused selection kernel (Triton in the interpreter on the CPU) picks the same blocks; the CPU gathered path's
decode rows read only the keys the window reaches and still equal the reference."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from dam_kernels.dynamic import (  # noqa: E402
    DynamicSelection,
    block_summary,
    select_blocks,
    select_blocks_one,
    tail_block_mass,
)
from dam_kernels.select import select_extra  # noqa: E402
from helpers import random_profile, random_qkv, require_kernel_device  # noqa: E402

DEVICE = require_kernel_device()


def _window_mass_oracle(q, k, first, block, window, scale):
    """float64 mass per key block [B, H, nK]: each row's softmax over keys j with row - window < j <= row."""
    B, H, r, D = q.shape
    G = H // k.shape[1]
    nK = -(-k.shape[2] // block)
    out = torch.zeros(B, H, nK, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(r):
                row = first + i
                lo = max(0, row - window + 1)
                p = torch.softmax((k[b, h // G, lo: row + 1].double() @ q[b, h, i].double()).cpu() * scale, 0)
                for t, pj in enumerate(p.tolist()):
                    out[b, h, (lo + t) // block] += pj / r
    return out


@pytest.mark.parametrize("first, r, window", [(200, 1, 40), (200, 1, 64), (160, 16, 50), (100, 5, 300)])
def test_exact_mass_counts_only_keys_in_the_window(first, r, window):
    q, k, _ = random_qkv(2, 4, 2, first + r, first, seed=first + window, device=DEVICE)
    q = q[:, :, -r:] * 2
    got = tail_block_mass(q, k, first, 16, scale=0.25, window=window)
    want = _window_mass_oracle(q, k, first, 16, window, 0.25)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-7)
    outside = torch.arange(got.shape[-1]) * 16 + 15 <= first - window  # blocks wholly left of the first row's window
    assert (got[..., outside.to(got.device)] == 0).all()


@pytest.mark.parametrize("start, Sq", [(0, 300), (100, 200)])
@pytest.mark.parametrize("rule", ["mean", "mass"])
def test_no_block_left_of_the_window_is_chosen(start, Sq, rule):
    window, blk = 70, 16
    q, k, _ = random_qkv(1, 4, 2, start + Sq, start, seed=5, device=DEVICE)
    dyn = DynamicSelection(4, blk, 6, tail_mass=0.95 if rule == "mass" else None)
    chosen = select_blocks(q, k, start, dyn.topk, blk, tail_topk=dyn.tail_topk, tail_mass=dyn.tail_mass,
                           window=window)[0]
    qi = torch.arange(chosen.shape[1])[:, None]
    ki = torch.arange(chosen.shape[2])[None, :]
    first_row = torch.clamp(qi * blk, min=start)
    assert not (chosen.cpu() & (ki * blk + blk - 1 <= first_row - window)).any()
    assert chosen.any()
    # Without the window the same inputs pick blocks the window cannot reach: the case bites.
    plain = select_blocks(q, k, start, dyn.topk, blk, tail_topk=dyn.tail_topk, tail_mass=dyn.tail_mass)[0]
    assert (plain.cpu() & (ki * blk + blk - 1 <= first_row - window)).any()


@pytest.mark.parametrize("start, Sq", [(299, 1), (290, 3)])
@pytest.mark.parametrize("tail_mass", [None, 0.8])
def test_decode_selection_is_the_row_of_the_prefill_selection(start, Sq, tail_mass):
    q, k, _ = random_qkv(1, 4, 2, start + Sq, start, seed=start, device=DEVICE)
    one = select_blocks_one(q, k, start, 3, 32, tail_mass=tail_mass, window=60)
    full = select_blocks(q, k, start, 3, 32, tail_mass=tail_mass, window=60)[:, :, start // 32]
    assert torch.equal(one, full)


@pytest.mark.parametrize("n_valid", [100, 161, 190])
@pytest.mark.parametrize("window", [40, 50])
def test_fused_selection_takes_the_window(n_valid, window):
    g = torch.Generator().manual_seed(n_valid + window)
    H, H_kv, slots, blk = 4, 2, 192, 32
    q = torch.randint(-3, 4, (1, H, 1, 16), generator=g).float().to(DEVICE)
    k = torch.randint(-3, 4, (1, H_kv, slots, 16), generator=g).float()
    k[:, :, n_valid:] = 0
    k = k.to(DEVICE)
    vl = torch.tensor([n_valid], device=DEVICE)
    sums = block_summary(k, blk)
    want = select_blocks_one(q, k, 0, 9, blk, valid_len=vl, sums=sums, window=window)
    dyn, *_ = select_extra(q, sums, DynamicSelection(9, blk), block_n=16, pcl=16, n_keys=slots, valid_len=vl,
                           window=window)
    assert torch.equal(dyn.bool(), want)
    assert not torch.equal(want, select_blocks_one(q, k, 0, 9, blk, valid_len=vl, sums=sums))  # the window bites


@pytest.mark.parametrize("start, Sq", [(400, 1), (395, 3), (40, 1)])
def test_gathered_decode_with_the_mass_rule_reads_only_the_window(monkeypatch, start, Sq):
    """Decode rows of a windowed layer through `sparse_attention`: the gathered path (selection by the exact
    mass from its own scores) equals the reference (selection by `select_blocks_one`), and its scores cover only
    the blocks the window reaches."""
    from dam_kernels import gathered

    from dam_cli.runtime.attention import sparse_attention

    window, dyn = 50, DynamicSelection(2, 32, 4, tail_mass=0.8)
    prof = random_profile(1, 4, 40, p_m=0.3, p_r=0.1, p_c=0.05, seed=start)
    q, k, v = random_qkv(1, 4, 2, start + Sq, start, seed=3, amp=2.0)
    want = sparse_attention(q, k, v, prof, 0, start=start, backend="reference", dynamic=dyn, window=window)
    widths = []
    real = gathered.mass_scores
    monkeypatch.setattr(gathered, "mass_scores", lambda q_, k_, s_: widths.append(k_.shape[-2]) or real(q_, k_, s_))
    got = sparse_attention(q, k, v, prof, 0, start=start, backend="gathered", dynamic=dyn, window=window)
    assert (got - want).abs().max() <= 1e-5
    assert widths == [start + Sq - max(0, start - window + 1) // 32 * 32]


@pytest.mark.parametrize("n_valid", [30, 130, 250, 256])
@pytest.mark.parametrize("window", [20, 50])
def test_device_position_reads_a_fixed_span_and_agrees(monkeypatch, n_valid, window):
    """A static cache (slots past the fill level NaN) with the row's position on the device, as under a CUDA
    graph: the mass is computed on a fixed-width span from the window on and equals the host-position one."""
    from dam_kernels import dynamic

    slots, blk = 256, 16
    q, k, _ = random_qkv(1, 4, 2, slots, slots - 1, seed=n_valid + window, device=DEVICE)
    q = q * 2
    k[:, :, n_valid:] = float("nan")
    first = torch.tensor(n_valid - 1, device=DEVICE)
    widths = []
    real = dynamic.mass_scores
    monkeypatch.setattr(dynamic, "mass_scores", lambda q_, k_, s_: widths.append(k_.shape[-2]) or real(q_, k_, s_))
    got = tail_block_mass(q, k, first, blk, window=window)
    want = tail_block_mass(q, k[:, :, :n_valid], n_valid - 1, blk, window=window)
    assert got.shape[-1] == slots // blk and not got.isnan().any()
    torch.testing.assert_close(got[..., : want.shape[-1]], want, rtol=1e-5, atol=1e-7)
    assert (got[..., want.shape[-1]:] == 0).all()
    assert widths[0] == -(-(window + blk) // blk) * blk < slots  # a span, not the whole cache
    vl = torch.tensor([n_valid], device=DEVICE)
    one = select_blocks_one(q, k, 0, 4, blk, valid_len=vl, tail_mass=0.9, window=window)
    host = select_blocks_one(q, k[:, :, :n_valid], n_valid - 1, 4, blk, tail_mass=0.9, window=window)
    assert torch.equal(one[..., : host.shape[-1]], host) and not one[..., host.shape[-1]:].any()
