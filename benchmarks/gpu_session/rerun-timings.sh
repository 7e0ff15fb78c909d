for i in $(seq 1 75); do grep -q "SPLIT B DONE" ~/res/log-b && break; sleep 2; done
tail -2 ~/res/log-b
cp -r tests benchmarks ~/src/ && cd ~/src && . scripts/job-helpers.sh > /dev/null
P=profiles/smollm2-135m-instruct.safetensors
run decode-step 120 python3 benchmarks/decode_step.py --lengths 32768,131072 --out $R/decode-step
run generate 200 python3 benchmarks/generate.py --lengths 32768,131072 --variants dense,noop,dam --cuda-graph --recommended --profile $P --no-attention-only --out $R/generate
run merge-speed 120 python3 benchmarks/merge_speed.py --lengths 32768,131072 --layers 4 --out $R/merge-speed
tar -czf "$OUT/res.tgz" -C ~ res
