#!/usr/bin/env bash
# A GPU job list (about 8 minutes; Gemma's parts as DEVELOPERS.md says, GALL) for the code with the summed estimate's
# chunked tiles as defaults and the exact scores on TF32 cores: their compiled tests, the estimate's tile sweep with
# more settings (`pick_tiles.py` writes a faster one, if any, into ~/src-next, whose estimate tests then run), then
# from that code one decode step's attention, the llama-1b shape end to end at 32K and 131K (dense, the no-op floor,
# DAM, with the work bound) and Gemma 3 end to end at 16K and 32K with a trace of a global layer. Meant for an H200
# (issue 19's card). Results under ~/res; run with `JOBS=jobs-estimate-h200.sh bash .../launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
EST="tests/dam_kernels/test_antisum_kernel.py tests/dam_kernels/test_antisum_partials.py"
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider $EST tests/dam_kernels/test_block_mass.py
run sweep 420 python3 benchmarks/antidiag_speed.py --only-summed --variants "" --lengths 32768,131072 --out $R/sweep
rm -rf ~/src-next && cp -r ~/src ~/src-next
python3 scripts/pick_tiles.py $R/sweep/bench-antidiag.json --apply ~/src-next 2>&1 | tee $R/picked.txt
cd ~/src-next && ln -sfn ~/src-next/dam_cli ~/shim/dam_cli && ln -sfn ~/src-next/kernels ~/shim/dam_kernels
grep -n "^NARROW_TILES\|^WIDE_HEAD_TILES" kernels/antisum.py | tee -a $R/picked.txt
grep -q "no setting beats" $R/picked.txt || TRITON_INTERPRET=0 run est-tests 240 python3 -m pytest -q \
    -p no:cacheprovider $EST
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
