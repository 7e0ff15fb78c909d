#!/usr/bin/env bash
# The decode step and end to end at 32K and 131K with the code's defaults (those jobs-decode-tune.sh chose), dense,
# the no-op floor and DAM in one run, then the compiled tests of the decode paths. Results under ~/res.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 300 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R
run generate 300 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_decode_full_heads.py \
    tests/dam_kernels/test_bit_search.py tests/dam_kernels/test_select_mass.py tests/runtime/test_dynamic_decode.py
echo "ALL DONE $(date +%T)"
