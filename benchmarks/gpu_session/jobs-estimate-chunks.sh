#!/usr/bin/env bash
# A GPU job list (about 9 minutes; Gemma's parts as DEVELOPERS.md says, GALL): the compiled tests of the merge in one
# launch and of the summed estimate (with its chunked products, `bk`), `merge_speed.py`, then the estimate's tile
# sweep at head dims 64 and 256 (32K and 131K, `antidiag_speed.py --only-summed`); `pick_tiles.py` writes the winners
# into a copy of the code (~/src-next), whose estimate tests, decode step, llama-1b end to end (dense, the no-op
# floor, DAM: the work bound's first figure) and Gemma 3 end to end at 16K and 32K with a trace of a global layer
# follow. Results under ~/res; run with `JOBS=jobs-estimate-chunks.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 240 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_merge_layout.py \
    $EST
run merge-speed 120 python3 benchmarks/merge_speed.py --lengths 32768,131072 --out $R/merge-speed
sweep_pick_measure $EST tests/dam_kernels/test_head_dims.py
gemma_bench
echo "ALL DONE $(date +%T)"
