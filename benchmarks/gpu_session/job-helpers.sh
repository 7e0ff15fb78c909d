#!/usr/bin/env bash
# Sourced by every job list (`. scripts/job-helpers.sh` from ~/src): the environment (the code in ~/src through links
# that name `kernels/` `dam_kernels`, the carried wheels in /tmp/site), `run NAME SECONDS CMD...` (the output to
# ~/res/NAME.log, start and end lines with the exit code), `wait_for FILE`, `join PREFIX FILE SHA256` (model parts
# from ~/stash joined and checked), `alone CMD...` (CMD with every running `dam` process paused by SIGSTOP and
# resumed after it: a timing started from a mid-session `run` call while a job list's `dam eval` runs has the card
# to itself), `gemma_bench` (once Gemma's parts are all there, GALL: joined, then Gemma 3 end to end at 16K and 32K
# with a trace of a global layer, `long_context.py`, into ~/res/gm-bench), `sweep_pick_measure TESTS...` (the summed
# estimate's tile sweep, `pick_tiles.py` writing a faster setting into ~/src-next and the job going on from there,
# TESTS compiled where it picked one, then the decode step and the llama-1b shape end to end at 32K and 131K), and
# the versions and card printed first.
set -u
cd ~/src
mkdir -p ~/shim ~/res && ln -sfn ~/src/dam_cli ~/shim/dam_cli && ln -sfn ~/src/kernels ~/shim/dam_kernels
export PYTHONPATH=/tmp/site:$HOME/shim DAM_CACHE=$HOME/cache PYTHONUNBUFFERED=1
DAM="bash scripts/dam.sh"
R=~/res
run() { local name=$1 lim=$2; shift 2; echo "== $(date +%T) start $name"; timeout "$lim" "$@" > "$R/$name.log" 2>&1;
        local rc=$?; echo "== $(date +%T) end $name rc=$rc"; tail -n 3 "$R/$name.log"; return $rc; }
alone() { local pids; pids=$(pgrep -f dam_cli.cli.app || true); [ -n "$pids" ] && kill -STOP $pids; "$@";
          local rc=$?; [ -n "$pids" ] && kill -CONT $pids; return $rc; }
wait_for() { while [ ! -e "$1" ]; do sleep 2; done; }
join() { cat ~/stash/$1.? > ~/stash/$2 && echo "$3  $HOME/stash/$2" | sha256sum -c - || { echo "BAD $2"; return 1; }; }
sweep_pick_measure() {
    run sweep 420 python3 benchmarks/antidiag_speed.py --only-summed --variants "" --lengths 32768,131072 --out $R/sweep
    rm -rf ~/src-next && cp -r ~/src ~/src-next
    python3 scripts/pick_tiles.py $R/sweep/bench-antidiag.json --apply ~/src-next 2>&1 | tee $R/picked.txt
    cd ~/src-next && ln -sfn ~/src-next/dam_cli ~/shim/dam_cli && ln -sfn ~/src-next/kernels ~/shim/dam_kernels
    grep -n "^NARROW_TILES\|^WIDE_HEAD_TILES" kernels/antisum.py | tee -a $R/picked.txt
    grep -q "no setting beats" $R/picked.txt || TRITON_INTERPRET=0 run est-tests 240 python3 -m pytest -q \
        -p no:cacheprovider "$@"
    run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
    run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
        --recommended --profile profiles/smollm2-135m-instruct.safetensors --no-attention-only --out $R/generate
    echo "LLAMA DONE $(date +%T)"
}
gemma_bench() { wait_for ~/stash/GALL; join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 &&
                run gm-bench 300 python3 benchmarks/long_context.py --model $HOME/stash/gemma.gguf \
                    --profile profiles/gemma3-270m.safetensors --lengths 16381,32621 --new-tokens 32 --cuda-graph \
                    --trace --out $R/gm-bench; }
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
