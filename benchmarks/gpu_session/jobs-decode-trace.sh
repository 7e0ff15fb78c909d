#!/usr/bin/env bash
# A GPU job list without model files: where a decode step's device time goes at 32K and 131K (llama-1b shape,
# random weights, the shipped default), dense and DAM, then the end-to-end figures under --cuda-graph. Results
# under ~/res; run with `JOBS=jobs-decode-trace.sh bash benchmarks/gpu_session/launch.sh`.
set -u
cd ~/src
mkdir -p ~/shim && ln -sfn ~/src/dam_cli ~/shim/dam_cli && ln -sfn ~/src/kernels ~/shim/dam_kernels
export PYTHONPATH=/tmp/site:$HOME/shim DAM_CACHE=$HOME/cache PYTHONUNBUFFERED=1
R=~/res
run() { local name=$1 lim=$2; shift 2; echo "== $(date +%T) start $name"; timeout "$lim" "$@" > "$R/$name.log" 2>&1;
        local rc=$?; echo "== $(date +%T) end $name rc=$rc"; tail -n 3 "$R/$name.log"; return $rc; }
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
run trace-32k 240 python3 benchmarks/generate.py --lengths 32768 --variants dense,dam --cuda-graph --recommended \
    --no-attention-only --profile-decode dense,dam --out $R/trace-32k
run trace-131k 240 python3 benchmarks/generate.py --lengths 131072 --variants dense,dam --cuda-graph --recommended \
    --no-attention-only --profile-decode dense,dam --out $R/trace-131k
echo "ALL DONE $(date +%T)"
