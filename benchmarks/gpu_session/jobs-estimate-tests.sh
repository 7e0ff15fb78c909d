#!/usr/bin/env bash
# The least a GPU confirms of the estimate's chunked defaults (about 3 minutes, no model file): the compiled tests of
# the estimate (the default chunk shrunk to the head dim, the flat loop) and of the exact scores on TF32 cores, then
# the llama-1b shape end to end at 32K and 131K. Results under ~/res; run with
# `JOBS=jobs-estimate-tests.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_kernel.py \
    tests/dam_kernels/test_antisum_partials.py tests/dam_kernels/test_block_mass.py
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
