#!/usr/bin/env bash
# A GPU job list (no model file, about 6 minutes): the compiled tests of the dynamic part's prefill with the merge
# in one launch (`merge_lists.merge_layout`), the three merges timed on the shipped profile's layouts at 32K and
# 131K, the llama-1b shape end to end (dense, the no-op floor, DAM, DAM with the torch merge) with the code's
# defaults, one decode step's attention, then a trace of one prefill at 32K and at 131K. Results under ~/res; run with
# `JOBS=jobs-merge-one-launch.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 240 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_merge_layout.py \
    tests/dam_kernels/test_dynamic.py tests/dam_kernels/test_dynamic_window.py tests/dam_kernels/test_dynamic_exact.py
run merge-speed 120 python3 benchmarks/merge_speed.py --lengths 32768,131072 --out $R/merge-speed
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam,dam-torch-merge \
    --cuda-graph --recommended --profile $P --no-attention-only --out $R/generate
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
mkdir -p $R/trace-32k $R/trace-131k
run trace-32k 180 python3 benchmarks/generate.py --lengths 32768 --variants dam --recommended --profile $P \
    --no-attention-only --profile-prefill dam --out $R/trace-32k
run trace-131k 240 python3 benchmarks/generate.py --lengths 131072 --variants dam --recommended --profile $P \
    --no-attention-only --profile-prefill dam --out $R/trace-131k
echo "ALL DONE $(date +%T)"
