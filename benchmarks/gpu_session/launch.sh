#!/usr/bin/env bash
# First call: install carried wheels, copy the code to ~/src, stash the part in $1 (and the files of $EXTRA, if
# set), start jobs detached.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p ~/src ~/res ~/stash ~/bin
rm -rf ~/src/*
cp -r dam_cli kernels benchmarks profiles tests pyproject.toml ~/src/ && cp -r "$(dirname "$0")" ~/src/scripts
[ -n "${1:-}" ] && cp "$1"/* ~/stash/
[ -n "${EXTRA:-}" ] && cp "$EXTRA"/* ~/stash/  # a file the job list reads (a profile), if any
ls -la ~/stash
nvidia-smi --query-gpu=name,memory.total --format=csv
cd ~/src && setsid nohup bash scripts/${JOBS:-jobs-example.sh} > ~/res/log 2>&1 < /dev/null &
sleep 2; cat ~/res/log
