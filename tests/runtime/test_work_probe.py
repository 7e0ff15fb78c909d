"""`attention.KEPT_BLOCKS`, the probe `benchmarks/work_bound.py` reads: per dynamic prefill call and batch row, the
merged layout's kept blocks, a block's pairs and the call's causal pairs; off (None) unless a list is set."""

from __future__ import annotations

from dam_kernels.selection import DynamicSelection
from helpers import random_profile, random_qkv

from dam_cli.runtime import attention


def test_the_probe_counts_every_block_a_covering_selection_keeps(monkeypatch):
    prof = random_profile(heads=4)
    B, H, S, blk = 2, 4, 70, 16
    q, k, v = random_qkv(B, H, 2, S, 0, seed=1)
    monkeypatch.setattr(attention, "KEPT_BLOCKS", [])
    attention.sparse_attention(q, k, v, prof, 0, backend="triton", dynamic=DynamicSelection(99, blk))
    rows = attention.KEPT_BLOCKS
    assert len(rows) == B  # one entry per batch row
    nQ = -(-S // blk)
    for kept, block_pairs, causal, full in rows:
        # every earlier block selected, and the own (diagonal) block partial: every causal block is kept
        assert int(kept) == H * nQ * (nQ + 1) // 2 and block_pairs == blk * blk
        assert causal == H * S * (S + 1) // 2 and full == 0
    # the work density counts whole blocks: the diagonal blocks' upper halves and the last block's padded rows too
    work = sum(int(kept) * bp for kept, bp, _, _ in rows) / sum(c for _, _, c, _ in rows)
    assert work == (nQ * (nQ + 1) // 2 * blk * blk) / (S * (S + 1) // 2) > 1


def test_the_probe_is_off_by_default():
    assert attention.KEPT_BLOCKS is None


def test_the_bound_line_states_the_ratio_and_the_verdict():
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    from work_bound import bound_line

    line = bound_line(32768, dense_ttft=0.306, noop_ttft=0.157, dam_ttft=0.259, density=0.2)
    assert "work density 20.0%" in line and "= 0.187 s" in line and "1.39x of it (outside the 1.15x bound)" in line
    assert "(within the 1.15x bound)" in bound_line(1024, 1.0, 0.5, 0.6, 0.2)  # 0.6 s against 0.6 s
