#!/bin/bash
# How these were made (2026-12-07): the code before the slow-link change (8e62f7a) and
# after (f0e72ae), alternating, two rounds, on the 2-core Intel Xeon VM (KVM), idle.
# Both ran the same bench/keyrate.py (f0e72ae's, which runs below 0.5 Mb/s and measures
# the idle cost over two of the relay's ping periods); in the "before" checkout its idle
# window used the ping period that code had, 5 s everywhere:
#   git worktree add /tmp/before 8e62f7a
#   cp bench/keyrate.py /tmp/before/bench/keyrate.py
#   sed -i 's/2 \* net.topo.gkm.heartbeat_s/2 * 5.0/' /tmp/before/bench/keyrate.py
OUT=bench/results/ab-2026-12-07-slow-links BEFORE=/tmp/before \
  bench/ab.sh 2 keyrate:"keyrate --rates 0.05,0.2,1 --baseline 0"
