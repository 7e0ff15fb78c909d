#!/usr/bin/env bash
# The detached GPU job list of the last session, in order of need: the llama-1b shape end to end at 32K and 131K
# with the shipped default (whole-prefill traces of DAM at 131K, of dense and DAM at 32K), Gemma 3 at 32K end to end
# with whole-prefill traces, then Gemma 3's held-out suite at 32K and 16K with 4 prompts per task (full attention,
# the default and StreamingLLM at its density). Results under ~/res. Copy and edit for a new session; to choose
# settings mid-session, wait on a marker that `update.sh` touches and run the later jobs from ~/src-next.
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

run gen 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --profile-prefill dam --out $R/gen
run gen-trace-32k 150 python3 benchmarks/generate.py --lengths 32768 --variants dam --cuda-graph --recommended \
    --profile $P --profile-prefill dense,dam --out $R/gen-trace-32k

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
run gm-bench 300 python3 benchmarks/long_context.py --model $M --profile $GP --lengths 32640 --new-tokens 32 \
    --cuda-graph --trace-prefill dense,dam --out $R/gm-bench
gm() { run gm-$1 540 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods full,dam-options-dynamic,streaming-options-dynamic --tasks suite --split heldout-a \
      --per-task ${GPER:-4} --prompt-form completion --lengths $1 --device cuda --dtype bfloat16 --cuda-graph \
      -o $R/gm-$1.json; }
gm 32641
gm 16384
echo "ALL DONE $(date +%T)"
