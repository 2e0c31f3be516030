"""A key API worker's CPU per 256-bit enc_keys, alone: the real app (api_worker.py)
against a key manager that answers at once (fake_gkm.py), beside the bare Sanic endpoint
(bench.bare_api), the same 32 keep-alive clients (bench.api_load) for 4 s each, rounds
alternating; CPU from /proc (all threads of the server's processes).
Run from the repository root:
.venv/bin/python bench/results/prof-2026-12-06-api/worker_alone.py
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from bench import bare_api
from bench.api import ApiNet
from bench.api_load import pull_enc, run_in
from control.core import paths

HERE = Path(__file__).parent
HZ = os.sysconf("SC_CLK_TCK")
SECONDS = 4.0


def cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        for task in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{task}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / HZ
    return total


def pull(net: ApiNet, port: int) -> float:
    t0 = time.time() + 0.5
    pulls = run_in(net.ns("A"), [(pull_enc, (str(net.topo.api.pki), "SAE-A", net.addr("A"),
                                             port, "SAE-B", 256, 1, t0, t0 + SECONDS, True))]
                   * 32, 60)
    bad = [p.error or p.stop_status for p in pulls if p.error or p.stop_status]
    if bad:
        raise SystemExit(f"a client failed: {bad[0]}")
    return sum(p.keys for p in pulls) / SECONDS


def start(net: ApiNet, procs: list[subprocess.Popen]) -> tuple[subprocess.Popen, int]:
    """On bench api's network (up): the key manager that answers at once, and the real
    key API app in one worker process beside it; returns the worker and its port."""
    net.pause_key(True)
    sock = str(paths.node_dir(net.prefix, "A") / "fake-gkm.sock")
    procs.append(subprocess.Popen([sys.executable, str(HERE / "fake_gkm.py"), sock]))
    port = net.bare_port + 1
    worker = subprocess.Popen(["ip", "netns", "exec", net.ns("A"), sys.executable,
                               str(HERE / "api_worker.py"), str(net.cfg), net.addr("A"),
                               str(port), sock])
    procs.append(worker)
    return worker, port


def main(rounds: int = 3) -> None:
    console = Console()
    net = ApiNet(64 << 20, 1, "64MiB", console)
    procs: list[subprocess.Popen] = []
    out = []
    try:
        net.up()
        worker, port = start(net, procs)
        with bare_api.endpoint(net.ns("A"), net.topo.api.pki, "A", net.addr("A"),
                               net.bare_port, 1, paths.log_dir(net.prefix) / "bare.log"):
            time.sleep(3)
            bare = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                    b"bench.bare_api" in Path(f"/proc/{p}/cmdline").read_bytes()]
            for _ in range(rounds):
                for name, p, pids in (("key API worker", port, [worker.pid]),
                                      ("bare endpoint", net.bare_port, bare)):
                    a = cpu(pids)
                    rate = pull(net, p)
                    us = 1e6 * (cpu(pids) - a) / (rate * SECONDS)
                    out.append({"server": name, "requests_per_s": rate, "cpu_us": us})
                    console.print(f"{name}: {rate:,.0f} requests/s, {us:.0f} us CPU each")
    finally:
        for p in procs:
            p.terminate()
        net.down()
    (HERE / "worker_alone.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
