"""Tensor-parallel DAM generation against one device, in one torchrun launch.

Random weights of a preset shape (`generate.PRESETS`: llama-1b, llama-8b; tiny for a CPU smoke run) are saved
once to `--folder`; then, in the same launch:

1. rank 0 alone loads them on one device and times dense and DAM (prefill + greedy decode, `generate.run_e2e`:
   a warm-up at S - 128, then the measured run) while the other ranks wait;
2. every rank loads them with transformers' `tp_plan="auto"` (heads split over the ranks) and the same two
   variants run on all ranks together; rank 0 times them.

DAM's profile is the shipped SmolLM2 heads tiled onto the model (`generate.tiled_profile`); under tensor
parallelism `enable_dam` gives each rank the masks of its own heads (`dam_cli.runtime.tensor_parallel`).
The table (rank 0, stdout and `--out`/bench-tensor-parallel.json) puts one device and N devices side by side
with the ratios, the hardware and the versions.

    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --preset llama-1b --lengths 32768,131072
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --preset llama-8b --lengths 131072 --new-tokens 32
    torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --preset tiny     # CPU smoke run (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import generate as bench  # noqa: E402  (beside this script; it also puts this checkout's kernels on the path)

from dam_cli.artifact.profile import load_profile  # noqa: E402
from dam_cli.runtime import backend as dam_backend  # noqa: E402
from dam_cli.runtime.tensor_parallel import tp_load_kwargs  # noqa: E402


def save_random(preset: str, folder: str, dtype: torch.dtype, device: str) -> None:
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    model = bench.build_model(preset, device, dtype)
    model.save_pretrained(folder)
    del model


def load(folder: str, dtype: torch.dtype, device: str, tp: bool):
    from transformers import AutoModelForCausalLM

    kw = tp_load_kwargs("auto") if tp else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kw)
    if not tp:
        model.to(device)
    return model.eval().requires_grad_(False)


def run_variants(model, profile_src, lengths, new_tokens, device, vocab) -> dict:
    profile = bench.tiled_profile(profile_src, model)
    out = {}
    for S in lengths:
        g = torch.Generator().manual_seed(S)
        ids = torch.randint(0, vocab, (1, S), generator=g).to(device)
        row = {}
        for name in ("dense", "dam"):
            bench.set_variant(model, name, profile, "auto")
            row[name] = bench.run_e2e(model, ids, new_tokens, device)
            dam_backend.disable_dam(model)
        out[S] = row
    return out


def render(res: dict) -> str:
    n = res["world"]
    lines = [f"{res['preset']}, {res['dtype']}, {res['new_tokens']} new tokens; {res['env']}", "",
             f"| prompt tokens | variant | TTFT 1 device | TTFT {n} devices | speed-up | decode ms/token 1 / {n} | "
             "speed-up |", "|---|---|---|---|---|---|---|"]
    for S in res["single"]:
        for v in ("dense", "dam"):
            a, b = res["single"][S][v], res["tp"][S][v]
            lines.append(f"| {int(S):,} | {v} | {a['ttft_s']:.3f} s | {b['ttft_s']:.3f} s | "
                         f"{a['ttft_s'] / b['ttft_s']:.2f}x | {a['decode_ms']:.2f} / {b['decode_ms']:.2f} | "
                         f"{a['decode_ms'] / b['decode_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(bench.PRESETS), default="llama-1b")
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--profile", default=bench.SHIPPED)
    ap.add_argument("--folder", default=None, help="where the random weights are saved (default /tmp/dam-tp-PRESET)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    import torch.distributed as dist

    from dam_cli.distributed import from_env

    ranks = from_env()
    if ranks is None:
        sys.exit("run under torchrun: torchrun --nproc-per-node N benchmarks/tensor_parallel.py ...")
    cuda = torch.cuda.is_available()
    device = f"cuda:{ranks.local_rank}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    tiny = a.preset == "tiny"
    lengths = [int(x) for x in (a.lengths or ("200,600" if tiny else "32768,131072")).split(",")]
    new_tokens = a.new_tokens or (4 if tiny else 64)
    folder = a.folder or f"/tmp/dam-tp-{a.preset}"
    src = load_profile(a.profile)
    vocab = bench.PRESETS[a.preset]["vocab_size"]
    barrier = dist.new_group(backend="gloo", timeout=timedelta(hours=2))  # waits out rank 0's one-device runs
    if ranks.is_main:
        save_random(a.preset, folder, dtype, device)
    dist.barrier(group=barrier)
    single = None
    if ranks.is_main:
        model = load(folder, dtype, device, tp=False)
        single = run_variants(model, src, lengths, new_tokens, device, vocab)
        del model
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier(group=barrier)
    model = load(folder, dtype, device, tp=True)
    tp = run_variants(model, src, lengths, new_tokens, device, vocab)
    if ranks.is_main:
        res = {"preset": a.preset, "world": ranks.world, "dtype": str(dtype), "new_tokens": new_tokens,
               "env": bench.environment(device), "single": single, "tp": tp}
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench-tensor-parallel.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(render(res))
    dist.barrier(group=barrier)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
