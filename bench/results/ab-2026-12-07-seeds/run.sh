#!/bin/bash
# A/B of the origin storing block seeds instead of block bytes: `qkdctl bench gkm` (1 MiB
# keys) and `qkdctl bench api --size 1MiB` (takes now grow their block from its seed),
# before (8d6a47b) and after (914ceed), alternating, three rounds, as bench/ab.sh runs it.
exec "$(dirname "$0")/../../ab.sh" 3 gkm:"gkm --size 1MiB --baseline 1MiB --repeat 3" \
    api:"api --size 1MiB"
