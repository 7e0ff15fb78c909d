#!/usr/bin/env bash
# A GPU job list: the question's and decode rows' exact-mass share (the tail) on the suite's memo task (a five-digit
# code in a memo of varied prose, the probe the issues measured with). The llama-1b shape end to end at 32K and 131K
# with the tail kept whole (1.0 of the exact mass, at most 64 blocks; the prompt keeps 0.9 of its estimate) and the
# recommended one (0.9, at most 32); SmolLM2's development split (24 memo prompts a length at 2K, 4K, 8K) for both;
# held-out split A for both on SmolLM2 (2K-8K) and Gemma 3 (16K, 32K); last, SmolLM2's whole suite on split A at 4K.
# Model parts as DEVELOPERS.md says (SALL first, then GALL). Results under ~/res;
# run with `JOBS=jobs-memo-and-decode.sh bash benchmarks/gpu_session/launch.sh .gpu/p0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors; PP=profiles/smollm2-135m-instruct-paper.safetensors
T0="--dynamic-mass 0.9 --dynamic-tail-mass 0.9 --dynamic-tail-topk 32"  # the recommended setting
T1="--dynamic-mass 0.9 --dynamic-tail-mass 1.0 --dynamic-tail-topk 64"  # the tail kept whole (studied, not adopted)

run gen-tail 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --tail 1.0,64 --profile $P --out $R/gen-tail
run gen-t0.9-32 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dam --cuda-graph \
    --recommended --tail 0.9,32 --profile $P --out $R/gen-t0.9-32

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
S=$HOME/stash/smollm2.gguf
sm() { local name=$1 split=$2 methods=$3; shift 3; run sm-$name 300 $DAM eval -p $PP --options-profile $P --model $S \
      --methods $methods --tasks memo --split $split --per-task 24 --device cuda --cuda-graph \
      --lengths 2048,4096,8000 -o $R/sm-$name.json "$@"; }
sm dev-full development full
sm dev-t0.9-32 development dam-options-dynamic $T0
sm dev-t1.0-64 development dam-options-dynamic $T1
sm heldout-full-t0.9-32 heldout-a full,dam-options-dynamic $T0
sm heldout-t1.0-64 heldout-a dam-options-dynamic,streaming-options-dynamic $T1

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
gm() { local name=$1 len=$2 methods=$3; shift 3; run gm-$name-$len 300 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods $methods --tasks memo --split heldout-a --per-task 12 --prompt-form completion --lengths $len \
      --device cuda --dtype bfloat16 --cuda-graph -o $R/gm-$name-$len.json "$@"; }
gm t0.9-32 32641 full,dam-options-dynamic $T0
gm t1.0-64 32641 dam-options-dynamic,streaming-options-dynamic $T1
gm t0.9-32 16384 full,dam-options-dynamic $T0
gm t1.0-64 16384 dam-options-dynamic $T1
run sm-suite-4096 420 $DAM eval -p $PP --options-profile $P --model $S \
    --methods full,dam-options-dynamic,streaming-options-dynamic --tasks suite --split heldout-a \
    --per-task 6 --device cuda --cuda-graph --lengths 4096 -o $R/sm-suite-4096.json
echo "ALL DONE $(date +%T)"
