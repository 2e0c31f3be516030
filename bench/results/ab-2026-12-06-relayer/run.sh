#!/bin/bash
# Issue 18 A/B: bench all, bench by bench, before (a0f4d23) and after (main), alternating.
set -u
OUT=/work/ab18
for b in lkm otp gkm api guard relay keyrate; do
  for v in before after; do
    if [ $v = before ]; then dir=/work/wt/before; else dir=/work/main; fi
    echo "$(date +%T) start $b $v" >> $OUT/log
    (cd $dir && ./.venv/bin/qkdctl bench all --only $b --out $OUT/$v-$b --no-record > $OUT/$v-$b.log 2>&1)
    echo "$(date +%T) end $b $v rc=$?" >> $OUT/log
  done
done
echo done >> $OUT/log
