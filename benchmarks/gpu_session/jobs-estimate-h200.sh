#!/usr/bin/env bash
# A GPU job list (about 7 minutes; Gemma's parts as DEVELOPERS.md says, GALL) for the code with the summed estimate's
# chunked tiles as defaults and the exact scores on TF32 cores: their compiled tests, one decode step's attention,
# the llama-1b shape end to end at 32K and 131K (dense, the no-op floor, DAM, with the work bound), then Gemma 3 end
# to end at 16K and 32K with a trace of a global layer. Meant for an H200 (issue 19's card). Results under ~/res;
# run with `JOBS=jobs-estimate-h200.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_antisum_kernel.py \
    tests/dam_kernels/test_antisum_partials.py tests/dam_kernels/test_block_mass.py
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "LLAMA DONE $(date +%T)"
wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
run gm-bench 300 python3 benchmarks/long_context.py --model $HOME/stash/gemma.gguf \
    --profile profiles/gemma3-270m.safetensors --lengths 16381,32621 --new-tokens 32 --cuda-graph --trace \
    --out $R/gm-bench
echo "ALL DONE $(date +%T)"
