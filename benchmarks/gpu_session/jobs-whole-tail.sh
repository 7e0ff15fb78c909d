#!/usr/bin/env bash
# A GPU job list: the whole tail (the question's block and every decoded token keep all of their exact mass, at most
# 64 blocks: `--dynamic-tail-mass 1.0 --dynamic-tail-topk 64`) against the shipped default (0.9 of it, at most 32),
# first its decode cost on the llama-1b shape at 32K and 131K (dense, no-op floor, default; then the whole tail on the
# same machine), then SmolLM2's suite at 2K, 4K and 8K, 4 prompts a task: the development split (where the choice is
# made) and held-out split A (reported). Model parts: SmolLM2's only (p0..p2, then SALL).
# Results under ~/res; run with `JOBS=jobs-whole-tail.sh bash benchmarks/gpu_session/launch.sh .gpu/p0`.
cd ~/src && . scripts/job-helpers.sh
G="python3 benchmarks/generate.py --lengths 32768,131072 --cuda-graph --recommended --profile profiles/smollm2-135m-instruct.safetensors"
run gen-default 300 $G --variants dense,noop,dam --out $R/gen-default
run gen-whole-tail 200 $G --variants dam --tail 1.0,64 --out $R/gen-whole-tail

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
SM="-p profiles/smollm2-135m-instruct-paper.safetensors --options-profile profiles/smollm2-135m-instruct.safetensors
    --model $HOME/stash/smollm2.gguf --device cuda --cuda-graph"
TAIL="--dynamic-tail-mass 1.0 --dynamic-tail-topk 64 --dynamic-mass 0.9"
suite() { local split=$1 name=$2; shift 2; run sm-$split-suite-$name 420 $DAM eval $SM --tasks suite --split $split \
          --per-task 4 --lengths 2048,4096,8000 "$@" -o $R/sm-$split-suite-$name.json; }
suite development default --methods full,dam-options-dynamic
suite development whole-tail --methods dam-options-dynamic $TAIL
suite heldout-a default --methods full,dam-options-dynamic,streaming-options-dynamic
suite heldout-a whole-tail --methods dam-options-dynamic $TAIL
echo "ALL DONE $(date +%T)"
