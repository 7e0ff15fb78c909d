#!/usr/bin/env bash
# The short form of jobs-estimate-h200.sh (about 5 minutes, no model file): the compiled tests of the estimate (its
# default chunk shrunk to the head dim, the flat loop) and of the exact scores on TF32 cores, the estimate's tile
# sweep with the chunked and flat settings (`pick_tiles.py` writes a faster one, if any, into ~/src-next, whose
# estimate tests then run), then the llama-1b shape end to end at 32K and 131K from that code. Results under ~/res;
# run with `JOBS=jobs-estimate-confirm.sh bash benchmarks/gpu_session/launch.sh`.
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
run generate 240 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph \
    --recommended --profile $P --no-attention-only --out $R/generate
echo "ALL DONE $(date +%T)"
