#!/usr/bin/env bash
# Wait (at most $1 seconds, default 540) for the job list's "ALL DONE", then show the log and bring ~/res back.
end=$((SECONDS + ${1:-540}))
until grep -q "ALL DONE" ~/res/log 2>/dev/null || [ $SECONDS -ge $end ]; do sleep 5; done
tail -n "${2:-30}" ~/res/log
tar -czf "$OUT/res.tgz" -C ~ res 2>/dev/null
