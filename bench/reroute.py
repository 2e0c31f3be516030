"""`qkdctl bench reroute`: how fast routes move off a cut link, and back, on this machine.

The triangle A, B, C with real node processes at a real key rate. ``cuts`` times: link
A-B's underlay is cut at A (the interface down), and the bench polls both ends' routers
until A reaches B via C and B reaches A via C (*reroute*, from the cut); then it restores
the link and polls until both route over A-B again (*back*, from the restore). Between
cuts it waits until every tunnel is up at both ends and, unless ``settle`` is off, until
both ends' keepalive timeout for A-B is back at its floor: a cut's silence teaches the
adaptive timeout (it cannot tell a cut from a long stall), which widens it for some 10 s;
back-to-back cuts (``--no-settle``) show that widened figure, up to ``LINK_DEAD_MAX_S``.

The floor (issue 17): rerouting within 2 s of a cut on an idle machine. Detection is the
tunnel manager's adaptive keepalive timeout (``dataplane/liveness.py``: at least
``LINK_DEAD_S``; on links below about 1 Mb/s, whose keepalives are further apart, as many
of their periods, and the floor moves with it), then the router's next step and the link
state's way to the far end.
Coming back takes longer on purpose: a link is up again only after
``UP_AFTER_KEEPALIVES`` timely keepalives (hysteresis).
"""

from __future__ import annotations

import statistics
import time

from rich.console import Console

from bench.chaos import ChaosNet
from bench.harness import BenchError
from bench.topology import line, template
from control.core import paths
from control.core.statefile import read_status
from dataplane.limits import LINK_DEAD_S, UP_AFTER_KEEPALIVES

FLOOR_S = 2.0
SETTLE_MARGIN_S = 0.05  # a link's keepalive timeout this close to its floor: settled
POLL_S = 0.02
TEMPLATE = """
[network]
name = "bench-reroute"
prefix = "{prefix}"
[defaults]
key_rate_mbps = {rate}
[gkm]
pairs = []
""" + template(line("ABC", 216, closed=True))


class RerouteNet(ChaosNet):
    TEMPLATE = TEMPLATE
    TAG = "br"

    def via(self, node: str, dst: str) -> str | None:
        r = read_status(paths.node_dir(self.prefix, node) / "router.json") or {}
        return (r.get("routes", {}).get(dst) or {}).get("via")

    def link_between(self, x: str, y: str) -> str:
        return next(lk.name for lk in self.topo.links if {lk.a, lk.b} == {x, y})

    def ends_of(self, link: str) -> dict:
        """What each end's tunnel manager says of ``link`` (for a failure's message)."""
        lk = self.topo.link(link)
        out = {}
        for node in (lk.a, lk.b):
            st = read_status(paths.node_dir(self.prefix, node) / f"tun-{link}.json") or {}
            out[node] = {k: st.get(k) for k in ("up", "reason", "liveness")}
        return out

    def dead_after(self, link: str) -> list[float]:
        """Each end's keepalive timeout for ``link`` just now (inf: no status yet)."""
        lk = self.topo.link(link)
        out = []
        for node in (lk.a, lk.b):
            st = read_status(paths.node_dir(self.prefix, node) / f"tun-{link}.json") or {}
            out.append(float((st.get("liveness") or {}).get("dead_after_s", float("inf"))))
        return out

    def tunnels_up(self) -> bool:
        for lk in self.topo.links:
            for node in (lk.a, lk.b):
                st = read_status(paths.node_dir(self.prefix, node) / f"tun-{lk.name}.json")
                if not (st or {}).get("up"):
                    return False
        return True


def _wait(cond, t0: float, limit: float, what: str) -> float:
    while not cond():
        if time.monotonic() - t0 > limit:
            raise BenchError(f"{what}: not within {limit:.0f} s")
        time.sleep(POLL_S)
    return time.monotonic() - t0


