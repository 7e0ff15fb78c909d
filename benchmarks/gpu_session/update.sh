#!/usr/bin/env bash
# Mid-session call: copy this call's code to ~/src-next (jobs still running keep ~/src) and touch ~/stash/$1, the
# marker a job list waits on before it runs its later jobs from the new code.
set -u
rm -rf ~/src-next && mkdir -p ~/src-next
cp -r dam_cli kernels benchmarks profiles tests pyproject.toml ~/src-next/ && cp -r "$(dirname "$0")" ~/src-next/scripts
touch ~/stash/"${1:-NEXT}"
tail -5 ~/res/log
