#!/usr/bin/env bash
# A GPU job list: jobs-decode-merge.sh's decode confirmation and merge timing (no model file), then SmolLM2's suite at
# 4K and 8K (4 prompts a task) with the prompt's blocks capped at 64 instead of 32 (`--dynamic-topk 64`; the
# question's and decoded tokens' cap stays 32; at 2K no query block has 32 earlier blocks, so 2K is the default's).
# The development split decides (fixed before the run: adopted only if it keeps more of full attention's answers at
# 4K and no fewer at 8K); held-out split A is reported. Model parts: SmolLM2's (p0..p2, then SALL).
# Results under ~/res; run with `JOBS=jobs-prompt-cap.sh bash benchmarks/gpu_session/launch.sh .gpu/p0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
run merge-speed 120 python3 benchmarks/merge_speed.py --lengths 32768,131072 --layers 4 --out $R/merge-speed

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SM="-p profiles/smollm2-135m-instruct-paper.safetensors --options-profile $P --model $HOME/stash/smollm2.gguf
    --device cuda --cuda-graph --tasks suite --per-task 4 --lengths 4096,8000"
run sm-development-default 420 $DAM eval $SM --split development --methods full,dam-options-dynamic \
    -o $R/sm-development-default.json
run sm-development-cap64 420 $DAM eval $SM --split development --methods dam-options-dynamic --dynamic-topk 64 \
    -o $R/sm-development-cap64.json
run sm-heldout-a-default 600 $DAM eval $SM --split heldout-a \
    --methods full,dam-options-dynamic,streaming-options-dynamic -o $R/sm-heldout-a-default.json
run sm-heldout-a-cap64 420 $DAM eval $SM --split heldout-a --methods dam-options-dynamic,streaming-options-dynamic \
    --dynamic-topk 64 -o $R/sm-heldout-a-cap64.json
echo "ALL DONE $(date +%T)"
