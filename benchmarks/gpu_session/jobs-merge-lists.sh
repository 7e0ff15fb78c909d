#!/usr/bin/env bash
# A GPU job list (no model file, about 2.5 minutes): the compiled tests of the dynamic part's prefill (the selected
# blocks merged into the layout on index lists, `dynamic.merge_layout`), then the llama-1b shape end to end at 32K
# and 131K (dense, the no-op floor, DAM) with the code's defaults. Results under ~/res; run with
# `JOBS=jobs-merge-lists.sh bash benchmarks/gpu_session/launch.sh`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 200 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_merge_layout.py \
    tests/dam_kernels/test_dynamic.py tests/dam_kernels/test_dynamic_window.py tests/dam_kernels/test_dynamic_exact.py
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
