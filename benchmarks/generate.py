"""End-to-end generation benchmark: DAM against the best dense attention, in one harness.

A Llama-3.2-1B-shaped model (16 layers, 32 query heads, 8 kv heads, head dim 64, hidden 2048,
intermediate 8192, vocab 128256, rope theta 500000), random weights from its config, bf16,
batch 1. For each prompt length: prefill, then greedy decode of `--new-tokens` tokens with the
same loop `dam generate` uses (`dam_cli.runtime.decode.decode_loop`, dynamic cache, one forward and one
host read per token), under four attention implementations:

- `sdpa`: transformers' own SDPA path;
- `dense`: plain SDPA registered as `dam_dense` (is_causal in prefill, no mask in decode, GQA
  without repeat): the fair dense peer;
- `noop`: attention replaced by returning the queries: the floor no attention method can beat
  in this stack (projections, MLPs, cache appends and per-step overhead remain);
- `dam`: DAM with a profile of realistic statistics: the shipped SmolLM2 profile's 270 heads
  tiled onto 16 layers x 32 heads (L = 512), built here with `Profile.from_masks`;
- `dam-heads-after`, `dam-two-pass` and `dam-torch-merge`: DAM with one part as it was before, for same-run
  comparisons (the retrieval heads of a decode step computed after the kernel; the summed estimate's products
  taken twice, `dam_kernels.antisum.ONE_PASS = False`; the prefill's selection merged into the layout by torch
  operations, `dam_attention.MERGE_ONE_LAUNCH = False`).

Before each measured run the same variant runs a prompt 128 tokens shorter for 3 tokens, so
kernels are compiled but DAM's block layout for the measured length is not cached: the time to
first token includes building it, as a user's first call would. A second table times one
layer's attention alone (do_bench medians) to show where the end-to-end time goes.

Imports only torch, transformers and dam_cli's backend/profile/attention/decode modules, and
the kernels as `dam_kernels`: installed, or else from this checkout through links in a temporary
folder (`benchmarks/checkout.py`; never the repository root, whose `kernels/` would hide the PyPI
package `kernels` that transformers imports).

    python benchmarks/generate.py                      # the H200 run (docs/results/generate-speed.md)
    python benchmarks/generate.py --cuda-graph         # the same with the static-cache CUDA-graph loop
    python benchmarks/generate.py --preset tiny        # a CPU smoke run of the harness itself

With `--cuda-graph` every variant decodes with `dam_cli.runtime.decode.graph_decode_loop` (the
loop of `dam generate --cuda-graph`: static cache, one captured step replayed per token), and
`sdpa` is left out: transformers' own SDPA over a static cache builds a prompt x cache mask in
prefill (17 GiB at 131,072 tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


from checkout import use_checkout  # noqa: E402  (beside this script)

use_checkout()

from dam_kernels import antisum  # noqa: E402
from dam_kernels.selection import DynamicSelection  # noqa: E402
from work_bound import bound_line, work_density  # noqa: E402  (beside this script)

from dam_cli.artifact.profile import Profile, ProfileMeta, load_profile  # noqa: E402
from dam_cli.runtime import attention as dam_attention  # noqa: E402
from dam_cli.runtime import backend as dam_backend  # noqa: E402
from dam_cli.runtime.decode import decode_loop, forward_kwargs, graph_decode_loop, new_cache  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(HERE), "profiles", "smollm2-135m-instruct-paper.safetensors")
NOOP_IMPL = "bench_noop"

PRESETS = {
    # Llama-3.2-1B's shape (max_position raised so 131,072 + 128 new tokens fit).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=135168,
                     rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # Llama-3-8B's shape (the tensor-parallel benchmark's larger model).
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=135168,
                     rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # For checking the harness on a CPU in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096,
                 rope_theta=500000.0, tie_word_embeddings=True),
}


def build_model(preset: str, device: str, dtype: torch.dtype):
    """Random weights from the preset's config, on `device` in `dtype`, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**PRESETS[preset], attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    return model


