"""`dam eval` with another selection rule for the dynamic part: the study tool behind the CPU runs of
docs/data/selection-study/cpu-dev-*.json.

`DAM_SELECT_RULE` replaces `dam_kernels.dynamic.select_blocks` (which every backend and the density probe call)
before the CLI runs; every other argument is `dam eval`'s. Rules (the call's last query block and decode rows keep
the exact-mass tail of the run-time options; decode steps are not affected):

- `exact:N`: the exact-mass rule (`tail_block_mass` then `mass_select`, the tail's share and cap) on each of the
  call's last N query blocks, not the last one alone; `exact:1000` is every query block, an oracle that costs a
  dense q.k (the same selection as `antidiag:GAMMA:1:CAP` with the tail's share and cap).
- `rowunion`: the last query block's blocks chosen per row by the exact-mass rule and united (the cap keeps the
  blocks of largest mass in any row), instead of by the rows' average mass.
- `verticals`: the run-time rule, then the blocks the call's last query block (the question) chose by exact mass
  joined to every earlier query block of the call (where `kb < qb`): MInference's vertical lines from its last
  rows, here whole key blocks, on top of each block's own estimate.
- `antidiag:GAMMA:STRIDE:CAP`, `antisum:GAMMA:STRIDE:CAP`, `flex:GAMMA:CAP`: `dam_kernels.block_mass.antidiag_select`
  / `antisum_select` / `flex_select` for every query block but the last; `antisum-kv:GAMMA:STRIDE:CAP` the summed
  estimate once per kv head from its query heads' mean query (`per_kv_head`); a fourth number (`antisum:0.9:8:32:4`)
  estimates one row group in that many of each query block (`row_step`).

Example (the development split at 4,096 tokens, the niah family and the passkey):

    DAM_SELECT_RULE=antidiag:0.9:16:32 python benchmarks/select_rule_eval.py eval \\
        -p profiles/smollm2-135m-instruct.safetensors --methods dam-dynamic --backend gathered --json \\
        --tasks niah_single,niah_multikey,niah_multivalue,niah_multiquery,suite:passkey --per-task 3 --lengths 4096
"""

from __future__ import annotations

import os
import sys

import torch


def _rule(spec: str, original):
    import dam_kernels.block_mass as bm
    from dam_kernels.dynamic import mass_select, tail_block_mass

    name, *args = spec.split(":")

    def select(q, k, start, topk, block, tail_topk=None, score="mean", tail_mass=None, scale=None, window=None,
               mass=None):  # the rule sets the prompt's share itself
        cap_t = topk if tail_topk is None else tail_topk
        if name == "antidiag":
            return bm.antidiag_select(q, k, start, block, float(args[0]), int(args[2]), stride=int(args[1]),
                                      scale=scale, tail_mass=tail_mass, tail_cap=cap_t)
        if name in ("antisum", "antisum-kv"):
            return bm.antisum_select(q, k, start, block, float(args[0]), int(args[2]), stride=int(args[1]),
                                     scale=scale, tail_mass=tail_mass, tail_cap=cap_t,
                                     per_kv_head=name == "antisum-kv", row_step=int(args[3]) if len(args) > 3 else 1)
        if name == "flex":
            return bm.flex_select(q, k, start, block, float(args[0]), int(args[1]), scale=scale,
                                  tail_mass=tail_mass, tail_cap=cap_t)
        chosen = original(q, k, start, topk, block, tail_topk=tail_topk, score=score, tail_mass=tail_mass,
                          scale=scale, window=window, mass=mass)
        if tail_mass is None or window is not None:
            return chosen
        if name == "verticals":  # the question block's blocks joined to every earlier query block's (kb < qb)
            qt = (start + q.shape[2] - 1) // block
            nQ, nK = chosen.shape[2], chosen.shape[3]
            earlier = torch.arange(nK, device=q.device)[None, :] < torch.arange(nQ, device=q.device)[:, None]
            first = start // block  # query blocks of this call only
            rows = (torch.arange(nQ, device=q.device) >= first)[:, None]
            chosen |= chosen[:, :, qt: qt + 1] & earlier & rows
            return chosen
        sc = q.shape[-1] ** -0.5 if scale is None else scale
        Sq = q.shape[2]
        qt = (start + Sq - 1) // block
        n_blocks = int(args[0]) if name == "exact" else 1
        for qb in range(qt, max(qt - n_blocks, start // block - 1), -1):
            r0, r1 = max(0, qb * block - start), min(Sq, (qb + 1) * block - start)
            if name == "rowunion":  # each row's own masses [B, H, r, nK], each row's selection, united
                m = torch.stack([tail_block_mass(q[:, :, r: r + 1], k, start + r, block, sc)
                                 for r in range(r0, r1)], dim=2)
                sel = mass_select(m, qb, tail_mass, cap_t).any(dim=2)
                top = m.amax(dim=2).masked_fill(~sel, -1.0).topk(min(cap_t, m.shape[-1]), dim=-1).indices
                chosen[:, :, qb] = torch.zeros_like(sel).scatter_(-1, top, True) & sel
            else:  # the rows' average mass, as the tail rule has it
                chosen[:, :, qb] = mass_select(tail_block_mass(q[:, :, r0:r1], k, start + r0, block, sc), qb,
                                               tail_mass, cap_t)
        return chosen

    if name not in ("exact", "rowunion", "verticals", "antidiag", "antisum", "antisum-kv", "flex"):
        raise SystemExit(f"DAM_SELECT_RULE {spec!r}: use exact:N, rowunion, verticals, antidiag:G:STRIDE:CAP, "
                         "antisum:G:STRIDE:CAP, antisum-kv:G:STRIDE:CAP or flex:G:CAP")
    return select


def main() -> None:
    import dam_kernels.dynamic as dynamic

    spec = os.environ.get("DAM_SELECT_RULE")
    if not spec:
        raise SystemExit("set DAM_SELECT_RULE (see this file's doc)")
    dynamic.select_blocks = _rule(spec, dynamic.select_blocks)
    from dam_cli.cli.app import main as dam_main

    sys.argv[0] = "dam"
    dam_main()


if __name__ == "__main__":
    main()
