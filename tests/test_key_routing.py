"""Key-aware routing end to end (``[routing] metric = "key"``): real namespaces, tunnels,
routers and a global key fill on a triangle whose A-C link has a tenth of the others' key
rate. The fill spends A-C's stored key, A-C runs dry and A's global key for C goes through
B; A-C refills and the route comes back; then nothing moves for STILL_S."""

from __future__ import annotations

import time

import pytest
from rich.console import Console

from bench.topology import network, render, triangle
from control.core import paths
from control.core.config import parse_topology
from control.gkm.manager import PAUSE_FLAG
from control.node.status import collect, render_tunnels
from control.routing.router import ROUTE_INTERVAL_S
from control.tools import emulation
from dataplane.limits import LSA_MAX_AGE_S
from tests.nsutil import ROUTES_S, router_state, routes_complete, tunnel_state, wait_until
from tests.test_gkm import enc

pytestmark = pytest.mark.netns
MIB = 1 << 20
HIGH = 16 * MIB
# The routes watched this long at the end: recomputed 60 times, and any link-state entry
# left unrefreshed would have expired twice over.
STILL_S = max(60 * ROUTE_INTERVAL_S, 2 * LSA_MAX_AGE_S)


def key_triangle(prefix: str, metric: str = "key") -> str:
    """A-B and B-C at 40 Mb/s of key, A-C at 4 (ring 4 MiB); global key A -> C only."""
    return render(
        network("keyroute", prefix, defaults={"key_rate_mbps": 40},
                dataplane={"workers": 1},
                gkm={"block_size": "256KiB", "low_watermark": "4MiB",
                     "high_watermark": "16MiB", "window": "2MiB", "pairs": [["A", "C"]]},
                api={"workers": 1}, routing={"metric": metric}),
        triangle(7, extra=lambda i: {"key_rate_mbps": 4} if i == 3 else {}))


def via(prefix: str, node: str, dst: str) -> str | None:
    r = router_state(prefix, node) or {}
    return r.get("routes", {}).get(dst, {}).get("via")


def relayed(prefix: str) -> int:
    st = tunnel_state(prefix, "B", "B-C")
    return st["counters"]["tx_bytes"] if st else 0


def test_a_dry_slow_link_is_routed_around_until_it_refills_without_flapping(tmp_path,
                                                                            prefix):
    path = tmp_path / f"{prefix}.toml"
    path.write_text(key_triangle(prefix))
    topo = parse_topology(path.read_text(), path)
    man = emulation.net_up(topo, start=False)
    flag = paths.node_dir(prefix, "A") / PAUSE_FLAG
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()  # no global key yet: the rings fill first
    emulation.start_processes(topo, man)
    wait_until(lambda: routes_complete(prefix, list(topo.nodes)), ROUTES_S,
               "routes at every node")
    wait_until(lambda: (tunnel_state(prefix, "A", "A-C") or {}).get("enc_stored", 0)
               >= 0.75 * 4 * MIB, 60, "A's A-C ring stocked")
    wait_until(lambda: via(prefix, "A", "C") == "A-C", 30, "A routes C over A-C")
    assert router_state(prefix, "A")["costs"]["A-C"] == 1
    relayed_before = relayed(prefix)

    flag.unlink()  # the fill: A-C's stock goes first, then the link is dry
    wait_until(lambda: via(prefix, "A", "C") == "A-B", 60,
               lambda: f"A's route to C moves to B (router: {router_state(prefix, 'A')})")
    r = router_state(prefix, "A")
    assert r["own_costs"]["A-C"] > 2 and r["costs"]["A-C"] > 2, r
    snapshot = collect(topo)  # what `qkdctl status` shows: the dry link's cost
    console = Console(width=200, record=True)
    console.print(render_tunnels(snapshot))
    shown = console.export_text()
    assert f"{r['costs']['A-C']} dry" in shown, shown
    wait_until(lambda: via(prefix, "C", "A") == "B-C", 30,
               "C learns A-C's cost from A's keepalives and routes A through B too")

    def fill_done():
        p = enc(prefix, "A", "C")
        return p and p["enc"]["usable"] == HIGH and not p["enc"]["pending"]

    wait_until(fill_done, 90, lambda: f"A -> C filled: {enc(prefix, 'A', 'C')}")
    assert relayed(prefix) - relayed_before >= 4 * MIB, "the fill went mostly through B"
    wait_until(lambda: via(prefix, "A", "C") == "A-C" and via(prefix, "C", "A") == "A-C",
               90, lambda: f"back over A-C once it refilled: {router_state(prefix, 'A')}")
    assert router_state(prefix, "A")["costs"]["A-C"] == 1

    changes = {n: router_state(prefix, n)["changes"] for n in topo.nodes}
    end = time.monotonic() + STILL_S  # the routes hold still
    while time.monotonic() < end:
        now = {n: (router_state(prefix, n) or {}).get("changes") for n in topo.nodes}
        assert now == changes, f"routes moved with nothing draining a link: {now}"
        time.sleep(1.0)