def tiled_profile(src: Profile, model) -> Profile:
    """The source profile's heads tiled onto the model's layers x heads (flattened, cycled), so
    the whole distribution of real heads appears; meta names the model so `enable_dam` accepts it."""
    ident = dam_backend.model_identity_of(model)
    NL, H = ident["n_layers"], ident["n_heads"]
    n_src = src.n_layers * src.n_heads
    idx = torch.arange(NL * H) % n_src
    L = src.pcl
    tm = src.true_mask.reshape(n_src, L, L)[idx].reshape(NL, H, L, L)
    pick = lambda t: t.reshape(n_src, *t.shape[2:])[idx].reshape(NL, H, *t.shape[2:])  # noqa: E731
    meta = ProfileMeta(model={**ident, "name": f"{ident['name']} (SmolLM2 heads tiled)"},
                       recipe=dict(src.meta.recipe), calibration=dict(src.meta.calibration))
    stats = {k: pick(v) for k, v in src.stats.items()}
    full = pick(src.full) if src.full_heads is not None else None  # retrieval heads, when the option is on
    return Profile.from_masks(tm, pick(src.offsets), pick(src.columns), meta=meta, stats=stats, full_heads=full)


DYNAMIC = [DynamicSelection()]  # the dam variant's dynamic part (--dynamic-*; off by default: static mask only)
LOOP = [decode_loop]  # the decode loop every variant runs (graph_decode_loop with --cuda-graph)


def register_noop() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NOOP_IMPL, lambda module, q, k, v, mask, **kw: (q.transpose(1, 2), None))
    AttentionMaskInterface.register(NOOP_IMPL, lambda *a, **k: None)


ONE_PASS_DEFAULT = antisum.ONE_PASS


def set_variant(model, name: str, profile: Profile, dam_backend_name: str) -> None:
    dam_backend.disable_dam(model)
    dam_attention.FULL_HEADS_IN_DECODE = True
    dam_attention.MERGE_ONE_LAUNCH = True
    antisum.ONE_PASS = ONE_PASS_DEFAULT
    if name == "sdpa":
        model.set_attn_implementation("sdpa")
    elif name == "noop":
        model.set_attn_implementation(NOOP_IMPL)
    elif name == "dense":
        dam_backend.enable_dense(model)
    elif name in ("dam", "dam-heads-after", "dam-two-pass", "dam-torch-merge"):
        # dam-heads-after: decode steps recompute the retrieval heads densely after the kernel, as before they ran
        # inside it (dam_cli.runtime.full_heads); dam-two-pass: the summed estimate's products taken twice, as
        # before dam_kernels.antisum_partials; dam-torch-merge: the prefill's selection merged into the layout by
        # torch operations (dynamic.merge_layout), as before dam_kernels.merge_lists
        dam_attention.FULL_HEADS_IN_DECODE = name != "dam-heads-after"
        dam_attention.MERGE_ONE_LAUNCH = name != "dam-torch-merge"
        antisum.ONE_PASS = name != "dam-two-pass"
        dam_backend.enable_dam(model, profile, backend=dam_backend_name, dynamic=DYNAMIC[0])
    else:
        raise ValueError(name)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_e2e(model, ids: torch.Tensor, new_tokens: int, device: str) -> dict:
    """Warm up on a prompt 128 tokens shorter, then two measured prefill + decode runs at S.

    The first run is what a user's first call at this length sees (kernels compiled, but
    anything keyed by the length, such as DAM's block layout or kernel specialisations, is
    new); the second is the steady state. The tables report the second, the first beside it.
    """
    S = ids.shape[1]
    loop = LOOP[0]
    loop(model, ids[:, : max(1, S - 128)], max_new_tokens=3)
    runs = []
    for _ in range(2):
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        stamps: list[float] = []  # host time at each token id (each id is read on the host: a sync)
        res = loop(model, ids, max_new_tokens=new_tokens, on_token=lambda _t: stamps.append(time.perf_counter()))
        sync(device)
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
        n = len(res.tokens) - 1
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        steps = sorted(gaps)
        # Steady state: without the first two steps (in the graph loop, the eager step and the
        # capture); the mean over all steps is kept beside it.
        steady = 1000 * sum(gaps[2:]) / len(gaps[2:]) if len(gaps) > 2 else float("nan")
        runs.append({"ttft_s": res.ttft_s, "decode_ms": 1000 * res.decode_s / max(n, 1), "decode_steady_ms": steady,
                     "decode_median_ms": 1000 * steps[len(steps) // 2] if steps else float("nan"),
                     "decode_max_ms": 1000 * steps[-1] if steps else float("nan"),
                     "peak_gib": peak / 2**30, "new_tokens": len(res.tokens)})
    first, warm = runs
    return {**warm, "first_ttft_s": first["ttft_s"], "first_decode_ms": first["decode_ms"]}


def profile_decode(model, ids: torch.Tensor, steps: int = 8) -> str:
    """torch.profiler over a few decode steps at this length: where a step's host time goes,
    and how many host-device synchronisations it makes."""
    from torch.profiler import ProfilerActivity, profile

    cache = new_cache(model)
    kw, _ = forward_kwargs(model)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
        tok = out.logits[:, -1].argmax(-1)
        for _ in range(3):  # warm
            logits = model(input_ids=tok.view(1, 1), use_cache=True, logits_to_keep=1, **{kw: cache}).logits
            tok = logits[:, -1].argmax(-1)
            int(tok[0])
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = model(input_ids=tok.view(1, 1), use_cache=True, logits_to_keep=1,
                            **{kw: cache}).logits[:, -1].argmax(-1)
                int(tok[0])
    ev = prof.key_averages()
    syncs = {e.key: e.count for e in ev if "Synchronize" in e.key or "Memcpy" in e.key or "item" in e.key
             or "_local_scalar_dense" in e.key}
    table = ev.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
    by_device = ev.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    del cache
    return f"syncs/copies over {steps} steps: {syncs}\n{table}\nby device time:\n{by_device}"


def profile_prefill(model, ids: torch.Tensor) -> str:
    """torch.profiler over one prefill (after a warm one): the operators and kernels that take the
    time to first token, by device time, and the host time per operator."""
    from torch.profiler import ProfilerActivity, profile

    kw, _ = forward_kwargs(model)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: new_cache(model)})  # warm: layouts cached
        sync(str(ids.device))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: new_cache(model)})
            sync(str(ids.device))
    ev = prof.key_averages()
    by_device = ev.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    by_host = ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70)
    return f"by device time:\n{by_device}\nby host time:\n{by_host}"


