#!/bin/bash
# Issue 15 A/B/C: b0 = b105894 (before key economy), k = 87be62d (key economy alone),
# h = main HEAD (with issue 16's trust work); alternating runs on a quiet machine.
set -u
OUT=/tmp/ab/out
mkdir -p $OUT
log() { echo "$(date +%T) $*" >> /tmp/ab/log; }
otp() {
  cd /tmp/ab/$1 || return
  .venv/bin/qkdctl bench otp --mtu 65449 --repeat 5 --seconds 1 --ring 2GiB --mode proposed \
    --plot /tmp/ab/$1-otp.png --json > $OUT/$1-otp-$2.json 2> $OUT/$1-otp-$2.err
  local rc=$?; log "$1 otp $2 rc=$rc"
}
gkm() {
  cd /tmp/ab/$1 || return
  .venv/bin/qkdctl bench gkm --size 1MiB --repeat 3 --plot /tmp/ab/$1-gkm.png --json \
    > $OUT/$1-gkm-$2.json 2> $OUT/$1-gkm-$2.err
  local rc=$?; log "$1 gkm $2 rc=$rc"
}
log start load=$(cut -d' ' -f1-3 /proc/loadavg)
for i in ${CYCLE_LIST:-1 2}; do
  case $i in 1) o="b0 k h";; 2) o="h k b0";; *) o="k b0 h";; esac
  for s in $o; do otp $s $i; done
  for s in $o; do gkm $s $i; done
done
log done load=$(cut -d' ' -f1-3 /proc/loadavg)
