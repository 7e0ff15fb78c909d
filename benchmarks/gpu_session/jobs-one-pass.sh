#!/usr/bin/env bash
# No model files. The summed estimate with each product taken once (dam_kernels.antisum_partials) against the two
# passes: its cost on both shapes at 32K and 131K beside dense attention (the two passes as a variant, the tiles as
# they are); then the llama-1b shape end to end at 32K and 131K (dense, the no-op floor, DAM, DAM with the two
# passes) and one decode step's attention (the decode confirmation of jobs-decode-final.sh); then the compiled
# tests of the estimate and the decode paths. Results under ~/res; run with
# `JOBS=jobs-one-pass.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run estimate-speed 240 python3 benchmarks/antidiag_speed.py --no-sweep --variants one_pass=0 --out $R/estimate-speed
run generate 360 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam,dam-two-pass \
    --cuda-graph --recommended --profile $P --no-attention-only --out $R/generate
run decode-step 200 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_partials.py \
    tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_decode_full_heads.py \
    tests/dam_kernels/test_bit_search.py tests/dam_kernels/test_select_mass.py tests/runtime/test_dynamic_decode.py
echo "ALL DONE $(date +%T)"
