#!/bin/bash
OUT=/work/ab18
for v in after before; do
  if [ $v = before ]; then dir=/work/wt/before; else dir=/work/main; fi
  echo "$(date +%T) start api3 $v" >> $OUT/log
  (cd $dir && ./.venv/bin/qkdctl bench all --only api --out $OUT/$v-api3 --no-record > $OUT/$v-api3.log 2>&1)
  echo "$(date +%T) end api3 $v rc=$?" >> $OUT/log
done
echo done2 >> $OUT/log
