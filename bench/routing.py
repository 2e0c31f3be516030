"""`qkdctl bench routing`: global key over a slow link, routed by hops against routed by key.

The triangle A, B, C: A-B and B-C at ``rate`` Mb/s of key, A-C at a tenth of it. A's
global key manager fills its store for C from empty to the high watermark while the
routers count hops (A-C is one hop: every byte crosses the slow link, paced to its key
rate) and then while they count key (``[routing] metric = "key"``: the fill spends the key
A-C has stored, A-C runs dry, and the rest goes through B until A-C has refilled). Each
run starts on a fresh network whose rings are stocked (A's global key manager paused until
then). The figure: the fill's rate, key over hops (``ratio_key_vs_hops``, target 1.5);
beside it the key rate of each path, the ceiling a fill over that path alone can reach.
"""

from __future__ import annotations

import statistics
import time

from rich.console import Console

from bench.harness import BenchError, Net, wait_until
from bench.topology import network, template, triangle
from control.core import paths
from control.core.statefile import read_status
from control.gkm.manager import PAUSE_FLAG

MIB = 1 << 20
TARGET = 1.5
STOCKED = 0.75  # a run starts once A's A-C ring holds this share of its capacity


def _template(rate: float, high: int, metric: str) -> str:
    return template(
        network("bench-routing", "PREFIX", defaults={"key_rate_mbps": rate},
                dataplane={"workers": 1},
                gkm={"block_size": "256KiB", "low_watermark": "1MiB", "high_watermark": high,
                     "window": "4MiB", "pairs": [["A", "C"]]},
                api={"workers": 1}, routing={"metric": metric}),
        triangle(217, extra=lambda i: {"key_rate_mbps": rate / 10} if i == 3 else {})
    ).replace('"PREFIX"', '"{prefix}"')


class RoutingNet(Net):
    TAG = "bq"

    def __init__(self, console: Console, rate: float, high: int, metric: str):
        self.TEMPLATE = _template(rate, high, metric)
        super().__init__(console)

    def node_status(self, node: str, name: str) -> dict:
        return read_status(paths.node_dir(self.prefix, node) / name) or {}

    def usable(self) -> tuple[int, int]:
        p = (self.node_status("A", "gkm.json").get("peers") or {}).get("C") or {}
        e = p.get("enc") or {}
        return int(e.get("usable", 0)), int(e.get("pending", 0))

    def relayed(self) -> int:
        st = self.node_status("B", "tun-B-C.json")
        return int((st.get("counters") or {}).get("tx_bytes", 0))


def fill_once(console: Console, rate: float, high: int, metric: str,
              timeout: float) -> dict:
    net = RoutingNet(console, rate, high, metric)
    try:
        net.up(paused_gkm=["A"])
        cap = net.topo.link("A-C").sizes.ring_capacity
        wait_until(lambda: int(net.node_status("A", "tun-A-C.json").get("enc_stored", 0))
                   >= STOCKED * cap, 90, "A's A-C ring stocked")
        relayed0, changes0 = net.relayed(), net.node_status("A", "router.json")["changes"]
        t0 = time.monotonic()
        (paths.node_dir(net.prefix, "A") / PAUSE_FLAG).unlink()
        wait_until(lambda: net.usable() == (high, 0), timeout,
                   f"A's store for C full ({high >> 20} MiB) with routing by {metric}",
                   step=0.05)
        seconds = time.monotonic() - t0
        return {"metric": metric, "seconds": round(seconds, 3),
                "fill_mbps": round(high * 8 / seconds / 1e6, 3),
                "via_b_bytes": net.relayed() - relayed0,
                "route_changes_at_a": net.node_status("A", "router.json")["changes"]
                - changes0}
    finally:
        net.down()


def run(rate: float = 80.0, store_mib: int = 16, repeat: int = 3,
        console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if repeat < 1 or store_mib < 2 or rate <= 0:
        raise BenchError("--repeat must be at least 1, --store at least 2 MiB and the key "
                         "rate above 0")
    high = store_mib * MIB
    direct = rate / 10 / 2 * 0.9  # A-C's share of key A -> C, at the relay's pace
    via_b = rate / 2 * 0.9
    # hops: the fill crosses A-C at its paced rate; give it twice that long
    timeout = 2 * high * 8 / (direct * 1e6) + 60
    console.print(f"routing: A -> C global key fill of {store_mib} MiB on the triangle, "
                  f"A-B and B-C at {rate:g} Mb/s of key, A-C at {rate / 10:g}; routing by "
                  f"hops, then by key, {repeat} run(s) each, alternating", highlight=False)
    runs: dict[str, list[dict]] = {"hops": [], "key": []}
    for i in range(repeat):
        for metric in ("hops", "key"):
            r = fill_once(console, rate, high, metric, timeout)
            runs[metric].append(r)
            console.print(f"  run {i + 1}/{repeat}, by {metric:4s}: {r['fill_mbps']:.2f} Mb/s "
                          f"({r['seconds']:.1f} s; {r['via_b_bytes'] / MIB:.1f} MiB through "
                          f"B; {r['route_changes_at_a']} route changes at A)",
                          highlight=False)
    med = {m: statistics.median(r["fill_mbps"] for r in rs) for m, rs in runs.items()}
    ratio = med["key"] / med["hops"] if med["hops"] else None
    return {
        "bench": "routing", "key_rate_mbps": rate, "slow_link_mbps": rate / 10,
        "store_bytes": high, "repeat": repeat, "runs": runs,
        "hops_fill_mbps": round(med["hops"], 3), "key_fill_mbps": round(med["key"], 3),
        "ratio_key_vs_hops": round(ratio, 3) if ratio else None,
        "ceiling_direct_mbps": round(direct, 3), "ceiling_via_b_mbps": round(via_b, 3),
        "target": TARGET, "meets_target": bool(ratio and ratio >= TARGET),
    }


def report(r: dict, console: Console) -> None:
    ok = "[green]meets[/green]" if r["meets_target"] else "[red]misses[/red]"
    console.print(
        f"routing: A -> C global key fill of {r['store_bytes'] >> 20} MiB, A-C at "
        f"{r['slow_link_mbps']:g} Mb/s of key, A-B and B-C at {r['key_rate_mbps']:g}\n"
        f"  by hops: {r['hops_fill_mbps']:.2f} Mb/s (the paced key rate over A-C alone: "
        f"{r['ceiling_direct_mbps']:.2f})\n"
        f"  by key:  {r['key_fill_mbps']:.2f} Mb/s (through B alone: "
        f"{r['ceiling_via_b_mbps']:.2f})\n"
        f"  key over hops: {r['ratio_key_vs_hops']} (target {r['target']:g}): {ok}",
        highlight=False)
