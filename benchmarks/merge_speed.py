"""The selection merged into a layer's layout: `dynamic.merge_layout` (index lists, torch operations) against the
merge on dense `[H, nQ, nK]` block maps it replaced (kept in `tests/dam_kernels/test_merge_layout.py` as its
oracle) and, on the GPU, against `merge_lists.merge_layout` (one Triton launch, no host sync), the same layouts
and the same selection in one run.

Each layer's layout is the shipped SmolLM2 profile's at `S` tokens in 64 x 64 blocks, as the GPU prefill builds it;
the selection is, per head and query block, `min(cap, qb)` earlier key blocks drawn at random (seeded), the most the
default's mass rule may keep. Every timing is the median of `--repeats` runs after one warm-up, synchronised; the
merges' counts and lists are checked equal first.

    python benchmarks/merge_speed.py                             # 32K and 131K on the GPU
    python benchmarks/merge_speed.py --lengths 4096 --device cpu --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "dam_kernels")]

from checkout import use_checkout  # noqa: E402  (beside this script)

use_checkout()

from dam_kernels import merge_lists  # noqa: E402
from dam_kernels.dynamic import merge_layout  # noqa: E402
from dam_kernels.layout import layout_for  # noqa: E402
from test_merge_layout import _merge_on_maps  # noqa: E402

from dam_cli.artifact.profile import load_profile  # noqa: E402

PROFILE = os.path.join(ROOT, "profiles", "smollm2-135m-instruct.safetensors")


def selection(H: int, nQ: int, cap: int, seed: int, device) -> torch.Tensor:
    """bool `[H, nQ, nQ]`: `min(cap, qb)` random earlier blocks per (head, query block)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = torch.rand(H, nQ, nQ, generator=g, device=device)
    earlier = torch.arange(nQ, device=device)[None, :] < torch.arange(nQ, device=device)[:, None]
    r = r.masked_fill(~earlier, -1.0)
    top = r.topk(min(cap, nQ), dim=-1)
    return torch.zeros(H, nQ, nQ, dtype=torch.bool, device=device).scatter(-1, top.indices, top.values >= 0)


def same_lists(a, b) -> bool:
    """Whether two layouts hold the same counts and, within them, the same lists (their padding widths may differ;
    each is at least its longest row)."""
    for na, xa, nb, xb in ((a.kv_num_blocks, a.kv_indices, b.kv_num_blocks, b.kv_indices),
                           (a.full_kv_num_blocks, a.full_kv_indices, b.full_kv_num_blocks, b.full_kv_indices)):
        if not torch.equal(na, nb):
            return False
        w = int(na.max()) if na.numel() else 0
        used = torch.arange(w, device=na.device) < na[..., None]
        if not torch.equal(torch.where(used, xa[..., :w], 0), torch.where(used, xb[..., :w], 0)):
            return False
    return True


def timed(fn, repeats: int, device) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--layers", type=int, default=4, help="layers of the profile timed (the first N)")
    ap.add_argument("--cap", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write OUT.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    prof = load_profile(PROFILE)
    rows = []
    for S in [int(x) for x in args.lengths.split(",")]:
        nQ = -(-S // 64)
        for layer in range(min(args.layers, prof.n_layers)):
            lay = layout_for(prof, layer, S, 64, 64, device)
            chosen = selection(prof.n_heads, nQ, args.cap, layer, device)
            got = merge_layout(lay, chosen, 64)
            p_num, p_idx, f_num, f_idx, share = _merge_on_maps(lay, chosen, 64)
            same = (torch.equal(got.kv_num_blocks.long(), p_num) and torch.equal(got.full_kv_num_blocks.long(), f_num)
                    and got.partial_share == share)
            lists_ms = timed(lambda: merge_layout(lay, chosen, 64), args.repeats, device)
            maps_ms = timed(lambda: _merge_on_maps(lay, chosen, 64), args.repeats, device)
            row = {"tokens": S, "layer": layer, "heads": prof.n_heads, "lists_ms": round(lists_ms, 3),
                   "maps_ms": round(maps_ms, 3), "maps_over_lists": round(maps_ms / lists_ms, 2), "same_counts": same}
            line = (f"{S:>7} tokens, layer {layer}: lists {lists_ms:8.2f} ms, maps {maps_ms:8.2f} ms "
                    f"({maps_ms / lists_ms:.2f}x), same counts: {same}")
            if device.type == "cuda":
                overflow = torch.zeros(1, dtype=torch.int32, device=device)
                one = merge_lists.merge_layout(lay, chosen, 64, args.cap, overflow)
                row["one_launch_same"] = bool(int(overflow) == 0 and same_lists(one, got))
                one_ms = timed(lambda: merge_lists.merge_layout(lay, chosen, 64, args.cap), args.repeats, device)
                row.update(one_launch_ms=round(one_ms, 3), lists_over_one_launch=round(lists_ms / one_ms, 2))
                line += (f"; one launch {one_ms:8.3f} ms ({lists_ms / one_ms:.1f}x the lists' speed), same lists: "
                         f"{row['one_launch_same']}")
                del one
            rows.append(row)
            print(line, flush=True)
            del lay, chosen, got
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    print(json.dumps(env))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
