#!/bin/bash
# A/B of two checkouts of this repository, alternating, for changes whose effect is
# within one run's spread: ab.sh ROUNDS NAME:"BENCH ARGS" [NAME:"BENCH ARGS" ...]
# e.g. ab.sh 3 gkm:"gkm --size 1MiB --repeat 3" api:"api --size 256"
# BEFORE and AFTER are the checkouts (git worktrees; each runs with this repository's
# .venv, PYTHONPATH pointing at it), OUT the results: <name>-<before|after>-<round>.json
# (the bench's --json), .log and .png, and a timing log.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:?OUT: results directory} BEFORE=${BEFORE:?BEFORE: worktree} AFTER=${AFTER:-$HERE}
rounds=$1; shift
mkdir -p "$OUT"
for round in $(seq 1 "$rounds"); do
  for v in before after; do
    if [ "$v" = before ]; then dir=$BEFORE; else dir=$AFTER; fi
    echo "$(date +%T) start $round $v" >> "$OUT/log"
    for spec in "$@"; do
      name=${spec%%:*}; args=${spec#*:}
      plot=()  # a bench that draws one writes it here, not over the checkout's plots
      # shellcheck disable=SC2086  # the bench's arguments, split as written
      if "$HERE/.venv/bin/qkdctl" bench ${args%% *} --help | grep -q -- "--plot"; then
        plot=(--plot "$OUT/$name-$v-$round.png")
      fi
      # shellcheck disable=SC2086
      (cd "$dir" && PYTHONPATH=$dir "$HERE/.venv/bin/qkdctl" bench $args "${plot[@]}" \
          --json > "$OUT/$name-$v-$round.json" 2> "$OUT/$name-$v-$round.log")
      rc=$?  # before anything else runs: "$(date)" would set it again
      echo "$(date +%T) $name $round $v rc=$rc" >> "$OUT/log"
    done
  done
done
echo done >> "$OUT/log"
