#!/usr/bin/env bash
# bcc compiles BPF programs against /lib/modules/$(uname -r)/build (generated headers,
# .config) and .../source (the kernel's own include/). When the running kernel ships no
# headers of its own, Debian's linux-headers-amd64 works for our XDP and tracing
# programs: build -> the -amd64 tree, source -> the -common tree its Makefile includes.
# Never replaces headers that already exist and work.
set -euo pipefail
mod=/lib/modules/$(uname -r)
if [ -e "$mod/build/Makefile" ] && [ -e "$mod/source/include/linux/kconfig.h" ]; then exit 0; fi
if [ -e "$mod/build/Makefile" ] && [ ! -L "$mod/build" ]; then exit 0; fi  # a real tree
hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$hdr" ]; then
  echo "warning: no kernel headers found; BPF features will be off (qkdctl doctor explains)" >&2
  exit 0
fi
common=$(sed -n 's|^include \(/usr/src/linux-headers-[^/]*-common\)/Makefile$|\1|p' "$hdr/Makefile")
[ -n "$common" ] && [ -d "$common" ] || common=$hdr
mkdir -p "$mod"
ln -sfn "$hdr" "$mod/build"
ln -sfn "$common" "$mod/source"
echo "linked $hdr as $mod/build and $common as $mod/source"
