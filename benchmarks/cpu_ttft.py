"""Time to first token and decode speed on the CPU through `dam generate`: full attention against DAM.

The embedded SmolLM2-135M-Instruct, float32, prompts of about 2K, 4K and 8K tokens (varied sentences with
a passkey at 40% depth and the question at the end), `dam generate --prompt-file P -n N --json` in a fresh
process per run, full (`--attention full`) and DAM with the recommended profile (its `dam.runtime`
setting: static masks plus the dynamic selection) alternating, so that the load of other processes on
the machine hits both alike. Each cell is the median of `--runs` runs. `--breakdown` adds, per length,
prefills in this process on one thread, full and DAM alternating, counted in CPU seconds (robust to the
load of other processes), with DAM's attention split into its parts (selection, block lists, mask words,
masks, the attention products, the retrieval heads).

    python benchmarks/cpu_ttft.py --breakdown        # writes docs/results/cpu-speed.md
    python benchmarks/cpu_ttft.py --lengths 2048 --runs 1 --no-write
    python benchmarks/cpu_ttft.py --dynamic-score antisum --no-write   # another estimate for the profile's rule
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.safetensors"
OUT = ROOT / "docs" / "results" / "cpu-speed.md"
WORDS = ("river stone garden lantern harbor copper winter morning engine signal market valley bridge clock "
         "paper quiet north old city the a of and with under over near").split()
PASSKEY = "48213"


def prompt_text(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """About `n_tokens` tokens of varied sentences, the passkey sentence at 40% depth, the question last."""
    rnd = random.Random(seed)
    sentences, count = [], 0
    while count < n_tokens - 32:
        s = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 14))).capitalize() + "."
        sentences.append(s)
        count += len(tokenizer.encode(" " + s, add_special_tokens=False))
    sentences.insert(int(len(sentences) * 0.4), f"The secret code is {PASSKEY}. Remember it.")
    return " ".join(sentences) + "\nWhat is the secret code?"


def dam_command() -> list[str]:
    """The `dam` console script of this interpreter's environment (the installed entry point)."""
    script = Path(sys.executable).parent / "dam"
    return [str(script)] if script.exists() else ["dam"]


