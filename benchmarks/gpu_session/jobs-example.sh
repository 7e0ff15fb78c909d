#!/usr/bin/env bash
# The detached GPU job list of the 2026-12-05 session (held-out suite on SmolLM2, Gemma 3 at 32K, kernel
# benchmarks), in order of need, each with its own limit; results under ~/res. Copy and edit for a new session.
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

TRITON_INTERPRET=0 run gpu-tests 240 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_select_rows.py \
    tests/dam_kernels/test_select_mass.py tests/dam_kernels/test_select_kernel.py -k "rows or 256 or mass"

wait_for ~/stash/SALL
join s smollm2.gguf b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
S=$HOME/stash/smollm2.gguf
PP=profiles/smollm2-135m-instruct-paper.safetensors; P=profiles/smollm2-135m-instruct.safetensors
G=--cuda-graph
T="--model $S --tasks suite --split heldout-a --per-task ${PER:-3} --device cuda"
PREV="--dynamic-topk 9 --dynamic-tail-topk 32 --dynamic-score mean --dynamic-tail-mass 0.9"
for L in 2048 4096 8000; do
  run sm-new-$L 480 $DAM eval -p $PP --options-profile $P \
      --methods full,dam,streaming,dam-options-dynamic,streaming-options-dynamic $T $G --lengths $L -o $R/sm-new-$L.json
  rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ -n "$G" ]; then G=""; echo "graph off from here"
    run sm-new-$L 480 $DAM eval -p $PP --options-profile $P \
      --methods full,dam,streaming,dam-options-dynamic,streaming-options-dynamic $T --lengths $L -o $R/sm-new-$L.json
  fi
done

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors
run gm-bench 300 python3 benchmarks/long_context.py --model $M --profile $GP --lengths 32640 --new-tokens 32 \
    --cuda-graph --trace --out $R/gm-bench
gm() { run gm-$1 480 $DAM eval --model $M -p $GP --options-profile $GP \
      --methods full,dam-options-dynamic,streaming-options-dynamic --tasks suite --split heldout-a \
      --per-task ${GPER:-2} --prompt-form completion --lengths $1 --device cuda --dtype bfloat16 $G -o $R/gm-$1.json; }
gm 32641; gm 16384
run antidiag 240 python3 benchmarks/antidiag_speed.py --lengths 32768,131072 --out $R/antidiag
run gen-bench 420 python3 benchmarks/generate.py --preset llama-1b --lengths 32768,131072 --profile profiles/smollm2-135m-instruct.safetensors --recommended --cuda-graph \
    --out $R/gen-bench
for L in 2048 4096 8000; do
  run sm-prev-$L 300 $DAM eval -p $PP --options-profile $P --methods dam-options-dynamic,streaming-options-dynamic \
      $T $G --lengths $L $PREV -o $R/sm-prev-$L.json
done
gm 8192; gm 4096
echo "ALL DONE $(date +%T)"