def run(cuts: int = 20, rate: float = 100.0, settle: bool = True,
        console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if cuts < 1:
        raise BenchError("--cuts must be at least 1")
    net = RerouteNet(console, rate=rate)
    reroute, back, timeouts = [], [], []
    try:
        console.print(f"reroute: the triangle at {rate:g} Mb/s per link; link A-B cut "
                      f"{cuts} times" + (", each once the link's keepalive timeout is "
                                         "back at its floor" if settle else
                                         ", back to back"))
        net.up()
        dead_s, dead_max_s = net.topo.link("A-B").sizes.peer_dead_s
        floor_s = FLOOR_S - LINK_DEAD_S + dead_s  # 2 s at the 0.2 s keepalive period
        a_c, b_c = net.link_between("A", "C"), net.link_between("B", "C")
        for i in range(cuts):
            t = time.monotonic()
            _wait(lambda: net.tunnels_up() and net.via("A", "B") == "A-B"
                  and net.via("B", "A") == "A-B", t, 60 + 5 * dead_s,
                  "every tunnel up, direct routes")
            if settle:  # the last cut's silence widened the timeout for a while
                _wait(lambda: max(net.dead_after("A-B")) <= dead_s + SETTLE_MARGIN_S, t,
                      120 + 10 * dead_max_s,
                      "the keepalive timeout back to its floor")
            timeouts.append(max(net.dead_after("A-B")))
            t0 = time.monotonic()
            net.set_underlay("A-B", False)
            try:
                reroute.append(_wait(lambda: net.via("A", "B") == a_c
                                     and net.via("B", "A") == b_c, t0, 30 + dead_max_s,
                                     "routes around the cut"))
            finally:
                t1 = time.monotonic()
                net.set_underlay("A-B", True)
            try:
                back.append(_wait(lambda: net.via("A", "B") == "A-B"
                                  and net.via("B", "A") == "A-B", t1, 60 + 5 * dead_s,
                                  "routes back"))
            except BenchError as e:
                raise BenchError(f"{e}; link A-B's ends: {net.ends_of('A-B')}") from None
            console.print(f"  cut {i + 1:3d}/{cuts}: timeout {timeouts[-1]:.2f} s, "
                          f"rerouted in {reroute[-1]:.2f} s, back in {back[-1]:.2f} s",
                          highlight=False)
    finally:
        net.down()
    return {
        "bench": "reroute", "cuts": cuts, "key_rate_mbps": rate, "settle": settle,
        "timeout_at_cut_s": timeouts,
        "reroute_s": [round(x, 3) for x in reroute], "back_s": [round(x, 3) for x in back],
        "reroute_median_s": round(statistics.median(reroute), 3),
        "reroute_max_s": round(max(reroute), 3),
        "back_median_s": round(statistics.median(back), 3), "back_max_s": round(max(back), 3),
        "link_dead_s": dead_s, "up_after_keepalives": UP_AFTER_KEEPALIVES,
        "poll_s": POLL_S, "floor_s": floor_s,
        "meets_floor": settle and max(reroute) <= floor_s,
    }


def report(r: dict, console: Console) -> None:
    console.print(
        f"reroute: {r['cuts']} cuts of link A-B (triangle, {r['key_rate_mbps']:g} Mb/s)\n"
        f"  routes around the cut: median {r['reroute_median_s']} s, at most "
        f"{r['reroute_max_s']} s ("
        + (f"floor {r['floor_s']:g} s on an idle machine, each cut on a settled link)\n"
           if r["settle"] else "cuts back to back: each widened the timeout; no floor)\n")
        + f"  the link's keepalive timeout at each cut: up to "
        f"{max(r['timeout_at_cut_s']):.2f} s\n"
        f"  routes back after the restore: median {r['back_median_s']} s, at most "
        f"{r['back_max_s']} s (a link is up again after {r['up_after_keepalives']} "
        f"timely keepalives)\n"
        f"  {'[green]meets[/green]' if r['meets_floor'] else '[red]misses[/red]'} the floor",
        highlight=False)
