"""Pick the summed estimate's tiles from a sweep of `benchmarks/antidiag_speed.py` (its bench-antidiag.json): per
shape, the setting with the lowest mean time relative to the default over the swept lengths, kept only where it is
at least `--margin` faster and gives the default's estimate (largest difference under 1e-2 at every length). With
`--apply SRC` the winners replace `NARROW_TILES` (llama-1b: 2-byte inputs, head dim 64) and `WIDE_HEAD_TILES`
(gemma3-270m: head dim 256) in SRC/kernels/antisum.py, for a job list's later runs from that copy of the code.

    python3 scripts/pick_tiles.py ~/res/sweep/bench-antidiag.json --apply ~/src-next
"""

from __future__ import annotations

import argparse
import json
import re
import sys

CONSTANT = {"llama-1b": "NARROW_TILES", "gemma3-270m": "WIDE_HEAD_TILES"}
KEYS = ("bm", "bn", "warps", "stages", "grouped", "bk", "flat")


def pick(rows: list[dict], margin: float) -> dict:
    """{shape: (setting, mean ratio to the default)} for the shapes whose best setting beats the default."""
    by_shape: dict[str, list[dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    out = {}
    for shape, rs in by_shape.items():
        scores = {}
        for r in rs:
            for t in r["antisum_tiles"]:
                key = tuple(t.get(k, 0) for k in KEYS)
                ok = "ms" in t and "ms" in r["antisum"] and t.get("max_diff_vs_default", 1.0) < 1e-2
                scores.setdefault(key, []).append(t["ms"] / r["antisum"]["ms"] if ok else float("inf"))
        full = {k: sum(v) / len(v) for k, v in scores.items() if len(v) == len(rs)}
        if full:
            best = min(full, key=full.get)
            if full[best] <= 1 - margin:
                out[shape] = (dict(zip(KEYS, best)), full[best])
    return out


def literal(t: dict) -> str:
    keep = {k: v for k, v in t.items() if k not in ("bk", "flat") or v}
    return "{" + ", ".join(f'"{k}": {v!r}' for k, v in keep.items()) + "}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep")
    ap.add_argument("--margin", type=float, default=0.03)
    ap.add_argument("--apply", default="")
    args = ap.parse_args()
    with open(args.sweep) as f:
        rows = json.load(f)["rows"]
    chosen = pick(rows, args.margin)
    for shape, (t, ratio) in chosen.items():
        print(f"{shape}: {literal(t)} at {ratio:.3f}x the default's time")
    if not chosen:
        print("no setting beats the defaults by the margin")
    if args.apply:
        path = f"{args.apply}/kernels/antisum.py"
        src = open(path).read()
        for shape, (t, _) in chosen.items():
            src, n = re.subn(rf"^{CONSTANT[shape]} = \{{[^}}]*\}}", f"{CONSTANT[shape]} = {literal(t)}", src,
                             flags=re.M)
            if n != 1:
                sys.exit(f"{CONSTANT[shape]} not found in {path}")
        open(path, "w").write(src)


if __name__ == "__main__":
    main()
