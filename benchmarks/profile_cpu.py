"""Wall time and peak memory of `dam profile` on the embedded SmolLM2-135M-Instruct (CPU).

Each case runs the real CLI in a fresh process under /usr/bin/time -v (peak resident memory),
so model loading, capture, derivation and the atomic write are all counted.

    python benchmarks/profile_cpu.py            # the three cases of issue 2
    python benchmarks/profile_cpu.py 512:8      # one case, PCL:samples
Writes a Markdown table to stdout (and to --out FILE if given).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

CASES = [(512, 8, 90, 4.0), (2048, 8, 600, 8.0), (8192, 2, None, 16.0)]  # pcl, samples, target s, target GiB


def run_case(pcl: int, samples: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "p.safetensors")
        cmd = ["/usr/bin/time", "-v", "dam", "profile", "--pcl", str(pcl), "--samples", str(samples),
               "--output", out, "--quiet"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            sys.exit(f"case {pcl}x{samples} failed:\n{r.stderr[-2000:]}")
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
        return wall, rss_kb / 2**20, os.path.getsize(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", help="PCL:samples (default: the issue's three cases)")
    ap.add_argument("--out")
    a = ap.parse_args()
    cases = [(int(c.split(":")[0]), int(c.split(":")[1]), None, None) for c in a.cases] or CASES
    import torch
    import transformers

    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
             f"torch {torch.__version__}, transformers {transformers.__version__}; "
             f"torch threads {torch.get_num_threads()}",
             "", "| PCL | samples | wall time | target | peak RSS | target | profile size |",
             "|---|---|---|---|---|---|---|"]
    for pcl, n, t_target, m_target in cases:
        wall, gib, size = run_case(pcl, n)
        tt = f"{t_target} s ({'met' if wall <= t_target else 'MISSED'})" if t_target else "-"
        mt = f"{m_target} GiB ({'met' if gib <= m_target else 'MISSED'})" if m_target else "-"
        lines.append(f"| {pcl} | {n} | {wall:.1f} s | {tt} | {gib:.2f} GiB | {mt} | {size / 2**20:.1f} MiB |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
