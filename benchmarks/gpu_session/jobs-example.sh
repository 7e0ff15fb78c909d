#!/usr/bin/env bash
# The detached GPU job list of the 2026-12-06 session (the recommended set end to end on the 1B shape, batches,
# Gemma 3 at 32K and its held-out evaluation at 4K-32K), in order of need, each with its own limit; results under
# ~/res. Copy and edit for a new session.
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
P=profiles/smollm2-135m-instruct.safetensors

TRITON_INTERPRET=0 run gpu-tests 200 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_head_dims.py \
    tests/dam_kernels/test_select_rows.py tests/dam_kernels/test_select_mass.py -x
run gen-bench 420 python3 benchmarks/generate.py --preset llama-1b --lengths 32768,131072 --new-tokens 32 \
    --variants dense,noop,dam --recommended --profile $P --cuda-graph --out $R/gen-bench

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
run gm-bench 300 python3 benchmarks/long_context.py --model $M --profile $GP --lengths 32640 --new-tokens 32 \
    --cuda-graph --trace --out $R/gm-bench
gm() { run gm-$1 420 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods full,dam-options-dynamic,streaming-options-dynamic --tasks suite --split heldout-a \
      --per-task ${GPER:-2} --prompt-form completion --lengths $1 --device cuda --dtype bfloat16 --cuda-graph \
      -o $R/gm-$1.json; }
gm 32641; gm 16384
run batch 420 python3 benchmarks/batch_throughput.py --batches 1,4,16 --variants dense,dam --cuda-graph --recommended \
    --profile $P --new-tokens 32 --out $R/batch.json
gm 8192; gm 4096
run gen-trace 300 python3 benchmarks/generate.py --preset llama-1b --lengths 131072 --new-tokens 8 --variants dam \
    --recommended --profile $P --cuda-graph --profile-prefill dam --out $R/gen-trace
echo "ALL DONE $(date +%T)"
