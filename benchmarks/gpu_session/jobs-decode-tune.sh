#!/usr/bin/env bash
# One call: the compiled GPU tests of the selection and decode paths, the decode step's launch settings swept
# (benchmarks/decode_step.py --sweep), then end to end at 32K and 131K with the fastest value of each module constant
# (summed over both lengths; ~/res/knobs.json, to become the code's defaults), dense, the no-op floor and DAM in one
# run. Results under ~/res. (The 2026-12-07 run of this list also swept an 8-way search, since removed.)
cd ~/src && . scripts/job-helpers.sh
P=profiles/smollm2-135m-instruct.safetensors
TRITON_INTERPRET=0 run gpu-tests 300 python3 -m pytest -q -p no:cacheprovider tests/dam_kernels/test_bit_search.py \
    tests/dam_kernels/test_select_mass.py tests/dam_kernels/test_select_kernel.py tests/dam_kernels/test_select_rows.py \
    tests/dam_kernels/test_decode_full_heads.py tests/runtime/test_dynamic_decode.py
run decode-sweep 300 python3 benchmarks/decode_step.py --lengths 32768,131072 --sweep --out $R
python3 - <<'PY'
import json, os, re
rows = json.load(open(os.path.expanduser("~/res/decode-step.json")))["rows"]
knobs = {}
for module, name, label in (("select_mass", "MASS_RULE_WARPS", r"mass_rule_(\d+)_warps_ms"),
                            ("select", "UNION_CHUNK", r"union_chunk_(\d+)_ms"),
                            ("decode", "FULL_SWEEP_PROGRAMS", r"kernel_with_heads_sweep_(\d+)_ms")):
    keys = [k for k in rows[0] if re.fullmatch(label, k)]
    best = min(keys, key=lambda k: sum(r[k] for r in rows))
    knobs[f"{module}.{name}"] = int(re.fullmatch(label, best).group(1))
json.dump(knobs, open(os.path.expanduser("~/res/knobs.json"), "w"))
print("knobs", knobs)
PY
run generate 300 python3 -c "
import importlib, json, os, runpy, sys
sys.path.insert(0, 'benchmarks')
import checkout; checkout.use_checkout()
k = json.load(open(os.path.expanduser('~/res/knobs.json')))
for key, value in k.items():
    module, name = key.split('.')
    setattr(importlib.import_module('dam_kernels.' + module), name, value)
print('knobs', k, flush=True)
sys.argv = ['generate.py', '--lengths', '32768,131072', '--variants', 'dense,noop,dam', '--cuda-graph',
            '--recommended', '--profile', '$P', '--no-attention-only', '--out', os.path.expanduser('~/res')]
runpy.run_path('benchmarks/generate.py', run_name='__main__')
"
echo "ALL DONE $(date +%T)"
