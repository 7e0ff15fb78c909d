"""How often a fresh process's first elementwise `cos` over two threads gives other bits than its second call.

Each trial is a new Python process that builds the rotary angles of SmolLM2's first calibration window (head dim 64,
48 positions: 3,072 float32 values, two of PyTorch's 2,048-element chunks of MKL's vector math) and compares the
first `cos` of them with a second one. `--settle` runs `dam_cli.numerics.settle_cpu_numerics` first, as `dam
profile` and every model load do. Measured on the project's 2-core machine (torch 2.13.0+cpu), 80 processes each:
13 differed without settling (every one in exactly the second thread's chunk, elements 1,536 to 3,071), none with.

    python benchmarks/numerics_stress.py --trials 80 [--settle]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys, torch
if sys.argv[1] == "settle":
    from dam_cli.numerics import settle_cpu_numerics
    settle_cpu_numerics()
inv = 1.0 / (100000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
angles = (inv[None, :, None] * torch.arange(48, dtype=torch.float32)[None, None, :]).transpose(1, 2)
emb = torch.cat((angles, angles), dim=-1)
first, second = emb.cos(), emb.cos()
differ = (first != second).flatten().nonzero().flatten()
print(len(differ), int(differ.min()) if len(differ) else -1, int(differ.max()) if len(differ) else -1)
"""


def first_call_differs(settle: bool) -> tuple[int, int, int]:
    """(elements whose first `cos` differed from the second, first and last such index or -1) of one fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, "settle" if settle else "plain"], check=True,
                         capture_output=True, text=True).stdout.split()
    n, lo, hi = (int(x) for x in out)
    return n, lo, hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--settle", action="store_true", help="settle_cpu_numerics before the first cos")
    a = ap.parse_args()
    odd = [r for r in (first_call_differs(a.settle) for _ in range(a.trials)) if r[0]]
    print(f"{len(odd)} of {a.trials} processes: first cos differed from the second"
          + (f" (elements {sorted({(lo, hi) for _, lo, hi in odd})})" if odd else ""))


if __name__ == "__main__":
    main()
