"""The work a dynamic prefill does, and issue 19's bound on its time to first token (used by `generate.py`).

`work_density(model, profile, ids)` runs one prefill of one sequence with DAM enabled, counting the blocks of every
layout the Triton prefill merges (`dam_kernels.merge_lists.merge_layout`, wrapped for the run: the runtime carries
no probe): their partial and full blocks, every pair of which the kernel visits, plus the retrieval heads' causal
pairs (computed densely besides), over the causal pairs of every head of every layer: the share of full
attention's work DAM's attention does. The bound: time to first token within 1.15x of the no-op floor plus that
share of dense attention's time (dense's TTFT less the floor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from dam_kernels import merge_lists

BOUND_FACTOR = 1.15  # the allowance over floor + density x dense attention time


@contextlib.contextmanager
def counting_merged_blocks() -> Iterator[list]:
    """Within the block, each layout `merge_lists.merge_layout` returns adds (its kept blocks as a device tensor, a
    block's pairs) to the yielded list: no host sync until it is read."""
    counts: list = []
    merge = merge_lists.merge_layout

    def counted(*args, **kwargs):
        lay = merge(*args, **kwargs)
        counts.append((lay.kv_num_blocks.sum() + lay.full_kv_num_blocks.sum(), lay.block_m * lay.block_n))
        return lay

    merge_lists.merge_layout = counted
    try:
        yield counts
    finally:
        merge_lists.merge_layout = merge


def work_density(model, profile, ids: torch.Tensor) -> float | None:
    """The share of causal pairs one prefill of `ids` (`[1, S]`) computes with DAM enabled on `model` (module doc);
    None unless every layer merged one layout (the dynamic part off, or another path taken)."""
    S = ids.shape[-1]
    with counting_merged_blocks() as counts, torch.no_grad():
        model(ids, use_cache=False)
    if ids.shape[0] != 1 or len(counts) != profile.n_layers:
        return None
    pairs = S * (S + 1) // 2
    work = sum(int(kept) * block_pairs for kept, block_pairs in counts) + int(profile.full.sum()) * pairs
    return work / (profile.n_layers * profile.n_heads * pairs)


def bound_line(tokens: int, dense_ttft: float, noop_ttft: float, dam_ttft: float, density: float) -> str:
    """One line: the bound `BOUND_FACTOR x (floor + density x (dense - floor))` and DAM's TTFT against it."""
    ideal = noop_ttft + density * (dense_ttft - noop_ttft)
    ratio = dam_ttft / ideal
    verdict = "within" if ratio <= BOUND_FACTOR else "outside"
    return (f"{tokens:,} tokens: work density {100 * density:.1f}%; floor + density x dense attention = "
            f"{ideal:.3f} s; DAM {dam_ttft:.3f} s = {ratio:.2f}x of it ({verdict} the {BOUND_FACTOR}x bound)")
