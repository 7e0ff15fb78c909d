"""The work a dynamic prefill does, and issue 19's bound on its time to first token (used by `generate.py`).

`work_density(model, ids)` runs one prefill with `dam_cli.runtime.attention.KEPT_BLOCKS` collecting, per layer
call, the merged layout's kept blocks (partial and full: the kernel visits every pair of them) and the retrieval
heads' causal pairs (computed densely besides), over the causal pairs of every head: the share of full attention's
work DAM's attention kernels do. The bound: time to first token within 1.15x of the no-op floor plus that share of
dense attention's time (dense's TTFT less the floor).
"""

from __future__ import annotations

import torch

from dam_cli.runtime import attention as dam_attention

BOUND_FACTOR = 1.15  # the allowance over floor + density x dense attention time


def work_density(model, ids: torch.Tensor) -> float | None:
    """The share of causal pairs one prefill of `ids` computes with DAM enabled on `model` (module doc); None when
    no call took the dynamic prefill path."""
    dam_attention.KEPT_BLOCKS = []
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
        rows = dam_attention.KEPT_BLOCKS
        if not rows:
            return None
        work = sum(int(kept) * block_pairs + full for kept, block_pairs, _, full in rows)
        return work / sum(causal for _, _, causal, _ in rows)
    finally:
        dam_attention.KEPT_BLOCKS = None


def bound_line(tokens: int, dense_ttft: float, noop_ttft: float, dam_ttft: float, density: float) -> str:
    """One line: the bound `BOUND_FACTOR x (floor + density x (dense - floor))` and DAM's TTFT against it."""
    ideal = noop_ttft + density * (dense_ttft - noop_ttft)
    ratio = dam_ttft / ideal
    verdict = "within" if ratio <= BOUND_FACTOR else "outside"
    return (f"{tokens:,} tokens: work density {100 * density:.1f}%; floor + density x dense attention = "
            f"{ideal:.3f} s; DAM {dam_ttft:.3f} s = {ratio:.2f}x of it ({verdict} the {BOUND_FACTOR}x bound)")
