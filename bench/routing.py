"""`qkdctl bench routing`: global key over a slow link, routed by hops against routed by key.

The triangle A, B, C: A-B and B-C at ``rate`` Mb/s of key, A-C at a tenth of it. A's
global key manager fills its store for C from empty to the high watermark while the
routers count hops (A-C is one hop: every byte crosses the slow link, paced to its key
rate) and then while they count key (``[routing] metric = "key"``: the fill spends the key
A-C has stored, A-C runs dry, and the rest goes through B until A-C has refilled). Each
run starts on a fresh network whose rings are stocked (A's global key manager paused until
then). The figure: the fill's rate, key over hops (``ratio_key_vs_hops``, target 1.5);
beside it the key rate of each path, the ceiling a fill over that path alone can reach.

Then multipath relay on the shipped 3x3 grid (``examples/grid9.toml``): A1's store for C3,
opposite corners, filled from empty with ``[gkm] paths = 1`` (whole blocks over one
4-hop path) and with ``paths = 2`` (two XOR shares over two node-disjoint 4-hop paths:
twice the link key and twice the tunnel work per block). The figure: k = 2 over k = 1
(``ratio_k2_vs_k1``, target 0.4).
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

from rich.console import Console

from bench.harness import BenchError, Net, wait_until
from bench.scale import with_prefix
from bench.topology import network, template, triangle
from control.core import paths
from control.core.statefile import read_status
from control.gkm.manager import PAUSE_FLAG

MIB = 1 << 20
TARGET = 1.5
TARGET_K2 = 0.4
GRID = Path(__file__).resolve().parent.parent / "examples" / "grid9.toml"
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

    def __init__(self, console: Console, template: str):
        self.TEMPLATE = template
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


def _grid_template(paths_k: int, high: int) -> str:
    """The shipped grid with its prefix a template field, ``paths`` = ``paths_k`` and the
    high watermark ``high`` (the fill to time)."""
    text = with_prefix(GRID.read_text().replace("{", "{{").replace("}", "}}"),
                       "{prefix}", GRID)
    text, m = re.subn(r'^high_watermark = .*$', f'high_watermark = {high}\npaths = {paths_k}',
                      text, count=1, flags=re.M)
    if m != 1:
        raise BenchError(f"{GRID}: no [gkm] high_watermark to set")
    return text


class GridNet(RoutingNet):
    TAG = "bg"

    def peer(self) -> dict:
        return (self.node_status("A1", "gkm.json").get("peers") or {}).get("C3") or {}

    def stocked(self) -> bool:
        """Every link end's ENC ring holds half its capacity."""
        return all(int(self.node_status(n, f"tun-{lk.name}.json").get("enc_stored", 0))
                   >= 0.5 * lk.sizes.ring_capacity
                   for lk in self.topo.links for n in (lk.a, lk.b))


def grid_fill_once(console: Console, paths_k: int, high: int, timeout: float) -> dict:
    net = GridNet(console, _grid_template(paths_k, high))
    try:
        net.up(paused_gkm=["A1", "C3"])
        wait_until(net.stocked, 120, "every ring of the grid half stocked")
        if paths_k > 1:  # and connected: the share routes wait out their hold first
            wait_until(lambda: ((net.peer().get("relay") or {}).get("paths") or {})
                       .get("connected") == paths_k, 60,
                       f"{paths_k} disjoint paths A1 -> C3, connected")
        t0 = time.monotonic()
        (paths.node_dir(net.prefix, "A1") / PAUSE_FLAG).unlink()
        wait_until(lambda: (net.peer().get("enc") or {}).get("usable") == high
                   and not net.peer()["enc"]["pending"], timeout,
                   f"A1's store for C3 full ({high >> 20} MiB) with {paths_k} path(s)",
                   step=0.05)
        seconds = time.monotonic() - t0
        relay = net.peer().get("relay") or {}
        return {"paths": paths_k, "seconds": round(seconds, 3),
                "fill_mbps": round(high * 8 / seconds / 1e6, 3),
                "retries": relay.get("retries"),
                "routes": (relay.get("paths") or {}).get("links") or [relay.get("path")],
                "path_rate_mbps": relay.get("path_rate_bps", 0) / 1e6}
    finally:
        net.down()