def bench_ms(fn, device: str) -> float:
    """Median milliseconds of `fn` (do_bench on CUDA, a few host-timed runs elsewhere)."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * sorted(ts)[1]


def host_us(fn, device: str, n: int = 200) -> float:
    """Mean host microseconds per call of `fn` over `n` back-to-back calls (no sync inside)."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    sync(device)
    return 1e6 * dt / n


def attention_only(profile: Profile, S: int, device: str, dtype, dam_backend_name: str, H: int, Hkv: int,
                   D: int) -> dict:
    """One layer's attention alone at S tokens: prefill and a one-row decode, dense vs DAM."""
    from dam_cli.runtime.attention import sparse_attention

    F = torch.nn.functional
    g = torch.Generator(device=device).manual_seed(S)
    q = torch.randn(1, H, S, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, S, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, S, D, device=device, dtype=dtype, generator=g)
    q1 = q[:, :, -1:].contiguous()
    layer = min(3, profile.n_layers - 1)  # a middle layer; all layers share the kernels
    out = {}
    sync(device)
    t = time.perf_counter()
    sparse_attention(q, k, v, profile, layer, backend=dam_backend_name)  # builds (and caches) the layout
    sync(device)
    out["dam_prefill_cold_ms"] = 1000 * (time.perf_counter() - t)
    out["dense_prefill_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True), device)
    out["dam_prefill_ms"] = bench_ms(lambda: sparse_attention(q, k, v, profile, layer, backend=dam_backend_name),
                                     device)
    out["dense_decode_ms"] = bench_ms(lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True), device)
    out["dam_decode_ms"] = bench_ms(lambda: sparse_attention(q1, k, v, profile, layer, start=S - 1,
                                                             backend=dam_backend_name), device)
    # Host time per call (launches queue without waiting): per-step overhead that the GPU
    # time above does not show, and that decode pays 16 times per token.
    out["dense_decode_host_us"] = host_us(lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True), device)
    out["dam_decode_host_us"] = host_us(lambda: sparse_attention(q1, k, v, profile, layer, start=S - 1,
                                                                 backend=dam_backend_name), device)
    if dam_backend_name == "triton":
        from dam_kernels.decode import dam_decode
        from dam_kernels.layout import device_masks

        masks = device_masks(profile, layer, q.device)
        out["dam_decode_launcher_host_us"] = host_us(
            lambda: dam_decode(q1, k, v, masks, start=S - 1, scale=D**-0.5), device)
    del q, k, v, q1
    return out


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    ap.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default per preset)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--variants", default="sdpa,dense,noop,dam")
    ap.add_argument("--profile", default=SHIPPED, help="source profile whose heads are tiled onto the model")
    off = DynamicSelection()  # the defaults of `dam generate`
    ap.add_argument("--dynamic-topk", type=int, default=off.topk, help="dynamic part for the dam variant (0 = off)")
    ap.add_argument("--dynamic-block", type=int, default=off.block)
    ap.add_argument("--dynamic-tail-topk", type=int, default=off.tail_topk,
                    help="top-k of the last query block and decode steps")
    ap.add_argument("--dynamic-score", default=off.score, help="how key blocks are scored "
                    "(SCORES of dam_kernels.selection)")
    ap.add_argument("--dynamic-tail-mass", type=float, default=None,
                    help="exact-mass rule of the last query block and decode steps (e.g. 0.9; default off)")
    ap.add_argument("--recommended", action="store_true", help="the dam variant takes the run-time options the "
                    "profile records (dam.runtime), as `dam generate` does; the --dynamic-* flags are ignored")
    ap.add_argument("--tail", default=None, metavar="MASS,CAP", help="with --recommended: the question's block and "
                    "decode steps keep this share of their exact mass, at most CAP blocks; the prompt keeps the "
                    "recommended share of its estimate (DynamicSelection.mass)")
    ap.add_argument("--no-fused-selection", action="store_true", help="decode steps under --cuda-graph select with the "
                    "torch chain instead of the selection kernels (dam_kernels.select, select_mass), for comparison")
    ap.add_argument("--cuda-graph", action="store_true", help="decode with the static-cache CUDA-graph loop "
                    "(dam generate --cuda-graph); writes bench-generate-graph.json")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench-generate.json")
    ap.add_argument("--no-attention-only", action="store_true")
    ap.add_argument("--profile-decode", default="", help="variants to run torch.profiler on, over decode steps "
                    "at the last length (e.g. noop,dam)")
    ap.add_argument("--profile-prefill", default="", help="variants to run torch.profiler on, over one prefill "
                    "at the last length (e.g. dense,dam): where the time to first token goes")
    args = ap.parse_args()
    try:
        DYNAMIC[0] = DynamicSelection(args.dynamic_topk, args.dynamic_block, args.dynamic_tail_topk,
                                      args.dynamic_score, args.dynamic_tail_mass).validate(cli=True)
    except ValueError as e:
        ap.error(str(e))
    if args.no_fused_selection:
        dam_attention.FUSED_SELECTION = False

    tiny = args.preset == "tiny"
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    be = "reference" if device == "cpu" else "triton"
    lengths = [int(x) for x in (args.lengths or ("200,600" if tiny else "8192,32768,131072")).split(",")]
    new_tokens = args.new_tokens or (4 if tiny else 128)
    variants = args.variants.split(",")
    if args.cuda_graph:
        LOOP[0] = graph_decode_loop
        variants = [v for v in variants if v != "sdpa"]

    env = environment(device)
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    model = build_model(args.preset, device, dtype)
    src = load_profile(args.profile)
    profile = tiled_profile(src, model)
    if args.recommended:
        DYNAMIC[0] = dam_backend.recommended_dynamic(src)
        if DYNAMIC[0] is None:  # a silent "off" here once timed the paper's profile as if it were the shipped setting
            sys.exit(f"--recommended: {args.profile} records no run-time options (dam.runtime); pass --profile "
                     "profiles/smollm2-135m-instruct.safetensors, the recommended profile")
        if args.tail:
            tail_mass, cap = args.tail.split(",")
            DYNAMIC[0] = dataclasses.replace(DYNAMIC[0], mass=DYNAMIC[0].prompt_mass, tail_mass=float(tail_mass),
                                             tail_topk=int(cap)).validate(cli=True)
    register_noop()
    dam_backend.register()
    print(f"model + tiled profile in {time.perf_counter() - t0:.1f} s; profile L={profile.pcl}, "
          f"{profile.n_layers}x{profile.n_heads} heads from {os.path.basename(args.profile)}", flush=True)
    cfg = model.config
    results: dict = {"env": env, "preset": args.preset, "new_tokens": new_tokens, "dtype": str(dtype),
                     "backend": be, "rows": [], "attention_only": [], "cuda_graph": bool(args.cuda_graph),
                     "dynamic": [DYNAMIC[0].topk, DYNAMIC[0].block, DYNAMIC[0].tail_topk, DYNAMIC[0].score,
                                 DYNAMIC[0].tail_mass, DYNAMIC[0].mass],
                     "fused_selection": not args.no_fused_selection,
                     "profile": os.path.basename(args.profile)}
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "bench-generate-graph.json" if args.cuda_graph else "bench-generate.json")

    def save() -> None:
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)

    for S in lengths:
        density = float(profile.density(S).mean())
        ids = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(S)).to(device)
        row = {"tokens": S, "density": density}
        for name in variants:
            try:
                set_variant(model, name, profile, be)
                dam_backend.reset_seen(model)
                row[name] = run_e2e(model, ids, new_tokens, device)
                if name in ("dense", "dam", "dam-heads-after", "dam-two-pass", "dam-torch-merge"):
                    dam_backend.check_routed(model)
                if name == "dam" and DYNAMIC[0].topk > 0:  # after the timed runs: the probe reads counts
                    try:  # a failing probe must not lose the timings above
                        row[name]["work_density"] = work_density(model, profile, ids)
                    except Exception as e:
                        row[name]["work_density_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            except Exception as e:  # record and go on: one failure must not lose the other numbers
                import traceback

                traceback.print_exc()
                row[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            finally:
                dam_backend.disable_dam(model)
                model.set_attn_implementation("sdpa")
            print(json.dumps({"tokens": S, "variant": name, **row[name]}), flush=True)
            save()
        results["rows"].append(row)
        save()
        if not args.no_attention_only:
            try:
                a = attention_only(profile, S, device, dtype, be, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, cfg.head_dim)
            except Exception as e:
                a = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            a["tokens"] = S
            results["attention_only"].append(a)
            print(json.dumps(a), flush=True)
            save()
        del ids
        if device == "cuda":
            torch.cuda.empty_cache()

    traces = [("prefill", args.profile_prefill, profile_prefill, "profile-prefill-{}.txt"),
              ("decode", args.profile_decode, profile_decode, "profile-{}.txt")]
    for kind, names, trace, file_name in traces:
        if not names:
            continue
        S = lengths[-1]
        ids = torch.randint(0, cfg.vocab_size, (1, S), generator=torch.Generator().manual_seed(S)).to(device)
        for name in names.split(","):
            set_variant(model, name, profile, be)
            try:
                txt = trace(model, ids)
            finally:
                dam_backend.disable_dam(model)
                model.set_attn_implementation("sdpa")
            print(f"\n==== {kind} profile: {name} at {S:,} tokens ====\n{txt}", flush=True)
            with open(os.path.join(args.out, file_name.format(name)), "w") as f:
                f.write(txt)
    print()
    print(render(results))


def render(results: dict) -> str:
    """Markdown tables of a results dict (also used to write docs/results/generate-speed.md)."""
    loop = ("static cache + CUDA graph (graph_decode_loop)" if results.get("cuda_graph")
            else "dynamic cache (decode_loop)")
    lines = [f"{results['env']}", f"decode loop: {loop}; dynamic top-k, block: {results.get('dynamic')}; "
             f"profile: {results.get('profile')}", "",
             "| prompt tokens | DAM density | sdpa TTFT / decode | plain dense TTFT / decode | no-op TTFT / decode "
             "| DAM TTFT / decode | TTFT vs best dense | decode DAM / no-op | peak GiB sdpa / dense / no-op / DAM |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r):
        if r is None:
            return "-"
        if "error" in r:
            return "error"
        med = f" (median {r['decode_median_ms']:.2f})" if "decode_median_ms" in r else ""
        if "decode_steady_ms" in r:
            med += f" (steps 3+: {r['decode_steady_ms']:.2f})"
        return f"{r['ttft_s']:.3f} s / {r['decode_ms']:.1f} ms{med}"

    def first(r):
        if r is None or "error" in r:
            return "-" if r is None else "error"
        return f"{r['first_ttft_s']:.3f} s / {r['first_decode_ms']:.1f} ms"

    for row in results["rows"]:
        g = {k: row.get(k) for k in ("sdpa", "dense", "noop", "dam")}
        ok = {k: v for k, v in g.items() if v and "error" not in v}
        dense = [ok[k] for k in ("sdpa", "dense") if k in ok]
        sp = (f"{min(d['ttft_s'] for d in dense) / ok['dam']['ttft_s']:.2f}x"
              if dense and "dam" in ok else "-")
        dr = "-"
        if "dam" in ok and "noop" in ok:
            dr = f"{ok['dam']['decode_ms'] / ok['noop']['decode_ms']:.3f}"
            if "decode_steady_ms" in ok["dam"] and "decode_steady_ms" in ok["noop"]:
                dr += f" (steps 3+: {ok['dam']['decode_steady_ms'] / ok['noop']['decode_steady_ms']:.3f})"
        peaks = " / ".join(f"{ok[k]['peak_gib']:.1f}" if k in ok else "-" for k in ("sdpa", "dense", "noop", "dam"))
        lines.append(f"| {row['tokens']:,} | {100 * row['density']:.2f}% | {cell(g['sdpa'])} | {cell(g['dense'])} | "
                     f"{cell(g['noop'])} | {cell(g['dam'])} | {sp} | {dr} | {peaks} |")
    lines += ["", "First run at each length (kernels already compiled at a length 128 tokens shorter): "
              "TTFT / decode", "", "| prompt tokens | sdpa | plain dense | no-op | DAM |", "|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['tokens']:,} | " + " | ".join(first(row.get(k)) for k in ("sdpa", "dense", "noop", "dam"))
                     + " |")
    bounds = [bound_line(row["tokens"], row["dense"]["ttft_s"], row["noop"]["ttft_s"], row["dam"]["ttft_s"],
                         row["dam"]["work_density"]) for row in results["rows"]
              if all(row.get(k) and "error" not in row[k] for k in ("dense", "noop", "dam"))
              and row["dam"].get("work_density") is not None]
    if bounds:
        lines += ["", "Time to first token against floor + work density x dense attention (issue 19's bound):", "",
                  *[f"- {b}" for b in bounds]]
    errs = [(row["tokens"], k, v["error"]) for row in results["rows"] for k, v in row.items()
            if isinstance(v, dict) and "error" in v]
    for S, k, e in errs:
        lines.append(f"\n{k} at {S}: {e}")
    if results.get("attention_only"):
        lines += ["", "One layer's attention alone (median ms): dense = SDPA causal / one-row SDPA, GQA without repeat",
                  "", "| tokens | dense prefill | DAM prefill | DAM prefill, cold (layout build) | dense decode "
                  "| DAM decode "
                  "| host us/call: dense decode | DAM decode | DAM decode launcher only |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for a in results["attention_only"]:
            if "error" in a:
                lines.append(f"| {a['tokens']:,} | error: {a['error']} |||||")
                continue
            lines.append(f"| {a['tokens']:,} | {a['dense_prefill_ms']:.3f} | {a['dam_prefill_ms']:.3f} | "
                         f"{a['dam_prefill_cold_ms']:.1f} | {a['dense_decode_ms']:.4f} | {a['dam_decode_ms']:.4f} | "
                         f"{a.get('dense_decode_host_us', float('nan')):.0f} | "
                         f"{a.get('dam_decode_host_us', float('nan')):.0f} | "
                         f"{a.get('dam_decode_launcher_host_us', float('nan')):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
