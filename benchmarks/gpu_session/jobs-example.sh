#!/usr/bin/env bash
# The detached GPU job list of the last 2026-12-06 session: the summed-antidiagonal kernel's GPU tests at a prompt's
# length, the recommended set end to end on the 1B shape, then the held-out suite on SmolLM2 with every peer. Results
# under ~/res. Copy and edit for a new session; to choose settings mid-session, wait on a marker that `update.sh`
# touches and run the later jobs from ~/src-next.
set -u
cd ~/src
mkdir -p ~/shim && ln -sfn ~/src/dam_cli ~/shim/dam_cli && ln -sfn ~/src/kernels ~/shim/dam_kernels
export PYTHONPATH=/tmp/site:$HOME/shim DAM_CACHE=$HOME/cache PYTHONUNBUFFERED=1
DAM="bash scripts/dam.sh"
R=~/res
run() { local name=$1 lim=$2; shift 2; echo "== $(date +%T) start $name"; timeout "$lim" "$@" > "$R/$name.log" 2>&1;
        local rc=$?; echo "== $(date +%T) end $name rc=$rc"; tail -n 3 "$R/$name.log"; return $rc; }
wait_for() { while [ ! -e "$1" ]; do sleep 2; done; }
join() { cat ~/stash/$1.? > ~/stash/$2 && echo "$3  $HOME/stash/$2" | sha256sum -c - || { echo "BAD $2"; return 1; }; }
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
P=profiles/smollm2-135m-instruct.safetensors; PP=profiles/smollm2-135m-instruct-paper.safetensors

TRITON_INTERPRET=0 run gpu-tests 120 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_kernel.py \
    -k "prompts_length"
run gen-bench 240 python3 benchmarks/generate.py --preset llama-1b --lengths 32768,131072 --new-tokens 32 \
    --variants dense,noop,dam --recommended --profile $P --cuda-graph --out $R/gen-bench

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
S=$HOME/stash/smollm2.gguf
T="--model $S --tasks suite --split heldout-a --per-task ${PER:-3} --device cuda --cuda-graph"
for L in 2048 4096 8000; do
  run sm-$L 420 $DAM eval -p $PP --options-profile $P \
      --methods full,dam,streaming,dam-options-dynamic,streaming-options-dynamic $T --lengths $L -o $R/sm-$L.json
done

echo "ALL DONE $(date +%T)"
