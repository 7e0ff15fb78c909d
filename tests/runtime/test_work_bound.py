"""`benchmarks/work_bound.py`: the blocks of every layout the Triton prefill merges, counted without a probe in the
runtime, and the line that sets a first token against issue 19's bound."""

from __future__ import annotations

import importlib.util
import os

from dam_kernels import merge_lists
from dam_kernels.selection import DynamicSelection
from helpers import random_profile, random_qkv

from dam_cli.runtime import attention

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = importlib.util.spec_from_file_location("work_bound", os.path.join(HERE, "..", "..", "benchmarks",
                                                                        "work_bound.py"))
work_bound = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(work_bound)


def test_every_block_a_covering_selection_keeps_is_counted():
    prof = random_profile(heads=4)
    B, H, S, blk = 2, 4, 70, 16
    q, k, v = random_qkv(B, H, 2, S, 0, seed=1)
    merge = merge_lists.merge_layout
    with work_bound.counting_merged_blocks() as counts:
        attention.sparse_attention(q, k, v, prof, 0, backend="triton", dynamic=DynamicSelection(99, blk))
    assert merge_lists.merge_layout is merge  # put back
    assert len(counts) == B  # one layout per batch row
    nQ = -(-S // blk)
    for kept, block_pairs in counts:
        # every earlier block selected and the own (diagonal) block partial: every causal block is kept
        assert int(kept) == H * nQ * (nQ + 1) // 2 and block_pairs == blk * blk


def test_the_bound_line_states_the_ratio_and_the_verdict():
    line = work_bound.bound_line(32768, dense_ttft=0.306, noop_ttft=0.157, dam_ttft=0.259, density=0.2)
    assert "work density 20.0%" in line and "= 0.187 s" in line and "1.39x of it (outside the 1.15x bound)" in line
    assert "(within the 1.15x bound)" in work_bound.bound_line(1024, 1.0, 0.5, 0.6, 0.2)  # 0.6 s against 0.6 s


def test_work_density_counts_every_layer_and_the_retrieval_heads():
    """A stand-in model whose forward runs one dynamic prefill a layer (as a DAM-enabled model does)."""
    import torch

    prof = random_profile(n_layers=2, heads=4, full_heads=torch.tensor([[True, False, False, False], [False] * 4]))
    S, blk = 70, 16
    q, k, v = random_qkv(1, 4, 2, S, 0, seed=2)

    def model(ids, use_cache=True):
        for layer in range(prof.n_layers):
            attention.sparse_attention(q, k, v, prof, layer, backend="triton", dynamic=DynamicSelection(99, blk))

    nQ, pairs = -(-S // blk), S * (S + 1) // 2
    kept = prof.n_layers * 4 * nQ * (nQ + 1) // 2 * blk * blk  # every causal block, as above
    want = (kept + 1 * pairs) / (prof.n_layers * 4 * pairs)  # and one retrieval head's dense rows
    assert work_bound.work_density(model, prof, torch.zeros(1, S, dtype=torch.long)) == want
    assert work_bound.work_density(lambda ids, use_cache: None, prof, torch.zeros(1, S)) is None  # no layout merged
