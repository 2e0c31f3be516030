#!/bin/bash
# A/B of the origin storing block seeds instead of block bytes: `qkdctl bench gkm` (1 MiB
# keys) and `qkdctl bench api --size 1MiB` (takes now grow their block from its seed),
# before (8d6a47b, a worktree run with main's .venv and PYTHONPATH pointing at it) and
# after (main), alternating. As run: run.sh 3. Results: $OUT/<bench>-<before|after>-<round>.json
set -u
OUT=${OUT:-/work/ab-seeds} BEFORE=${BEFORE:-/tmp/before} AFTER=${AFTER:-/work/main}
mkdir -p "$OUT"
for round in $(seq 1 "$1"); do
  for v in before after; do
    if [ "$v" = before ]; then dir=$BEFORE; else dir=$AFTER; fi
    echo "$(date +%T) start $round $v" >> "$OUT/log"
    (cd "$dir" && PYTHONPATH=$dir /work/main/.venv/bin/qkdctl bench gkm --size 1MiB \
        --baseline 1MiB --repeat 3 --plot "$OUT/gkm-$v-$round.png" --json \
        > "$OUT/gkm-$v-$round.json" 2> "$OUT/gkm-$v-$round.log")
    (cd "$dir" && PYTHONPATH=$dir /work/main/.venv/bin/qkdctl bench api --size 1MiB \
        --plot "$OUT/api-$v-$round.png" --json \
        > "$OUT/api-$v-$round.json" 2> "$OUT/api-$v-$round.log")
    echo "$(date +%T) end $round $v rc=$?" >> "$OUT/log"
  done
done
echo done >> "$OUT/log"
