#!/usr/bin/env bash
# A GPU job list: the prefill kernel's tiles, warps and stages at head dim 256 (Gemma 3's shape: 4 query heads, 1 kv
# head) on random layouts of 10% of the causal blocks at 32K and 20% at 16K (a global layer's density there), each
# against dense cuDNN; then, once `update.sh NEXT` has brought the chosen setting to ~/src-next, the kernels' GPU
# tests at head dim 256 and Gemma 3 end to end at 16K and 32K with that code (model parts as DEVELOPERS.md says,
# GALL). Results under ~/res; run with `JOBS=jobs-head256-tiles.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
T="--sweep-tiles 64x64,64x32,128x32,128x64,32x64 --sweep-stages 1,2,3"
run sweep-10 300 python3 benchmarks/kernel_speed.py --only-sweep --shapes gemma3-270m --sweep-lengths 32768 \
    --sweep-density 0.1 $T --out $R/sweep-head256-32k-10.json
run sweep-20 300 python3 benchmarks/kernel_speed.py --only-sweep --shapes gemma3-270m --sweep-lengths 16384 \
    --sweep-density 0.2 $T --out $R/sweep-head256-16k-20.json
echo "SWEEP DONE $(date +%T)"

wait_for ~/stash/NEXT
cd ~/src-next && ln -sfn ~/src-next/dam_cli ~/shim/dam_cli && ln -sfn ~/src-next/kernels ~/shim/dam_kernels
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_head_dims.py
wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
run gm-bench 300 python3 benchmarks/long_context.py --model $HOME/stash/gemma.gguf \
    --profile profiles/gemma3-270m.safetensors --lengths 16381,32621 --new-tokens 32 --cuda-graph --out $R/gm-bench
echo "ALL DONE $(date +%T)"
