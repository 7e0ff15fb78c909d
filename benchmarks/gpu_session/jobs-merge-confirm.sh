#!/usr/bin/env bash
# The shortest confirmation of the merge in one launch and the decode targets (no model files, about 2 minutes): its
# compiled tests, `merge_speed.py`, one decode step's attention and the llama-1b shape end to end at 32K and 131K
# (dense, the no-op floor, DAM) with the code's defaults; on an H200 the decode targets' confirmation. Results under
# ~/res; run with `JOBS=jobs-merge-confirm.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 120 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_merge_layout.py
run merge-speed 120 python3 benchmarks/merge_speed.py --lengths 32768,131072 --out $R/merge-speed
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
