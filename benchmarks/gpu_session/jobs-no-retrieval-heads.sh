#!/usr/bin/env bash
# A GPU job list (about 17 minutes; SmolLM2's parts p0..p2 then SALL, Gemma's g0..g6 then GALL; the experiment's
# profile in the stash through EXTRA=.gpu/exp) for the code of the tail mass kernel and the estimate's chunk path:
# 1. the compiled tests of the estimate, the tail mass and the exact selection;
# 2. the llama-1b shape end to end at 32K and 131K with the shipped profile (dense, no-op floor, DAM) and with the
#    same recipe without retrieval heads (`dam profile --retrieval-heads 0 --runtime recommended -o
#    .gpu/exp/smollm2-noretr.safetensors`: the 16 dense heads become ordinary DAM heads with the dynamic part),
#    issue 19's "retrieval heads need not be dense" (on the CPU it lost at 2K: accuracy.md; this says what it buys);
# 3. SmolLM2's suite on the development split at 8K, 4K and 2K, full attention against both profiles run as
#    `dam generate` runs them (`dam-dynamic`, `dam-options-dynamic`; 4 prompts a task, all nine families);
# 4. the estimate's tile sweep (the flat loop included) with `pick_tiles.py`, the decode step, the llama-1b shape
#    again from the picked code; 5. Gemma 3 end to end with a global layer's trace.
# Run with `EXTRA=.gpu/exp JOBS=jobs-no-retrieval-heads.sh bash benchmarks/gpu_session/launch.sh .gpu/p0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
N=$HOME/stash/smollm2-noretr.safetensors
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider $EST tests/dam_kernels/test_block_mass.py \
    tests/dam_kernels/test_tail_mass.py tests/dam_kernels/test_dynamic_exact.py
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
run generate-noretr 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,dam --cuda-graph \
    --recommended --profile $N --no-attention-only --out $R/generate-noretr
wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
run suite-noretr 560 $DAM eval -p $P --options-profile $N --model $HOME/stash/smollm2.gguf --device cuda \
    --cuda-graph --tasks suite --per-task 4 --lengths 8000,4096,2048 --split development \
    --methods full,dam-dynamic,dam-options-dynamic -o $R/suite-noretr.json
echo "NORETR DONE $(date +%T)"
sweep_pick_measure $EST
gemma_bench
echo "ALL DONE $(date +%T)"
