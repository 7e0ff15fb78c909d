#!/usr/bin/env bash
# A GPU job list: SmolLM2's suite on held-out split B at 2K and 4K with 6 prompts a task (54 a length over the nine
# tasks): full attention, the default and StreamingLLM at its measured density. Reported only (nothing is chosen on
# it). Model parts: SmolLM2's (p0..p2, then SALL). It uses the card: start it only once a timing job list has printed
# ALL DONE (or name it in JOBS= for launch.sh), e.g. from the last part call:
# `cp .gpu/p2/* ~/stash/ && touch ~/stash/SALL && (cd ~/src && setsid nohup bash "$PWD/benchmarks/gpu_session/jobs-split-b.sh"
# > ~/res/log-b 2>&1 < /dev/null &)`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
run sm-heldout-b-default 560 $DAM eval -p profiles/smollm2-135m-instruct-paper.safetensors --options-profile $P \
    --model $HOME/stash/smollm2.gguf --device cuda --cuda-graph --tasks suite --per-task 6 --lengths 2048,4096 \
    --split heldout-b --methods full,dam-options-dynamic,streaming-options-dynamic -o $R/sm-heldout-b-default.json
echo "SPLIT B DONE $(date +%T)"
