#!/usr/bin/env bash
# A GPU job list: the suite's memo task (its cue, since 2026-12-06, the needle's own words "The code is") on held-out
# split A with many prompts a length. Gemma 3 270M at 16K and 32K (full attention, DAM, StreamingLLM at DAM's
# density at 16K); then SmolLM2: the prompt's share of estimated mass (--dynamic-mass 0.9, the default, against 0.95
# and 0.98) on the whole suite's DEVELOPMENT split at 2K and 4K (a candidate is chosen on these alone), then the memo
# on held-out A at 2K, 4K and 8K. Model parts as DEVELOPERS.md says (GALL first, then SALL).
# Results under ~/res; run with `JOBS=jobs-memo.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
gm() { local len=$1 n=$2 methods=$3; run gm-memo-heldout-a-$len 540 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods $methods --tasks memo --split heldout-a --per-task $n --prompt-form completion --lengths $len \
      --device cuda --dtype bfloat16 --cuda-graph -o $R/gm-memo-heldout-a-$len.json; }
gm 16384 64 full,dam-options-dynamic,streaming-options-dynamic
gm 32641 64 full,dam-options-dynamic

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SM="-p profiles/smollm2-135m-instruct-paper.safetensors --options-profile profiles/smollm2-135m-instruct.safetensors
    --model $HOME/stash/smollm2.gguf --device cuda --cuda-graph"
dev() { local name=$1; shift; run sm-dev-suite-$name 300 $DAM eval $SM --tasks suite --split development --per-task 4 \
        --lengths 2048,4096 "$@" -o $R/sm-dev-suite-$name.json; }
dev default --methods full,dam-options-dynamic
dev mass-0.95 --methods dam-options-dynamic --dynamic-mass 0.95
dev mass-0.98 --methods dam-options-dynamic --dynamic-mass 0.98
run sm-memo-heldout-a 420 $DAM eval $SM --methods full,dam-options-dynamic,streaming-options-dynamic --tasks memo \
    --split heldout-a --per-task 48 --lengths 2048,4096,8000 -o $R/sm-memo-heldout-a.json
echo "ALL DONE $(date +%T)"
