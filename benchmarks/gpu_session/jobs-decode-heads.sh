#!/usr/bin/env bash
# The retrieval heads inside the split-K decode kernel (dam_cli.runtime.full_heads): the compiled GPU tests of the
# decode paths, one decode step's attention under a CUDA graph (benchmarks/decode_step.py: DAM, its parts, the heads
# after the kernel as before, dense), then end to end at 32K and 131K with the heads inside and after, dense and the
# no-op floor in the same run. Results under ~/res.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_decode_full_heads.py \
    tests/runtime/test_dynamic_decode.py tests/dam_kernels/test_select_mass.py tests/runtime/test_static_decode.py \
    tests/dam_kernels/test_window_softcap.py
run decode-step 300 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R
run generate 540 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam-heads-after,dam \
    --cuda-graph --recommended --profile $P --no-attention-only --out $R
echo "ALL DONE $(date +%T)"
