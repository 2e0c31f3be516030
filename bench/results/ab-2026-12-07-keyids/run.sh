#!/bin/bash
# A/B of key IDs worked out once per key in the key managers: `qkdctl bench api --size
# 256`, before (914ceed) and after (5f24a91), alternating, three rounds, as bench/ab.sh
# runs it; cost-*.json: bench/results/prof-2026-12-06-api/cost_per_key.py, run once
# with each checkout.
exec "$(dirname "$0")/../../ab.sh" 3 api:"api --size 256"
