#!/usr/bin/env bash
# jobs-merge-one-launch.sh (no model file, about 6 minutes), then jobs-gemma-cap.sh (Gemma's parts, GALL). Run with
# `JOBS=jobs-merge-then-gemma.sh bash benchmarks/gpu_session/launch.sh .gpu/g0`, then the part calls for g1..g6.
bash ~/src/scripts/jobs-merge-one-launch.sh
bash ~/src/scripts/jobs-gemma-cap.sh
