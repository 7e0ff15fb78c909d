#!/usr/bin/env bash
# Mid-session: pause the running `dam eval` jobs (SIGSTOP), time the whole tail's decode on an idle card, go on.
cd ~/src && . scripts/job-helpers.sh
pids=$(pgrep -f "dam_cli.cli.app" || true)
[ -n "$pids" ] && kill -STOP $pids
G="python3 benchmarks/generate.py --lengths 32768,131072 --cuda-graph --recommended --profile profiles/smollm2-135m-instruct.safetensors"
run gen-default 300 $G --variants dense,noop,dam --out $R/gen-default
run gen-whole-tail 200 $G --variants dam --tail 1.0,64 --out $R/gen-whole-tail
[ -n "$pids" ] && kill -CONT $pids
echo "GEN DONE $(date +%T)"
