"""Profiling time with N processes against one: `dam profile --nproc N` beside `--nproc 1`, same inputs.

Each run is a fresh `dam profile` process (model load included, as a user pays it), one and N processes
alternating; each cell is the median of `--runs`. The files are compared byte for byte: a speed-up that
changed the profile would be no speed-up. On CPUs each of N processes gets cores / N threads; with
`--device cuda` rank r runs on cuda:r.

    python benchmarks/profile_ranks.py --nproc 2                          # embedded SmolLM2, recommended recipe
    python benchmarks/profile_ranks.py --nproc 2 --recipe paper --runs 3
    python benchmarks/profile_ranks.py --nproc 2 --device cuda --model ./llama-1b --samples 64   # 2 GPUs
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "profile-ranks.md"


def dam_command() -> list[str]:
    script = Path(sys.executable).parent / "dam"
    return [str(script)] if script.exists() else ["dam"]


def run(args: list[str], nproc: int, out: str, threads: int | None) -> tuple[float, str]:
    cmd = [*dam_command(), "profile", *args, "--nproc", str(nproc), "-o", out, "-f", "-q"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return seconds, hashlib.sha256(Path(out).read_bytes()).hexdigest()


def _measured(doc: str, start: str, end: str) -> str:
    """The tables already between the page's markers, each followed by a blank line."""
    inner = doc.split(start, 1)[1].split(end, 1)[0].strip()
    return inner + "\n\n" if inner else ""


def hardware(device: str) -> str:
    import torch
    import transformers

    where = f"{platform.machine()}, {os.cpu_count()} cores"
    if device.startswith("cuda") and torch.cuda.is_available():
        where += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return (f"{where}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--model", default=None, help="as dam profile --model (default: embedded SmolLM2)")
    ap.add_argument("--recipe", default="recommended")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--pcl", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--threads-per-process", type=int, default=None,
                    help="CPU threads of every process (OMP_NUM_THREADS); default: the cores shared out")
    ap.add_argument("--append", action="store_true", help="keep the tables already on the page, add this one")
    ap.add_argument("--no-write", action="store_true", help=f"print only, do not write {OUT.relative_to(ROOT)}")
    a = ap.parse_args()
    args = ["--recipe", a.recipe, "--samples", str(a.samples), "--pcl", str(a.pcl), "--device", a.device]
    if a.model:
        args += ["--model", a.model]
    load_before = os.getloadavg()[0]
    times: dict[int, list[float]] = {1: [], a.nproc: []}
    digests: dict[int, set[str]] = {1: set(), a.nproc: set()}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.runs):
            for n in ((1, a.nproc) if i % 2 == 0 else (a.nproc, 1)):
                s, d = run(args, n, os.path.join(tmp, f"p{n}.safetensors"), a.threads_per_process)
                times[n].append(s)
                digests[n].add(d)
                print(f"--nproc {n}: {s:.1f} s, sha256 {d[:16]}", file=sys.stderr, flush=True)
    one, many = statistics.median(times[1]), statistics.median(times[a.nproc])
    same = len(digests[1] | digests[a.nproc]) == 1
    threads = (f"{a.threads_per_process} thread(s) per process" if a.threads_per_process
               else "threads: the cores shared out among the processes")
    table = (f"Machine: {hardware(a.device)}; {threads}; load average {load_before:.1f} before, "
             f"{os.getloadavg()[0]:.1f} after; "
             f"median of {a.runs} run(s), fresh processes, model load included.\n\n"
             "| model | recipe | samples x PCL | device | 1 process | "
             f"{a.nproc} processes | speed-up | same bytes |\n|---|---|---|---|---|---|---|---|\n"
             f"| {a.model or 'SmolLM2-135M (embedded)'} | {a.recipe} | {a.samples} x {a.pcl} | {a.device} | "
             f"{one:.1f} s | {many:.1f} s | {one / many:.2f}x | {'yes' if same else 'NO'} |\n")
    print(table)
    if not a.no_write:
        start, end = "<!-- profile_ranks.py: measured -->", "<!-- /profile_ranks.py -->"
        doc = OUT.read_text() if OUT.exists() else f"# Profiling with several processes\n\n{start}\n{end}\n"
        head, rest = doc.split(start, 1)
        OUT.write_text(head + start + "\n" + (a.append and _measured(doc, start, end) or "") + table + end
                       + rest.split(end, 1)[1])
        print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)
    if not same:
        sys.exit("the profiles differ between 1 and N processes")


if __name__ == "__main__":
    main()
