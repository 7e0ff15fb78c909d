#!/usr/bin/env bash
# A GPU job list: first (no model file, about 90 s) one decode step's attention and the llama-1b shape end to end at
# 32K and 131K with the code's defaults (the H200 confirmation of the decode targets, when the card is an H200);
# then Gemma 3 270M: end to end at 16K and 32K with the one-pass summed estimate and a trace of a global layer, and
# the memo task at 32K on the DEVELOPMENT split (48 prompts): full attention, the default, and the question's rows
# (the exact tail) with a larger block budget, or all of it; then the same variants on held-out split A (64 prompts,
# the prompts of the 2026-12-06 run). Model parts as DEVELOPERS.md says (GALL).
# Results under ~/res; run with `JOBS=jobs-gemma-tail.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
run gm-bench 300 python3 benchmarks/long_context.py --model $M --profile $GP --lengths 16381,32621 --new-tokens 32 \
    --cuda-graph --trace --out $R/gm-bench
gm() { local split=$1 n=$2 name=$3 methods=$4; shift 4; run gm-memo-$split-$name 420 $DAM eval --model $M -p $GP \
      --options-profile $GP --methods $methods --tasks memo --split $split --per-task $n --prompt-form completion \
      --lengths 32641 --device cuda --dtype bfloat16 --cuda-graph -o $R/gm-memo-$split-$name.json "$@"; }
gm development 48 default full,dam-options-dynamic
gm development 48 tail-128 dam-options-dynamic --dynamic-tail-topk 128
gm development 48 tail-whole dam-options-dynamic --dynamic-tail-mass 1.0 --dynamic-tail-topk 512
gm heldout-a 64 tail-128 dam-options-dynamic --dynamic-tail-topk 128
gm heldout-a 64 tail-whole dam-options-dynamic --dynamic-tail-mass 1.0 --dynamic-tail-topk 512
echo "ALL DONE $(date +%T)"
