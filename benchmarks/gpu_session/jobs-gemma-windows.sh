#!/usr/bin/env bash
# A GPU job list: Gemma 3 270M on the suite's memo task (with its cue of that day, "The code in the memo is:") with
# many prompts a length, to tell DAM's loss from the model's own sensitivity (and the Triton path from the PyTorch
# reference's), and the windowed layers kept whole (plain windowed attention, the issue's other choice) against
# DAM's mask inside the window. First, while the model's parts come: the llama-1b shape's decode at 32K
# with a torch.profiler trace of dense and DAM steps (no model needed). Gemma's parts as DEVELOPERS.md says (GALL).
# Results under ~/res; run with `JOBS=jobs-gemma-windows.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`.
cd ~/src && . scripts/job-helpers.sh
run gen-decode-32k 240 python3 benchmarks/generate.py --lengths 32768 --variants dense,noop,dam --cuda-graph \
    --recommended --profile profiles/smollm2-135m-instruct.safetensors --profile-decode dense,dam --out $R/gen-decode

wait_for ~/stash/GALL
join g gemma.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
M=$HOME/stash/gemma.gguf; GP=profiles/gemma3-270m.safetensors; WW=$R/gemma3-270m-windows-whole.safetensors
# The shipped profile with every head of a windowed layer on the full-heads path (plain windowed attention there).
python3 - "$GP" "$WW" <<'EOF'
import dataclasses, sys, torch
from dam_cli.artifact.format import load_profile
p = load_profile(sys.argv[1])
fh = torch.tensor([[t == "sliding_attention"] * p.n_heads for t in p.meta.model["layer_types"]])
q = dataclasses.replace(p, full_heads=fh)
q.meta.recipe["retrieval_heads"] = int(fh.sum())
q.save(sys.argv[2], force=True)
EOF
gm() { local name=$1 split=$2 len=$3 n=$4 prof=$5 methods=$6; shift 6; run gm-$name-$split-$len 420 $DAM eval --model $M \
      -p $prof --options-profile $prof --methods $methods --tasks memo --split $split --per-task $n \
      --prompt-form completion --lengths $len --device cuda -o $R/gm-$name-$split-$len.json "$@"; }
B16="--dtype bfloat16 --cuda-graph"
gm default development 16384 48 $GP full,dam-options-dynamic $B16
gm windows-whole development 16384 48 $WW dam-options-dynamic $B16
gm default heldout-a 16384 64 $GP full,dam-options-dynamic $B16
gm windows-whole heldout-a 16384 64 $WW dam-options-dynamic $B16
# the same prompts through the PyTorch reference (no Triton): a GPU-path fault would show as a gap to it
gm reference heldout-a 16384 24 $GP dam-options-dynamic --dtype bfloat16 --backend reference
gm default heldout-a 32641 64 $GP full,dam-options-dynamic $B16
gm windows-whole heldout-a 32641 64 $WW dam-options-dynamic $B16
gm float32 heldout-a 16384 32 $GP full,dam-options-dynamic --dtype float32
gm windows-whole-float32 heldout-a 16384 32 $WW dam-options-dynamic --dtype float32
echo "ALL DONE $(date +%T)"