def run_cli(prompt_file: str, attention: str, new_tokens: int, score: str | None = None) -> dict:
    cmd = [*dam_command(), "generate", "--prompt-file", prompt_file, "-n", str(new_tokens), "--json", "--ignore-eos"]
    cmd += ["--attention", "full"] if attention == "full" else ["--profile", str(PROFILE)]
    if score and attention != "full":
        cmd += ["--dynamic-score", score]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def cpu_prefill(model, tok, text: str, runs: int, score: str | None = None) -> dict[str, float]:
    """CPU seconds of one prefill on one thread, full and DAM alternating (median of `runs`), and of the parts of
    DAM's attention (its last run): work counted whatever the other processes on the machine do."""
    import torch
    from dam_kernels import cpu_sparse, dynamic, gathered

    from dam_cli.artifact.profile import load_profile
    from dam_cli.runtime import attention
    from dam_cli.runtime import backend as dam_backend

    parts = {"selection": [(dynamic, "select_blocks")], "block lists": [(gathered, "kept_blocks")],
             "mask words": [(gathered, "list_words"), (gathered, "beyond_words")],
             "masks": [(gathered, "additive_mask")], "attention products": [(gathered, "_attend")],
             "compiled kernel": [(cpu_sparse, "cpu_sparse_attention")],
             "retrieval heads": [(attention, "with_full_heads")], "DAM attention": [(attention, "sparse_attention")]}
    hooks = [(name, mod, fn) for name, pairs in parts.items() for mod, fn in pairs]
    spent = dict.fromkeys(parts, 0.0)
    real = {(mod, fn): getattr(mod, fn) for _, mod, fn in hooks}

    def timed(name, mod, fn):
        def call(*a, **kw):
            t = time.process_time()
            try:
                return real[mod, fn](*a, **kw)
            finally:
                spent[name] += time.process_time() - t
        return call

    profile = load_profile(str(PROFILE))
    ids = torch.tensor([tok.encode(text)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"full": [], "dam": []}
    try:
        for _ in range(runs):
            for att in ("full", "dam"):
                spent.update(dict.fromkeys(parts, 0.0))
                if att == "full":
                    dam_backend.enable_dense(model)
                else:
                    dyn = dam_backend.recommended_dynamic(profile)
                    dyn = dataclasses.replace(dyn, score=score) if score else dyn
                    dam_backend.enable_dam(model, profile, dynamic=dyn)
                    for name, mod, fn in hooks:
                        setattr(mod, fn, timed(name, mod, fn))
                try:
                    t = time.process_time()
                    with torch.no_grad():
                        model(ids)
                    times[att].append(time.process_time() - t)
                finally:
                    dam_backend.disable_dam(model)
                    for _, mod, fn in hooks:
                        setattr(mod, fn, real[mod, fn])
    finally:
        torch.set_num_threads(threads)
    return {"full prefill": statistics.median(times["full"]), "DAM prefill": statistics.median(times["dam"]),
            **spent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096,8192", help="prompt tokens, comma-separated")
    ap.add_argument("--runs", type=int, default=3, help="runs per cell (the median is reported)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--breakdown", action="store_true",
                    help="also count CPU seconds of full and DAM prefills on one thread, and DAM's parts")
    ap.add_argument("--dynamic-score", default=None, help="DAM with this score in the profile's run-time options "
                    "(e.g. antisum), as `dam generate --dynamic-score` gives it")
    ap.add_argument("--no-write", action="store_true", help=f"print only, do not write {OUT.relative_to(ROOT)}")
    a = ap.parse_args()
    import torch
    import transformers

    from dam_cli.runtime.models import load_model

    loaded = load_model(None, device="cpu", dtype=torch.float32)
    lengths = [int(x) for x in a.lengths.split(",")]
    load_before = os.getloadavg()[0]
    rows, parts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 1 << 30)
        for n in lengths:
            text = prompt_text(loaded.tokenizer, min(n, context - a.new_tokens - 16), seed=n)
            path = os.path.join(tmp, f"p{n}.txt")
            Path(path).write_text(text)
            res: dict[str, list[dict]] = {"full": [], "dam": []}
            for i in range(a.runs):
                for att in (("full", "dam") if i % 2 == 0 else ("dam", "full")):
                    res[att].append(run_cli(path, att, a.new_tokens, a.dynamic_score))
                    r = res[att][-1]
                    print(f"{n} {att}: ttft {r['ttft_s']:.2f} s, decode {r['decode_ms_per_token']:.1f} ms/token, "
                          f"passkey {'found' if PASSKEY in r['text'] else 'missed'}", file=sys.stderr, flush=True)
            med = {att: {key: statistics.median(r[key] for r in rs) for key in ("ttft_s", "decode_ms_per_token")}
                   for att, rs in res.items()}
            rows.append((res["dam"][0]["prompt_tokens"], med, res["dam"][0].get("density"),
                         all(PASSKEY in r["text"] for r in res["dam"]), all(PASSKEY in r["text"] for r in res["full"])))
            if a.breakdown:
                parts[res["dam"][0]["prompt_tokens"]] = cpu_prefill(loaded.model, loaded.tokenizer, text, a.runs,
                                                                    a.dynamic_score)
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
             f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
             f"torch threads {torch.get_num_threads()}; DAM's block score: "
             f"{a.dynamic_score or 'the profile run-time options'}; median of {a.runs} runs per cell, full and DAM "
             "alternating; "
             f"load average {load_before:.1f} before the runs, {os.getloadavg()[0]:.1f} after.",
             "", "| prompt tokens | full TTFT | DAM TTFT | TTFT full / DAM | full decode | DAM decode | "
             "decode full / DAM | DAM density | passkey full / DAM |", "|---|---|---|---|---|---|---|---|---|"]
    for tokens, med, density, dam_ok, full_ok in rows:
        f, d = med["full"], med["dam"]
        lines.append(f"| {tokens:,} | {f['ttft_s']:.2f} s | {d['ttft_s']:.2f} s | {f['ttft_s'] / d['ttft_s']:.2f}x | "
                     f"{f['decode_ms_per_token']:.1f} ms | {d['decode_ms_per_token']:.1f} ms | "
                     f"{f['decode_ms_per_token'] / d['decode_ms_per_token']:.2f}x | {density:.1%} | "
                     f"{'yes' if full_ok else 'no'} / {'yes' if dam_ok else 'no'} |")
    if parts:
        lines += ["", f"CPU seconds of one prefill on one thread (in this process, median of {a.runs}, full and DAM "
                  "alternating; DAM's parts from its last run):", "",
                  "| prompt tokens | full / DAM | " + " | ".join(next(iter(parts.values()))) + " |",
                  "|---|---|" + "---|" * len(next(iter(parts.values())))]
        lines += [f"| {n:,} | {p['full prefill'] / p['DAM prefill']:.2f}x | "
                  + " | ".join(f"{x:.2f}" for x in p.values()) + " |" for n, p in parts.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    if not a.no_write:
        write_doc(table)


def write_doc(table: str) -> None:
    """Replace the measured part of docs/results/cpu-speed.md (between its markers), keeping the prose."""
    start, end = "<!-- cpu_ttft.py: measured -->", "<!-- /cpu_ttft.py -->"
    doc = OUT.read_text() if OUT.exists() else f"# CPU speed\n\n{start}\n{end}\n"
    head, rest = doc.split(start, 1)
    OUT.write_text(head + start + "\n" + table + end + rest.split(end, 1)[1])
    print(f"wrote {OUT.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
