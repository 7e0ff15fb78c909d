#!/usr/bin/env bash
# A GPU job list (about 15 minutes; Gemma's parts g0..g6 then GALL, as DEVELOPERS.md says) for the code whose prompt
# tail's exact block mass runs in Triton (`kernels/tail_mass.py`) and whose summed estimate folds the row groups'
# scores into its product loop: the compiled tests of the estimate, the tail mass and the exact selection; one
# decode step's attention and the llama-1b shape end to end at 32K and 131K (dense, no-op floor, DAM: issue 19's
# prefill and decode figures on this card); Gemma 3 end to end at 16K and 32K with a global layer's trace; then
# every kernel and runtime GPU test compiled. Run with `JOBS=jobs-tail-kernel.sh bash .../launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider $EST tests/dam_kernels/test_block_mass.py \
    tests/dam_kernels/test_tail_mass.py tests/dam_kernels/test_dynamic_exact.py
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile profiles/smollm2-135m-instruct.safetensors --no-attention-only --out $R/generate
echo "LLAMA DONE $(date +%T)"
gemma_bench
TRITON_INTERPRET=0 run all-gpu-tests 420 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels \
    tests/runtime/test_static_decode.py tests/runtime/test_batches.py::test_cuda_batches_equal_each_prompt_alone
echo "ALL DONE $(date +%T)"
