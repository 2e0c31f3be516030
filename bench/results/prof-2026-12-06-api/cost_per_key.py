"""The whole machine's CPU per 256-bit key in bench api's network: A - B, one Sanic
worker, one stocked store, 32 keep-alive clients pulling until the store is empty; busy
CPU from /proc/stat, and per process (/proc/<pid>/stat) for the node processes that ran
throughout (the clients come and go). Then the bare endpoint, the same clients, 3 s.
Run from the repository root:
.venv/bin/python bench/results/prof-2026-12-06-api/cost_per_key.py [out.json]
"""
import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console

from bench import bare_api
from bench.api import ApiNet, pull_bare
from bench.api_load import pull_enc, run_in
from control.core import paths

HZ = os.sysconf("SC_CLK_TCK")


def procs() -> dict[int, tuple[str, float]]:
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = Path(f"/proc/{p}/stat").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:160]
        except OSError:
            continue
        f = s.rsplit(")", 1)[1].split()
        out[int(p)] = (cmd.decode(errors="replace"), (int(f[11]) + int(f[12])) / HZ)
    return out


def busy() -> float:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / HZ


def main(rounds: int = 2) -> None:
    console = Console()
    net = ApiNet(64 << 20, 1, "256MiB", console)
    res = []
    try:
        net.up()
        net.pause_key(True)
        with bare_api.endpoint(net.ns("A"), net.topo.api.pki, "A", net.addr("A"),
                               net.bare_port, 1, paths.log_dir(net.prefix) / "bare.log"):
            for _ in range(rounds):
                net.stock(1 << 20)
                net.settle()
                a, m0 = procs(), busy()
                t0 = time.time() + 1.0
                pulls = run_in(net.ns("A"), [(pull_enc, (
                    str(net.topo.api.pki), "SAE-A", net.addr("A"), net.topo.ports.api,
                    "SAE-B", 256, 1, t0, t0 + 600, True))] * 32, 660)
                b, m1 = procs(), busy()
                keys = sum(p.keys for p in pulls)
                t = max(p.ended for p in pulls) - min(p.started for p in pulls)
                top = sorted(((b[p][0], 1e6 * (b[p][1] - a[p][1]) / keys) for p in b
                              if p in a), key=lambda x: -x[1])[:8]
                ck, _, ct = pull_bare(net, 256, 32, 3.0)
                m2 = busy()
                res.append({"keys": keys, "keys_per_s": keys / t,
                            "machine_cpu_us_per_key": 1e6 * (m1 - m0) / keys,
                            "top_processes_us_per_key": top,
                            "bare_requests_per_s": ck / ct,
                            "bare_machine_cpu_us_per_request": 1e6 * (m2 - m1) / ck})
                console.print({k: v for k, v in res[-1].items()
                               if k != "top_processes_us_per_key"})
    finally:
        net.down()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else \
        Path(__file__).with_name("cost_per_key.json")
    out.write_text(json.dumps(res, indent=1))


main()
