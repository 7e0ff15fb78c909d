#!/usr/bin/env bash
# A short GPU job list without model files: the estimate's compiled tests, its cost at its default tiles against
# dense attention for the variants of `antidiag_speed.py --variants` (one row group in 2, 4 or 8 estimated; groups
# of 16) on both shapes, and the llama-1b shape end to end at 32K and 131K with the shipped default. Results under
# ~/res; run with `JOBS=jobs-estimate-speed.sh bash benchmarks/gpu_session/launch.sh`.
set -u
cd ~/src
mkdir -p ~/shim && ln -sfn ~/src/dam_cli ~/shim/dam_cli && ln -sfn ~/src/kernels ~/shim/dam_kernels
export PYTHONPATH=/tmp/site:$HOME/shim DAM_CACHE=$HOME/cache PYTHONUNBUFFERED=1
R=~/res
run() { local name=$1 lim=$2; shift 2; echo "== $(date +%T) start $name"; timeout "$lim" "$@" > "$R/$name.log" 2>&1;
        local rc=$?; echo "== $(date +%T) end $name rc=$rc"; tail -n 3 "$R/$name.log"; return $rc; }
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
TRITON_INTERPRET=0 run gpu-tests 200 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_kernel.py \
    tests/dam_kernels/test_antisum.py
run estimate-speed 200 python3 benchmarks/antidiag_speed.py --no-sweep --out $R/estimate-speed
run gen-antisum 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --out $R/gen-antisum
echo "ALL DONE $(date +%T)"