def fill_once(console: Console, rate: float, high: int, metric: str,
              timeout: float) -> dict:
    net = RoutingNet(console, _template(rate, high, metric))
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
        console: Console | None = None, grid_store_mib: int = 16,
        parts: str = "triangle,grid") -> dict:
    console = console or Console(stderr=True)
    if repeat < 1 or store_mib < 2 or rate <= 0:
        raise BenchError("--repeat must be at least 1, --store at least 2 MiB and the key "
                         "rate above 0")
    high = store_mib * MIB
    direct = rate / 10 / 2 * 0.9  # A-C's share of key A -> C, at the relay's pace
    via_b = rate / 2 * 0.9
    # hops: the fill crosses A-C at its paced rate; give it twice that long
    timeout = 2 * high * 8 / (direct * 1e6) + 60
    wanted = {x.strip() for x in parts.split(",")}
    if not wanted or wanted - {"triangle", "grid"}:
        raise BenchError(f"--parts names triangle and/or grid, not {parts!r}")
    if "triangle" in wanted:
        console.print(f"routing: A -> C global key fill of {store_mib} MiB on the triangle, "
                      f"A-B and B-C at {rate:g} Mb/s of key, A-C at {rate / 10:g}; routing by "
                      f"hops, then by key, {repeat} run(s) each, alternating", highlight=False)
    runs: dict[str, list[dict]] = {"hops": [], "key": []}
    for i in range(repeat if "triangle" in wanted else 0):
        for metric in ("hops", "key"):
            r = fill_once(console, rate, high, metric, timeout)
            runs[metric].append(r)
            console.print(f"  run {i + 1}/{repeat}, by {metric:4s}: {r['fill_mbps']:.2f} Mb/s "
                          f"({r['seconds']:.1f} s; {r['via_b_bytes'] / MIB:.1f} MiB through "
                          f"B; {r['route_changes_at_a']} route changes at A)",
                          highlight=False)
    med = {m: statistics.median(r["fill_mbps"] for r in rs) if rs else 0.0
           for m, rs in runs.items()}
    ratio = med["key"] / med["hops"] if med["hops"] else None
    grid_high = grid_store_mib * MIB
    if "grid" in wanted:
        console.print(f"routing: grid9 A1 -> C3 global key fill of {grid_store_mib} MiB, "
                      f"one path against two XOR shares over node-disjoint paths, {repeat} "
                      f"run(s) each, alternating", highlight=False)
    grid: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(repeat if "grid" in wanted else 0):
        for k in (1, 2):
            r = grid_fill_once(console, k, grid_high, 300.0)
            grid[k].append(r)
            console.print(f"  run {i + 1}/{repeat}, {k} path(s): {r['fill_mbps']:.2f} Mb/s "
                          f"({r['seconds']:.1f} s, {r['retries']} resends; paths "
                          f"{r['routes']})", highlight=False)
    gmed = {k: statistics.median(r["fill_mbps"] for r in rs) if rs else 0.0
            for k, rs in grid.items()}
    k2 = gmed[2] / gmed[1] if gmed[1] else None
    return {
        "bench": "routing", "key_rate_mbps": rate, "slow_link_mbps": rate / 10,
        "store_bytes": high, "repeat": repeat, "runs": runs,
        "hops_fill_mbps": round(med["hops"], 3), "key_fill_mbps": round(med["key"], 3),
        "ratio_key_vs_hops": round(ratio, 3) if ratio else None,
        "ceiling_direct_mbps": round(direct, 3), "ceiling_via_b_mbps": round(via_b, 3),
        "target": TARGET, "meets_target": bool(ratio and ratio >= TARGET),
        "grid_store_bytes": grid_high, "grid_runs": {str(k): v for k, v in grid.items()},
        "grid_k1_fill_mbps": round(gmed[1], 3), "grid_k2_fill_mbps": round(gmed[2], 3),
        "ratio_k2_vs_k1": round(k2, 3) if k2 else None, "target_k2": TARGET_K2,
        "meets_target_k2": bool(k2 and k2 >= TARGET_K2),
    }


def report(r: dict, console: Console) -> None:
    if r["runs"]["hops"]:
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
    if r.get("grid_runs", {}).get("1"):
        ok2 = "[green]meets[/green]" if r["meets_target_k2"] else "[red]misses[/red]"
        console.print(
            f"multipath: grid9 A1 -> C3 global key fill of {r['grid_store_bytes'] >> 20} "
            f"MiB\n"
            f"  1 path:  {r['grid_k1_fill_mbps']:.2f} Mb/s\n"
            f"  2 paths: {r['grid_k2_fill_mbps']:.2f} Mb/s (two XOR shares, node-disjoint)\n"
            f"  2 over 1: {r['ratio_k2_vs_k1']} (target {r['target_k2']:g}): {ok2}",
            highlight=False)
