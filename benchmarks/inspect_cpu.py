"""Time `dam inspect` on the shipped SmolLM2 profile, as a user runs it (a fresh process each time).

Target (issue 4): under 2 s on this machine. Prints a Markdown report and writes it to
docs/results/inspect-speed.md. The peer is `python -c "import torch"`: the floor every dam command pays,
since the profile module reads tensors with torch.

    python benchmarks/inspect_cpu.py [--runs 5] [--profile PATH] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct-paper.safetensors"
TARGET_S = 2.0


def _time(cmd: list[str], runs: int) -> tuple[float, list[float]]:
    """Median wall time of `runs` runs of `cmd` (after one warm-up run for the file cache)."""
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/results/inspect-speed.md")
    args = ap.parse_args()
    dam = shutil.which("dam") or str(Path(sys.executable).parent / "dam")
    prof = args.profile
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "p.png")
        cases = [
            ("`python -c 'import torch'` (floor)", [sys.executable, "-c", "import torch"]),
            ("`dam --help`", [dam, "--help"]),
            ("`dam inspect P`", [dam, "inspect", prof]),
            ("`dam inspect P --json`", [dam, "inspect", prof, "--json"]),
            ("`dam inspect P --check`", [dam, "inspect", prof, "--check"]),
            ("`dam inspect P P` (compare)", [dam, "inspect", prof, prof]),
            ("`dam inspect P --length 32768 --layer 5 --head 8`",
             [dam, "inspect", prof, "--length", "32768", "--layer", "5", "--head", "8"]),
            ("`dam inspect P --png FILE --force`", [dam, "inspect", prof, "--png", png, "--force"]),
        ]
        rows = []
        for name, cmd in cases:
            med, times = _time(cmd, args.runs)
            rows.append((name, med, times))
            print(f"{name}: median {med:.2f} s  ({', '.join(f'{t:.2f}' for t in times)})", file=sys.stderr)

    # In-process split of `dam inspect P`: the library call alone, after torch is imported.
    probe = ("import time, torch; from dam_cli.inspection.summary import summarize; t = time.perf_counter(); "
             f"summarize({prof!r}); print(time.perf_counter() - t)")
    lib_times = sorted(float(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                            text=True).stdout) for _ in range(args.runs))
    lib_med = statistics.median(lib_times)

    import torch

    main_med = rows[2][1]
    floor = rows[0][1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# `dam inspect` on CPU",
        "",
        f"Profile `{os.path.relpath(prof, ROOT)}` ({os.path.getsize(prof) / 1e6:.1f} MB). Each command runs in a fresh",
        f"process, as a user runs it; median of {args.runs} runs after one warm-up. Target: `dam inspect P`",
        f"under {TARGET_S:.0f} s. Produced by `python benchmarks/inspect_cpu.py`.",
        "",
        "| command | median (s) | runs (s) |",
        "|---|---|---|",
    ]
    for name, med, times in rows:
        lines.append(f"| {name} | {med:.2f} | {', '.join(f'{t:.2f}' for t in times)} |")
    verdict = "meets" if main_med < TARGET_S else "misses"
    lines += [
        "",
        f"`dam inspect P` takes {main_med:.2f} s and {verdict} the {TARGET_S:.0f} s target; "
        f"the summary, `--json`, `--check` and comparison read the profile with numpy only, so they do not "
        f"pay the {floor:.2f} s of importing torch (the head picture and `--png` modes do); the library call "
        f"`summarize(P)` (full validated load, densities at two lengths, classes) takes {lib_med:.2f} s in process.",
        "",
        f"Hardware: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(1-minute load average {load:.2f} when the run ended: other jobs share these cores); "
        f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if not args.no_write:
        sys.path.insert(0, str(ROOT))
        from dam_cli.atomic import atomic_write_bytes

        atomic_write_bytes(ROOT / "docs" / "results" / "inspect-speed.md", report.encode(), force=True)
        print(f"wrote {ROOT / 'docs' / 'results' / 'inspect-speed.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
