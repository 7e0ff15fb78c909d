#!/usr/bin/env bash
# A GPU job list (about 12 minutes; Gemma's parts as DEVELOPERS.md says, GALL) for the code whose estimate chunk
# shrinks to the head dim, whose exact tail scores run on TF32 cores, and whose one-row prefill returns the kernel's
# output, and whose prompt tail's exact mass runs in Triton (`kernels/tail_mass.py`): the compiled tests of the
# estimate and the tail mass, the estimate's tile sweep (the flat loop included; `pick_tiles.py` writes a
# faster setting, if any, into ~/src-next and its tests run there), the decode step and the llama-1b shape end to
# end from that code, Gemma 3 end to end with a global layer's trace, then every kernel and runtime GPU test
# compiled. Results under ~/res; run with `JOBS=jobs-estimate-confirm.sh bash .../launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider $EST tests/dam_kernels/test_block_mass.py \
    tests/dam_kernels/test_tail_mass.py tests/dam_kernels/test_dynamic_exact.py
sweep_pick_measure $EST
gemma_bench
TRITON_INTERPRET=0 run all-gpu-tests 480 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels \
    tests/runtime/test_static_decode.py tests/runtime/test_batches.py::test_cuda_batches_equal_each_prompt_alone
echo "ALL DONE $(date +%T)"
