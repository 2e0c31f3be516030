#!/usr/bin/env python3
"""At which rate does a flood of forged keepalives take a link down?

    .venv/bin/python scripts/control_flood.py PREFIX [--rates 5000,20000] [--runs 3]

Brings up A - B (two workers a side, 20 Mb/s of key), then for each rate and run floods
B's control port from A's underlay address (bench.flood.flood_control: positions in B's
stored key, so only the MAC refuses them) for ``--seconds``, and says whether B declared A
silent (liveness downs), how many of A's keepalives B missed, how many forgeries B's
tunnel manager checked, and whether pings through the link got through meanwhile. The
network is torn down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import topology  # noqa: E402
from bench.flood import flood_control  # noqa: E402
from control.core import paths  # noqa: E402
from control.core.config import parse_topology  # noqa: E402
from control.tools import emulation  # noqa: E402
from tests.nsutil import InNetns, routes_complete, tunnel_state, wait_until  # noqa: E402


def ping_loss(ns: str, addr: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-i", "0.1",
                             "-W", "1", "-w", str(int(seconds)), addr],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefix")
    ap.add_argument("--rates", default="5000,10000,20000,40000")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--idle", action="store_true",
                    help="no pings during the flood (keepalives alone keep the link up)")
    a = ap.parse_args()
    text = topology.render(
        topology.network("ctlflood", a.prefix,
                         defaults={"key_rate_mbps": 20, "block_size": "256KiB",
                                   "ring_capacity": "32MiB"},
                         ports={"agreement": 7401},
                         dataplane={"workers": 2, "chunk_size": "256KiB"},
                         gkm={"pairs": []}),
        topology.line("AB", 212, source={"generator": "aes-ctr"}))
    path = Path(f"/tmp/{a.prefix}.toml")
    path.write_text(text)
    topo = parse_topology(text, path)
    link = topo.link("A-B")
    emulation.net_up(topo)
    try:
        wait_until(lambda: routes_complete(a.prefix, ["A", "B"]), 120, "routes")
        wait_until(lambda: (tunnel_state(a.prefix, "B", "A-B") or {}).get("up"), 60, "B up")
        time.sleep(3)
        ring = paths.ring_name(a.prefix, "B", "A-B", "ab")
        for rate in [int(r) for r in a.rates.split(",")]:
            for run in range(a.runs):
                st0 = tunnel_state(a.prefix, "B", "A-B")
                pinger = None if a.idle else ping_loss(paths.netns_name(a.prefix, "A"),
                                                       str(topo.node("B").address),
                                                       a.seconds + 1)
                f = InNetns(paths.netns_name(a.prefix, "A"), flood_control,
                            str(link.underlay_a.ip), str(link.underlay_b.ip),
                            topo.ports.tunnel, link.index, 0, ring, float(rate), a.seconds,
                            a.size)
                sent = f.result(a.seconds + 30)
                out = pinger.communicate(timeout=30)[0] if pinger else ""
                time.sleep(1.0)  # a status flush after the flood
                st1 = tunnel_state(a.prefix, "B", "A-B")
                loss = next((ln for ln in out.splitlines() if "packet loss" in ln), "?")
                checked = st1["control_drops"].get("mac", 0) - st0["control_drops"].get("mac", 0)
                print(json.dumps({
                    "rate": rate, "run": run, "sent_pps": sent["pps"],
                    "downs": st1["liveness"]["downs"] - st0["liveness"]["downs"],
                    "missed": st1["liveness"]["missed"] - st0["liveness"]["missed"],
                    "checked_pps": round(checked / sent["seconds"]),
                    "data_rx": st1["counters"]["rx_pkts"] - st0["counters"]["rx_pkts"],
                    "dead_after_s": st1["liveness"]["dead_after_s"],
                    "up_after": st1["up"], "ping": loss.split(",")[2].strip()
                    if loss != "?" else "-"}), flush=True)
                wait_until(lambda: (tunnel_state(a.prefix, "B", "A-B") or {}).get("up"), 60,
                           "B up again")
                time.sleep(2)
    finally:
        emulation.net_down(a.prefix)
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
