#!/usr/bin/env bash
# The detached GPU job list of the 2026-12-06 evening session, in order of need: the summed-antidiagonal kernel's GPU
# tests (every shape, compiled), its speed sweep on both shapes, the held-out suite on SmolLM2 at 4K and 8K with every
# peer, Gemma 3 at 32K end to end and its held-out evaluation at 32K and 16K, batches at 32K. Results under ~/res.
# Copy and edit for a new session; to choose settings mid-session, wait on a marker that `update.sh` touches and run
# the later jobs from ~/src-next.
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

TRITON_INTERPRET=0 run gpu-tests 150 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_kernel.py
run antisum-speed 150 python3 benchmarks/antidiag_speed.py --out $R/antisum-speed

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
S=$HOME/stash/smollm2.gguf
T="--model $S --tasks suite --split heldout-a --per-task 3 --device cuda --cuda-graph"
sm() { run sm-$1 420 $DAM eval -p $PP --options-profile $P \
      --methods full,dam,streaming,dam-options-dynamic,streaming-options-dynamic $T --lengths $1 -o $R/sm-$1.json; }
sm 4096

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
run gm-bench 300 python3 benchmarks/long_context.py --model $M --profile $GP --lengths 32640 --new-tokens 32 \
    --cuda-graph --trace --out $R/gm-bench
sm 8000
gm() { run gm-$1 420 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods full,dam-options-dynamic,streaming-options-dynamic --tasks suite --split heldout-a \
      --per-task ${GPER:-2} --prompt-form completion --lengths $1 --device cuda --dtype bfloat16 --cuda-graph \
      -o $R/gm-$1.json; }
gm 32641; gm 16384
run batch 300 python3 benchmarks/batch_throughput.py --batches 1,4,16 --variants dense,dam --cuda-graph --recommended \
    --profile $P --new-tokens 32 --out $R/batch.json
echo "ALL DONE $(date +%T)"
