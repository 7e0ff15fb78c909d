#!/usr/bin/env bash
# A GPU job list: where a decode step's device time goes (llama-1b shape at 32K and 131K, random weights, the
# shipped default, dense and DAM), then the suite's memo task (a five-digit code in a memo of varied prose, the
# probe the issues measured with) on held-out split A: Gemma 3 at 16K and 32K, SmolLM2 at 2K, 4K and 8K, full
# attention, the default and StreamingLLM at its density. Model parts as DEVELOPERS.md says (GALL, then SALL).
# Results under ~/res; run with `JOBS=jobs-memo-and-decode.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
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

run trace-32k 200 python3 benchmarks/generate.py --lengths 32768 --variants dense,dam --cuda-graph --recommended \
    --profile $P --no-attention-only --profile-decode dense,dam --out $R/trace-32k

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
gm() { run gm-memo-$1 300 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods full,dam-options-dynamic,streaming-options-dynamic --tasks memo --split heldout-a \
      --per-task 12 --prompt-form completion --lengths $1 --device cuda --dtype bfloat16 --cuda-graph \
      -o $R/gm-memo-$1.json; }
gm 32641
gm 16384

wait_for ~/stash/SALL
join p smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
S=$HOME/stash/smollm2.gguf
run sm-memo 420 $DAM eval -p $PP --options-profile $P --model $S \
    --methods full,dam-options-dynamic,streaming-options-dynamic --tasks memo --split heldout-a \
    --per-task 12 --device cuda --cuda-graph --lengths 2048,4096,8000 -o $R/sm-memo.json
run trace-131k 200 python3 benchmarks/generate.py --lengths 131072 --variants dense,dam --cuda-graph --recommended \
    --profile $P --no-attention-only --profile-decode dense,dam --out $R/trace-131k
echo "ALL DONE $(date +%T)"
