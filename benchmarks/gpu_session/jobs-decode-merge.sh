#!/usr/bin/env bash
# A short GPU job list (no model file, about 2 minutes): jobs-decode-short.sh's decode confirmation (one decode
# step's attention, then the llama-1b shape end to end at 32K and 131K: dense, the no-op floor, DAM with the code's
# defaults), then the selection's merge into the layout on index lists against the merge on block maps, the same
# layouts and selection in one run (`benchmarks/merge_speed.py`). Results under ~/res; run with
# `JOBS=jobs-decode-merge.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
run merge-speed 120 python3 benchmarks/merge_speed.py --lengths 32768,131072 --layers 4 --out $R/merge-speed
echo "ALL DONE $(date +%T)"
