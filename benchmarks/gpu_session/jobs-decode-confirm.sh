#!/usr/bin/env bash
# A GPU job list (about 2 minutes, no model file): one decode step's attention and the llama-1b shape end to end at
# 32K and 131K (dense, no-op floor, DAM; `--cuda-graph`, the recommended setting), for issue 19's prefill and decode
# figures on the card that comes (the H200 confirmation when it is one). Run in one call with
# `JOBS=jobs-decode-confirm.sh bash benchmarks/gpu_session/launch.sh && bash benchmarks/gpu_session/wait_done.sh`.
cd ~/src && . scripts/job-helpers.sh
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile profiles/smollm2-135m-instruct.safetensors --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
