#!/usr/bin/env bash
# The shortest confirmation (no model files, about 90 s): one decode step's attention and the llama-1b shape end to
# end at 32K and 131K (dense, the no-op floor, DAM) with the code's defaults. Results under ~/res; run with
# `JOBS=jobs-decode-short.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
