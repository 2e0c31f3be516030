#!/usr/bin/env bash
# bcc compiles BPF programs against /lib/modules/$(uname -r)/build. When the running
# kernel ships no headers of its own, Debian's linux-headers-amd64 linked there works
# for our XDP programs. Never replaces headers that already exist.
set -euo pipefail
mod=/lib/modules/$(uname -r)
if [ -e "$mod/build/Makefile" ]; then exit 0; fi
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$hdr" ]; then
  echo "warning: no kernel headers found; BPF features will be off (qkdctl doctor explains)" >&2
  exit 0
fi
mkdir -p "$mod"
ln -sfn "$hdr" "$mod/build"
ln -sfn "$hdr" "$mod/source"
echo "linked $hdr as $mod/build and $mod/source"
