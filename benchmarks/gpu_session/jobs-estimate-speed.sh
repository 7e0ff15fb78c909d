#!/usr/bin/env bash
# A short GPU job list without model files: the estimate's compiled tests, its cost at its default tiles against
# dense attention for the variants of `antidiag_speed.py --variants` (one row group in 2, 4 or 8 estimated; groups
# of 16) on both shapes, and the llama-1b shape end to end at 32K and 131K with the shipped default. Results under
# ~/res; run with `JOBS=jobs-estimate-speed.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
TRITON_INTERPRET=0 run gpu-tests 200 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_kernel.py \
    tests/dam_kernels/test_antisum.py
run estimate-speed 200 python3 benchmarks/antidiag_speed.py --no-sweep --out $R/estimate-speed
run gen-antisum 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --out $R/gen-antisum
echo "ALL DONE $(date +%T)"
