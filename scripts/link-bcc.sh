#!/usr/bin/env bash
# bcc's Python bindings come from Debian (python3-bpfcc) and are pure Python over
# libbcc; link just that package into the venv rather than exposing all of
# /usr/lib/python3/dist-packages, whose other packages would shadow ours.
set -euo pipefail
py=$1
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
src=/usr/lib/python3/dist-packages/bcc
if [ -d "$src" ]; then
  ln -sfn "$src" "$site/bcc"
else
  echo "warning: $src missing (python3-bpfcc not installed); BPF features will be off" >&2
fi
