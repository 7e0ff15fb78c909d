"""Lazy rescaling of the online softmax (kernels/prefill.py: lazy_rescale) against the default.

All-causal and 10% random block layouts at 8K, 32K and 131K, both head dims, TMA loads, the
shipped tiles and launch choice; writes $OUT/lazy-rescale.json. Needs a CUDA GPU and the
repository on PYTHONPATH with `kernels/` importable as `dam_kernels` (as benchmarks/kernels.py).
Run: python benchmarks/lazy_rescale.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402

import kernels as bk  # noqa: E402  benchmarks/kernels.py (first on sys.path, before the repo's kernels/)
from dam_kernels.prefill import dam_prefill  # noqa: E402

dev = torch.device("cuda")
out = []
for S in (8192, 32768, 131072):
    for shape in ("llama3.2-1b", "llama3-8b"):
        H, H_kv, D = bk.SHAPES[shape]
        q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, H_kv, S, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, H_kv, S, D, device=dev, dtype=torch.bfloat16)
        cudnn = bk.bench(bk.sdpa_dense(q, k, v, "cudnn"))
        cm = bk.causal_masks(H, dev)
        tile_bn = 128 if D == 64 else 64
        cases = [("all-causal", bk.causal_block_maps(H, S, 128, 128, dev)),
                 ("random 10%", bk.random_block_maps(H, S, 128, 128, 0.1, dev, seed=10))]
        for name, (kept, full) in cases:
            lay128 = bk.layout_from_dense(kept, full, S, 128, 128)
            lay = bk.split_layout(lay128, 128 // tile_bn)
            flops = 4.0 * lay128.kept_blocks() * 128 * 128 * D
            base = dam_prefill(q, k, v, cm, lay, start=0, scale=D**-0.5)
            for lazy in (False, True):
                fn = lambda: dam_prefill(q, k, v, cm, lay, start=0, scale=D**-0.5, lazy_rescale=lazy)  # noqa: E731
                o = fn()
                ms = bk.bench(fn)
                row = dict(shape=shape, S=S, case=name, lazy=lazy, ms=ms, tflops=flops / ms / 1e9, cudnn_ms=cudnn,
                           ratio_vs_cudnn=ms / cudnn, max_diff_vs_default=(o.float() - base.float()).abs().max().item())
                out.append(row)
                print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "lazy-rescale.json"), "w"), indent=1)
