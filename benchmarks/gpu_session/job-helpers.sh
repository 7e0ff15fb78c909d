#!/usr/bin/env bash
# Sourced by every job list (`. scripts/job-helpers.sh` from ~/src): the environment (the code in ~/src through links
# that name `kernels/` `dam_kernels`, the carried wheels in /tmp/site), `run NAME SECONDS CMD...` (the output to
# ~/res/NAME.log, start and end lines with the exit code), `wait_for FILE`, `join PREFIX FILE SHA256` (model parts
# from ~/stash joined and checked), `alone CMD...` (CMD with every running `dam` process paused by SIGSTOP and
# resumed after it: a timing started from a mid-session `run` call while a job list's `dam eval` runs has the card
# to itself), and the versions and card printed first.
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
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
