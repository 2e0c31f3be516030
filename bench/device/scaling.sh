#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (16 cores, no network, Python 3.12 without most of our
# dependencies), from the repository's root, after `bench/device/prepare.sh` here:
#   device run, carry [".device"], timeout_s 600, command "bench/device/scaling.sh"
# Unpacks the carried wheels and Debian tools into /tmp, checks the machine can run the
# bench (TUN, namespaces, iperf3, ip, /dev/shm), then runs `qkdctl bench scaling` with
# 1, 2, 4, 8 and 16 OTP workers per link end. Everything it writes goes to $OUT (the
# device tool's folder that comes back): scaling.json, scaling.log, otp-scaling.png and
# machine.txt. WORKERS="1 2 4" and REPEAT=2 shorten a run.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/qkdnet-device-out}
mkdir -p "$out"
exec > >(tee "$out/scaling.log") 2>&1
py=${PYTHON:-python3}
export COLUMNS=${COLUMNS:-140}  # whole tables in the log
stage=/tmp/qkdnet-device
rm -rf "$stage" && mkdir -p "$stage/site" "$stage/root" "$stage/bin"

echo "== machine"
{ uname -a; nproc; free -g; df -h /dev/shm; $py --version; } | tee "$out/machine.txt"

echo "== tools: iperf3 and ip from the carried Debian packages where the machine lacks them"
for f in .device/debs/*.deb; do dpkg-deb -x "$f" "$stage/root" 2>/dev/null || dpkg -x "$f" "$stage/root"; done
libs="$stage/root/usr/lib/x86_64-linux-gnu:$stage/root/lib/x86_64-linux-gnu"
for tool in iperf3:usr/bin/iperf3 ip:bin/ip; do
  name=${tool%%:*} path=${tool#*:}
  if ! command -v "$name" >/dev/null; then
    [ -x "$stage/root/$path" ] || path=usr/$path
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$libs" "$stage/root/$path" \
      > "$stage/bin/$name"
    chmod +x "$stage/bin/$name"
  fi
done
export PATH="$PATH:$stage/bin"
iperf3 --version | head -1 && ip -V || { echo "FAILED: iperf3 or ip does not run"; exit 2; }

echo "== Python packages: the carried wheels, ahead of the image's own"
$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stage/site" \
  .device/wheels/*.whl || { echo "FAILED: installing the carried wheels"; exit 2; }
export PYTHONPATH="$stage/site:$PWD" PYTHONUNBUFFERED=1
$py - <<'PY' || { echo "FAILED: a dependency does not import (above)"; exit 2; }
import tomllib, importlib, re
names = {"pyzmq": "zmq", "python-json-logger": "pythonjsonlogger", "tomli-w": "tomli_w",
         "prometheus_client": "prometheus_client", "pybase64": "pybase64"}
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    name = re.split(r"[<>=!~ ]", dep)[0]
    mod = importlib.import_module(names.get(name, name.replace("-", "_")))
    print(f"  {name:20} {getattr(mod, '__version__', '')}")
PY

echo "== /dev/shm: 4 rings of 4 GiB"
need=$((20 * 1024 * 1024))  # KiB
have=$(df -k --output=avail /dev/shm | tail -1)
if [ "$have" -lt "$need" ]; then mount -o remount,size=64G /dev/shm && df -h /dev/shm; fi

echo "== doctor"
$py -m control.tools.cli doctor || echo "(doctor found problems; BPF and bcc are not needed here)"

echo "== bench scaling"
args=()
for w in ${WORKERS:-1 2 4 8 16}; do args+=(--workers "$w"); done
timeout 540 $py -m control.tools.cli bench scaling "${args[@]}" --repeat "${REPEAT:-3}" \
  --json --plot "$out/otp-scaling.png" > "$out/scaling.json"
rc=$?
echo "== bench scaling exit status $rc"
$py -m control.tools.cli net down --all >/dev/null 2>&1
exit $rc
