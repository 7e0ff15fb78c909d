#!/usr/bin/env bash
# A GPU job list: the question's blocks as vertical lines for every prompt block (`DAM_SELECT_RULE=verticals` of
# benchmarks/select_rule_eval.py: the blocks the prompt's last query block chose by exact mass joined to every
# earlier query block's, MInference's idea on top of the summed estimate) against the shipped default on SmolLM2's
# suite at 2K, 4K and 8K, 4 prompts a task; first the decode confirmation of jobs-decode-short.sh (no model file).
# The development split decides (fixed before the run: adopted only if it keeps more of full attention's answers at
# 2K and at 4K and no fewer at 8K); held-out split A is reported. Model parts: SmolLM2's (p0..p2, then SALL).
# Results under ~/res; run with `JOBS=jobs-verticals.sh bash benchmarks/gpu_session/launch.sh .gpu/p0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SM="-p profiles/smollm2-135m-instruct-paper.safetensors --options-profile $P --model $HOME/stash/smollm2.gguf
    --device cuda --cuda-graph --tasks suite --per-task 4 --lengths 2048,4096,8000"
RULE="python3 benchmarks/select_rule_eval.py eval"
run sm-development-default 420 $DAM eval $SM --split development --methods full,dam-options-dynamic \
    -o $R/sm-development-default.json
DAM_SELECT_RULE=verticals run sm-development-verticals 420 $RULE $SM --split development \
    --methods dam-options-dynamic -o $R/sm-development-verticals.json
run sm-heldout-a-default 600 $DAM eval $SM --split heldout-a \
    --methods full,dam-options-dynamic,streaming-options-dynamic -o $R/sm-heldout-a-default.json
DAM_SELECT_RULE=verticals run sm-heldout-a-verticals 420 $RULE $SM --split heldout-a \
    --methods dam-options-dynamic,streaming-options-dynamic -o $R/sm-heldout-a-verticals.json
echo "ALL DONE $(date +%T)"
