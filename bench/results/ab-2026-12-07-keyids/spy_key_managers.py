"""py-spy on both key managers while 32 keep-alive SAEs pull 256-bit keys (bench api's
network, one Sanic worker). Run from the repository root."""
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from bench.api import ApiNet
from bench.api_load import pull_enc, run_in
from control.core import paths

console = Console()
net = ApiNet(64 << 20, 1, "256MiB", console)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/prof")
try:
    net.up()
    net.pause_key(True)
    net.stock(8 << 20)
    net.settle()
    pids = {}
    for node in ("A", "B"):
        st = json.loads((paths.node_dir(net.prefix, node) / "state.json").read_text())
        for m in st["modules"]:
            if m["name"] in ("gkm",):
                pids[node] = m["pid"]
    console.print(pids)
    t0 = time.time() + 1.0
    spies = [subprocess.Popen([".venv/bin/py-spy", "record", "-p", str(pid), "-d", "20",
                               "-r", "200", "--nonblocking", "-f", "raw", "-o",
                               str(out / f"gkm-{node}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for node, pid in pids.items()]
    pulls = run_in(net.ns("A"), [(pull_enc, (
        str(net.topo.api.pki), "SAE-A", net.addr("A"), net.topo.ports.api,
        "SAE-B", 256, 1, t0, t0 + 25, True))] * 32, 660)
    for s in spies:
        s.wait()
    keys = sum(p.keys for p in pulls)
    t = max(p.ended for p in pulls) - min(p.started for p in pulls)
    console.print(f"{keys} keys in {t:.1f} s: {keys / t:.0f} keys/s")
finally:
    net.down()
