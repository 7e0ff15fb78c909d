#!/usr/bin/env bash
# One call: the compiled GPU tests of the selection and decode paths, the decode step's launch settings swept
# (benchmarks/decode_step.py --sweep), then end to end at 32K and 131K with the fastest setting of each knob (summed
# over both lengths; written to ~/res/knobs.json, to become the code's defaults), dense, the no-op floor and DAM in
# one run. Results under ~/res.
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_bit_search.py \
    tests/dam_kernels/test_select_mass.py tests/dam_kernels/test_select_kernel.py tests/dam_kernels/test_select_rows.py \
    tests/dam_kernels/test_decode_full_heads.py tests/runtime/test_dynamic_decode.py
run decode-sweep 300 python3 benchmarks/decode_step.py --lengths 32768,131072 --sweep --out $R
python3 - <<'PY'
import json, os, re
rows = json.load(open(os.path.expanduser("~/res/decode-step.json")))["rows"]
def best(pattern):
    keys = [k for k in rows[0] if re.fullmatch(pattern, k)]
    return min(keys, key=lambda k: sum(r[k] for r in rows))
warps, ways = re.fullmatch(r"mass_rule_(\d+)_warps_(\d+)_ways_ms", best(r"mass_rule_\d+_warps_\d+_ways_ms")).groups()
chunk = re.fullmatch(r"union_chunk_(\d+)_ms", best(r"union_chunk_\d+_ms")).group(1)
sweep = re.fullmatch(r"kernel_with_heads_sweep_(\d+)_ms", best(r"kernel_with_heads_sweep_\d+_ms")).group(1)
knobs = {"MASS_RULE_WARPS": int(warps), "MAX_WAYS": int(ways), "UNION_CHUNK": int(chunk),
         "FULL_SWEEP_PROGRAMS": int(sweep)}
json.dump(knobs, open(os.path.expanduser("~/res/knobs.json"), "w"))
print("knobs", knobs)
PY
run generate 300 python3 -c "
import json, os, runpy, sys
sys.path.insert(0, 'benchmarks')
import checkout; checkout.use_checkout()
from dam_kernels import bit_search, decode, select, select_mass
k = json.load(open(os.path.expanduser('~/res/knobs.json')))
select_mass.MASS_RULE_WARPS, bit_search.MAX_WAYS = k['MASS_RULE_WARPS'], k['MAX_WAYS']
select.UNION_CHUNK, decode.FULL_SWEEP_PROGRAMS = k['UNION_CHUNK'], k['FULL_SWEEP_PROGRAMS']
print('knobs', k, flush=True)
sys.argv = ['generate.py', '--lengths', '32768,131072', '--variants', 'dense,noop,dam', '--cuda-graph',
            '--recommended', '--profile', '$P', '--no-attention-only', '--out', os.path.expanduser('~/res')]
runpy.run_path('benchmarks/generate.py', run_name='__main__')
"
echo "ALL DONE $(date +%T)"
