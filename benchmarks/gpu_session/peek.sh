#!/usr/bin/env bash
# Keep the machine held for $1 seconds, then show the log and bring ~/res back.
sleep "${1:-60}"
tail -n "${2:-25}" ~/res/log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
tar -czf "$OUT/res.tgz" -C ~ res 2>/dev/null
