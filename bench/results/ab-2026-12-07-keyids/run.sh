#!/bin/bash
# A/B of key IDs worked out once per key and kept as 16 bytes in the key managers:
# `qkdctl bench api --size 256`, before (914ceed) and after, each a worktree run with
# main's .venv and PYTHONPATH pointing at it, alternating. As run: run.sh 3.
set -u
OUT=${OUT:-/work/ab-keyids} BEFORE=${BEFORE:-/tmp/before} AFTER=${AFTER:-/tmp/after}
mkdir -p "$OUT"
for round in $(seq 1 "$1"); do
  for v in before after; do
    if [ "$v" = before ]; then dir=$BEFORE; else dir=$AFTER; fi
    echo "$(date +%T) start $round $v" >> "$OUT/log"
    (cd "$dir" && PYTHONPATH=$dir /work/main/.venv/bin/qkdctl bench api --size 256 \
        --plot "$OUT/api-$v-$round.png" --json \
        > "$OUT/api-$v-$round.json" 2> "$OUT/api-$v-$round.log")
    echo "$(date +%T) end $round $v rc=$?" >> "$OUT/log"
  done
done
echo done >> "$OUT/log"
