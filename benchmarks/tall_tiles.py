"""Run 9's tall-tile experiment (docs/results/kernel-speed.md): 256-row query tiles against the shipped tiles.

All-causal layouts at 32K and 131K, both head dims, TMA loads; writes $OUT/tiles256.json. Needs a
CUDA GPU and the repository on PYTHONPATH with `kernels/` importable as `dam_kernels` (as
benchmarks/kernels.py). Run: python benchmarks/tall_tiles.py
"""
import json, os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
import kernels as bk  # noqa: E402  benchmarks/kernels.py (first on sys.path, before the repo's kernels/)
from dam_kernels.prefill import dam_prefill
dev = torch.device("cuda")
out = []
for S in (32768, 131072):
    for shape in ("llama3.2-1b", "llama3-8b"):
        H, H_kv, D = bk.SHAPES[shape]
        q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, H_kv, S, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, H_kv, S, D, device=dev, dtype=torch.bfloat16)
        cudnn = bk.bench(bk.sdpa_dense(q, k, v, "cudnn"))
        cm = bk.causal_masks(H, dev)
        k128, f128 = bk.causal_block_maps(H, S, 128, 128, dev)
        flops = 4.0 * bk.layout_from_dense(k128, f128, S, 128, 128).kept_blocks() * 128 * 128 * D
        base_bn = 128 if D == 64 else 64
        cfgs = [(128, base_bn, 4, 2), (256, 64, 8, 2), (256, 64, 8, 3), (256, 128, 8, 2), (256, 128, 8, 3), (256, 64, 16, 2)]
        for BM, BN, w, st in cfgs:
            kept, full = bk.causal_block_maps(H, S, BM, 128, dev)
            lay = bk.split_layout(bk.layout_from_dense(kept, full, S, BM, 128), 128 // BN)
            row = dict(shape=shape, S=S, tile=f"{BM}x{BN}", warps=w, stages=st, cudnn_ms=cudnn)
            try:
                fn = lambda: dam_prefill(q, k, v, cm, lay, start=0, scale=D**-0.5, num_warps=w, num_stages=st, use_tma=True)
                o = fn(); ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, -256:], k.repeat_interleave(H // H_kv, 1), v.repeat_interleave(H // H_kv, 1), attn_mask=(torch.arange(S, device=dev)[None] <= torch.arange(S - 256, S, device=dev)[:, None]))
                row["max_diff_last_rows"] = (o[:, :, -256:].float() - ref.float()).abs().max().item()
                ms = bk.bench(fn)
                row.update(ms=ms, tflops=flops / ms / 1e9, ratio_vs_cudnn=ms / cudnn)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
            out.append(row); print(json.dumps(row), flush=True)
        del q, k, v; torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "tiles256.json"), "w"), indent=1)
