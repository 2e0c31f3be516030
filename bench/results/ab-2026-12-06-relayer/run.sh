#!/bin/bash
# Issue 18 A/B: `qkdctl bench all --only NAME`, bench by bench, before (a0f4d23, checked out
# in a worktree with its own .venv) and after (main), alternating. As run:
#   run.sh "" "before after" lkm otp gkm api guard relay keyrate   (round 1)
#   run.sh 2 "after before" api                                      (the key API again,
#   run.sh 3 "after before" api                                       in the other order)
# Results: $OUT/<before|after>-<bench><round>.json and .log; a timing log in $OUT/log.
set -u
OUT=${OUT:-/work/ab18} BEFORE=${BEFORE:-/work/wt/before} AFTER=${AFTER:-/work/main}
round=$1 order=$2
shift 2
for b in "$@"; do
  for v in $order; do
    if [ "$v" = before ]; then dir=$BEFORE; else dir=$AFTER; fi
    echo "$(date +%T) start $b$round $v" >> "$OUT/log"
    (cd "$dir" && ./.venv/bin/qkdctl bench all --only "$b" --out "$OUT/$v-$b$round" \
        --no-record > "$OUT/$v-$b$round.log" 2>&1)
    echo "$(date +%T) end $b$round $v rc=$?" >> "$OUT/log"
  done
done
echo "done $round" >> "$OUT/log"
