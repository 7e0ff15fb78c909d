#!/usr/bin/env bash
# The short form of jobs-estimate-h200.sh (about 4 minutes, no model file): the compiled tests of the estimate (its
# default chunk shrunk to the head dim, the flat loop) and of the exact scores on TF32 cores, the estimate's tile
# sweep with the chunked and flat settings (timed only: a winner is adopted with its compiled tests, as
# jobs-estimate-h200.sh does), then the llama-1b shape end to end at 32K and 131K with the code's defaults. Results
# under ~/res; run with `JOBS=jobs-estimate-confirm.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider $EST tests/dam_kernels/test_block_mass.py
run sweep 420 python3 benchmarks/antidiag_speed.py --only-summed --variants "" --lengths 32768,131072 --out $R/sweep
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
