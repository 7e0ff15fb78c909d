#!/usr/bin/env bash
# A GPU job list (about 8 minutes; Gemma's parts as DEVELOPERS.md says, GALL) for the code with the summed estimate's
# chunked tiles as defaults and the exact scores on TF32 cores: their compiled tests, the estimate's tile sweep with
# more settings (`pick_tiles.py` writes a faster one, if any, into ~/src-next, whose estimate tests then run), then
# from that code one decode step's attention, the llama-1b shape end to end at 32K and 131K (dense, the no-op floor,
# DAM, with the work bound) and Gemma 3 end to end at 16K and 32K with a trace of a global layer. Meant for an H200
# (issue 19's card). Results under ~/res; run with `JOBS=jobs-estimate-h200.sh bash .../launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider $EST tests/dam_kernels/test_block_mass.py
sweep_pick_measure $EST
gemma_bench
echo "ALL DONE $(date +%T)"
