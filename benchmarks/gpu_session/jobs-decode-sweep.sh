#!/usr/bin/env bash
# The decode step's launch settings (benchmarks/decode_step.py --sweep): the mass rule's warps and search ways, the
# union's chunk, the full heads' sweep programs; after the compiled GPU tests of the selection paths. Results in ~/res.
cd ~/src && . scripts/job-helpers.sh
TRITON_INTERPRET=0 run gpu-tests 400 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_bit_search.py \
    tests/dam_kernels/test_select_mass.py tests/dam_kernels/test_select_kernel.py tests/dam_kernels/test_select_rows.py \
    tests/dam_kernels/test_decode_full_heads.py
run decode-sweep 400 python3 benchmarks/decode_step.py --lengths 32768,131072 --sweep --out $R
echo "ALL DONE $(date +%T)"
