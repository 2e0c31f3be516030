#!/usr/bin/env bash
# Run HERE (a machine with the package registries), before the device run: fetches into
# .device/ (git-ignored) what `bench/device/scaling.sh` needs on the lent 16-core machine,
# which reaches no network and has Python 3.12 without most of our dependencies:
#   .device/wheels  cp312 wheels of qkdnet's dependencies its image lacks
#   .device/debs    iperf3 and iproute2 (ip) with the libraries they link, from Debian
# Then: device run, carry [".device"], command "bench/device/scaling.sh".
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.device
rm -rf "$dest" && mkdir -p "$dest/wheels" "$dest/debs"

# The device image's Python already holds these (the device tool's own list of the
# image's packages): carrying them would only eat the 64 MiB the working tree may take.
# Its versions satisfy pyproject's floors; scaling.sh imports every dependency first.
have="numpy matplotlib pillow fonttools kiwisolver contourpy cycler pyparsing
python_dateutil six packaging uvloop rich pygments typer click markdown_it_py mdurl
shellingham typing_extensions multidict aiofiles prometheus_client"

deps=$(python3 - <<'PY'
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
PY
)
plats=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plats="$plats --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  $plats --platform any -d "$dest/wheels" $deps 2>&1 | grep -v "is ignored: it is neither" || true
for name in $have; do
  rm -f "$dest"/wheels/"$name"-[0-9]*.whl
done

(cd "$dest/debs" && apt-get download -q iperf3 libiperf0 libsctp1 iproute2 libmnl0 libelf1 \
  libbpf1 libcap2 libbsd0 libmd0 2>&1 | grep -v "unsandboxed" || true)

n=$(ls "$dest"/wheels/*.whl | wc -l)
echo "prepared $dest: $n wheels, $(ls "$dest"/debs/*.deb | wc -l) debs, $(du -sh "$dest" | cut -f1)"
