"""Variants of the key API worker (api_variant.py) beside the real one and the bare
endpoint, against the stand-in key manager (fake_gkm.py): requests/s and CPU per request
of each, the same 32 keep-alive clients for 4 s each, rounds alternating.
Run from the repository root:
.venv/bin/python bench/results/prof-2026-12-06-api/variants.py no_hand barehandler ...
"""
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from bench import bare_api
from bench.api import ApiNet
from control.core import paths

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from worker_alone import SECONDS, cpu, pull, start  # noqa: E402

console = Console()
net = ApiNet(64 << 20, 1, "64MiB", console)
procs: list[subprocess.Popen] = []
try:
    net.up()
    worker, port = start(net, procs)
    sock = str(paths.node_dir(net.prefix, "A") / "fake-gkm.sock")
    servers = [("ours", port, [worker.pid])]
    for i, v in enumerate(sys.argv[1:]):
        at = net.bare_port + 2 + i
        p = subprocess.Popen(["ip", "netns", "exec", net.ns("A"), sys.executable,
                              str(HERE / "api_variant.py"), str(net.cfg), net.addr("A"),
                              str(at), sock, v],
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
        procs.append(p)
        servers.append((v, at, [p.pid]))
    with bare_api.endpoint(net.ns("A"), net.topo.api.pki, "A", net.addr("A"),
                           net.bare_port, 1, paths.log_dir(net.prefix) / "bare.log"):
        time.sleep(3)
        bare = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                b"bench.bare_api" in Path(f"/proc/{p}/cmdline").read_bytes()]
        for _ in range(3):
            for name, at, pids in [*servers, ("bare", net.bare_port, bare)]:
                a = cpu(pids)
                rate = pull(net, at)
                us = 1e6 * (cpu(pids) - a) / (rate * SECONDS)
                console.print(f"{name}: {rate:,.0f} requests/s, {us:.0f} us CPU each")
finally:
    for p in procs:
        p.terminate()
    net.down()
