#!/usr/bin/env bash
# The detached GPU job list of the last session: Gemma 3 at 32K end to end once more (two earlier runs of the same
# code gave 0.74x and 1.16x dense's first token), then SmolLM2's held-out suite at 2K and 4K on split A with 6
# prompts a task (the 3 of earlier runs and 3 more): full attention, the default and StreamingLLM at its density.
# (The session's earlier list, with whole-prefill traces of the 1B shape and Gemma 3 and Gemma's held-out suite at
# 4 prompts a task, is this file's previous version in git.) Results under ~/res. Copy and edit for a new session;
# to choose settings mid-session, wait on a marker that `update.sh` touches and run the later jobs from ~/src-next.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors; PP=profiles/smollm2-135m-instruct-paper.safetensors

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
run gm-bench 300 python3 benchmarks/long_context.py --model $M --profile $GP --lengths 32640 --new-tokens 32 \
    --cuda-graph --out $R/gm-bench

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
S=$HOME/stash/smollm2.gguf
sm() { run sm-$1-$2 480 $DAM eval -p $PP --options-profile $P \
      --methods full,dam-options-dynamic,streaming-options-dynamic --model $S --tasks suite --split heldout-$2 \
      --per-task 6 --device cuda --cuda-graph --lengths $1 -o $R/sm-$1-$2.json; }
sm 2048 a; sm 4096 a
echo "ALL DONE $(date +%T)"
