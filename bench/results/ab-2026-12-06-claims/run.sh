#!/bin/bash
# OTP A/B of the control-claim change: `qkdctl bench otp` at the largest MTU, proposed
# mode, before (fa6674d, a worktree with its own .venv) and after (main), alternating.
# As run: run.sh 3 ("before after" per round). Results: $OUT/<before|after>-<round>.json
# (the bench's --json) and .log; a timing log in $OUT/log.
set -u
OUT=${OUT:-/work/ab-claims} BEFORE=${BEFORE:-/work/wt/before} AFTER=${AFTER:-/work/main}
mkdir -p "$OUT"
for round in $(seq 1 "$1"); do
  for v in before after; do
    if [ "$v" = before ]; then dir=$BEFORE; else dir=$AFTER; fi
    echo "$(date +%T) start $round $v" >> "$OUT/log"
    (cd "$dir" && ./.venv/bin/qkdctl bench otp --mtu 65449 --mode proposed --repeat 3 \
        --plot "$OUT/$v-$round.png" --json > "$OUT/$v-$round.json" 2> "$OUT/$v-$round.log")
    echo "$(date +%T) end $round $v rc=$?" >> "$OUT/log"
  done
done
echo done >> "$OUT/log"
