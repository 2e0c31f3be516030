"""CPU per GB of a global key fill (bench gkm's network, B -> A direct, 1 MiB blocks,
256 MiB stores, four fills after a warm-up), per node, module and thread kind (RocksDB's
threads, ZeroMQ's, each process's main thread), from /proc; the OTP workers count under
their tunnel. Run from the repository root:
.venv/bin/python bench/results/prof-2026-12-07-gkm/fill_cpu.py"""
import collections
import json
import os
from pathlib import Path

from rich.console import Console

from bench.gkm import GkmNet
from control.core import paths

HZ = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> list[str]:
    return Path(path).read_text().rsplit(")", 1)[1].split()


def owners(net: GkmNet) -> dict[int, str]:
    """Every process of the network's modules (and their children) -> node:module."""
    kids: dict[int, list[int]] = collections.defaultdict(list)
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            kids[int(_stat(f"/proc/{p}/stat")[1])].append(int(p))
        except (OSError, IndexError):
            continue
    out = {}
    for node in ("A", "B", "C"):
        st = json.loads((paths.node_dir(net.prefix, node) / "state.json").read_text())
        for m in st["modules"]:
            todo = [m["pid"]]
            while todo:
                p = todo.pop()
                out[p] = f"{node}:{m['name'].split(':')[0]}"
                todo += kids.get(p, [])
    return out


def sample(own: dict[int, str]) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for pid, who in own.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for t in tids:
            try:
                f = _stat(f"/proc/{pid}/task/{t}/stat")
                name = Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
            except OSError:
                continue
            kind = ("rocksdb" if name.startswith("rocksdb") else "zmq" if name.startswith("ZMQ")
                    else "main" if t == str(pid) else "other-thread")
            c[(who, kind)] += (int(f[11]) + int(f[12])) / HZ
    return c


def busy() -> float:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / HZ


def main() -> None:
    console = Console()
    net = GkmNet(1 << 20, 256 << 20, 16 << 20, "1GiB", console)
    try:
        net.up()
        net.fill_store("B", "A", 120)  # warm-up
        tot: collections.Counter = collections.Counter()
        nbytes, secs, machine = 0, 0.0, 0.0
        for _ in range(4):
            net.fill(min_fill=0.9, timeout=90)
            own = owners(net)
            a, m0 = sample(own), busy()
            r = net.fill_store("B", "A", 120)
            b, m1 = sample(own), busy()
            for k in b:
                tot[k] += b[k] - a.get(k, 0)
            nbytes += r["bytes"]
            secs += r["seconds"]
            machine += m1 - m0
            console.print(f"fill {r['gbps']:.2f} Gb/s")
        gb = nbytes / 1e9
        print(f"machine busy {machine / gb:.2f} cpu-s per GB; "
              f"fills {nbytes * 8 / secs / 1e9:.2f} Gb/s")
        for k, v in tot.most_common(20):
            print(f"{v / gb:6.3f} cpu-s/GB  {k}")
    finally:
        net.down()


main()
