"""`qkdctl bench relay`: global key relayed over 1, 2, 4, 8 hops of a 16-node ring (issue
6/6, item 4: the paper's claim that the network grows without losing its speed).

The nodes N1 .. N16 in a ring, each in its own namespace, with the real node processes.
For each hop count h, node N(1+h) keeps global key with N1 and fills its store for N1:
the ZeroMQ stream crosses h OTP links, and each of the h-1 relays decrypts it with one
link's key and encrypts it again with the next one's (kernel forwarding between TUNs).
The method is `bench gkm`'s: every key manager starts paused, the rings are filled from
the emulators, which are then paused, one origin at a time is released (the next fills
start after the store was emptied at once), and the key manager's own clock gives the
fill time.

On one machine every hop's tunnel workers share the same cores, so the figure at h hops
is the machine's total relay work divided by h, a lower bound for a network whose nodes
each have their own CPU (there the slowest hop sets the pace).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.gkm import GkmNet
from bench.harness import BenchError
from bench.plotting import figure, finish, log_axes, paper_table, save, verdict
from bench.topology import line, template
from control.core import paths

PAPER = {"mbps_at_1MB": 85.0}  # the paper's global key manager, 1 MB keys, one link
DEFAULT_HOPS = (1, 2, 4, 8)
NODES = 16
DEST = "N1"
IDLE_RING = "8MiB"  # links no measured key crosses

HEAD = """
[network]
name = "bench-relay"
prefix = "{{prefix}}"
[defaults]
key_rate_mbps = 0
block_size = "1MiB"
ring_capacity = "{{ring}}"
[dataplane]
workers = {workers}
[gkm]
block_size = {{block}}
low_watermark = {{low}}
high_watermark = {{high}}
window = {{window}}
pairs = [{pairs}]
"""


def ring_topology(nodes: int, net: int, measured: int) -> str:
    """N1 .. N<nodes> in a ring, as TOML for a str.format template (braces escaped): each
    link its own /30 in 10.<net>.<i>.0 and an unthrottled AES-CTR emulator as its source.
    The ``measured`` links N1-N2 .. carry the measured key towards N1 (routes between
    equally short paths take the lower link index, so N(1+h) -> N1 crosses the first h
    links): three quarters of their key goes that way (b -> a), so refilling is quicker;
    the other links carry only keepalives and get small rings."""
    return template(line([f"N{i}" for i in range(1, nodes + 1)], net, closed=True,
                         extra=lambda i: {"ratio": "1:3"} if i <= measured
                         else {"ring_capacity": IDLE_RING}))


def origin_of(hops: int) -> str:
    return f"N{1 + hops}"


def expected_path(hops: int) -> list[str]:
    """The nodes the measured key crosses from N(1+h) to N1: the first ``hops`` links."""
    return [f"N{i}" for i in range(hops + 1, 0, -1)]


class RelayNet(GkmNet):
    """The ring, with global key between N1 and each measured origin only."""

    TAG = "br"

    def __init__(self, nodes: int, hops: tuple[int, ...], block: int, store: int,
                 window: int, ring: str, workers: int, console: Console):
        pairs = ", ".join(f'["{DEST}", "{origin_of(h)}"]' for h in hops)
        self.TEMPLATE = (HEAD.format(workers=workers, pairs=pairs)
                         + ring_topology(nodes, 212, max(hops)))
        self._routed: set[str] = set()  # nodes seen with all their routes
        super().__init__(block, store, window, ring, console)

    def _ready(self) -> bool:
        """Every node has had a route to every other, not necessarily all at one moment:
        under load a late keepalive takes a link down for a second; each point waits
        for its own route before it measures."""
        self._routed.update(n for n in set(self.topo.nodes) - self._routed
                            if len(self.routes(n)) == len(self.topo.nodes) - 1)
        return len(self._routed) == len(self.topo.nodes)

    def path(self, src: str, dst: str) -> list[str]:
        """The nodes a packet from ``src`` to ``dst`` crosses, by the routers' routes."""
        nodes = [src]
        while nodes[-1] != dst and len(nodes) <= len(self.topo.nodes):
            via = self.routes(nodes[-1]).get(dst, {}).get("via")
            if via is None:
                return []
            nodes.append(self.topo.link(via).peer_of(nodes[-1]))
        return nodes


def check(hops: tuple[int, ...], nodes: int) -> None:
    if nodes < 3:
        raise BenchError(f"a ring needs at least 3 nodes, not {nodes}")
    if not hops or min(hops) < 1 or max(hops) > nodes // 2:
        raise BenchError(f"hop counts must be 1 to {nodes // 2} (half the ring of {nodes}), "
                         f"got {', '.join(map(str, hops)) or 'none'}")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def run(hops: tuple[int, ...] = DEFAULT_HOPS, nodes: int = NODES, block: int = 1 << 20,
        store: int = 32 << 20, window: int = 16 << 20, ring: str = "96MiB",
        workers: int = 1, repeat: int = 3, timeout: float = 120.0,
        plot_path: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    hops = tuple(sorted(set(hops)))
    check(hops, nodes)
    window = min(window, store)
    load_before = os.getloadavg()
    console.print(f"[bold]bench relay[/bold]: {nodes} nodes in a ring in namespaces; "
                  f"{_mib(store)} of global key ({_mib(block)} blocks) filled N(1+h) -> "
                  f"{DEST} over h = {', '.join(map(str, hops))} hops; median of {repeat} "
                  f"fills; {workers} worker(s) per link end; {os.cpu_count()} cores "
                  f"shared by all nodes (load {load_before[0]:.1f})")
    net = RelayNet(nodes, hops, block, store, window, ring, workers, console)
    points: list[dict] = []
    try:
        console.print(f"  bringing up {net.prefix} ({nodes} nodes, {nodes} links, rings "
                      f"{ring}) ...")
        net.up()
        for h in hops:
            origin = origin_of(h)
            want = expected_path(h)  # over the links with the big rings, not the other way
            route = net.path(origin, DEST)
            deadline = time.monotonic() + 15
            while route != want and time.monotonic() < deadline:
                time.sleep(0.2)  # a link seen down for a moment: wait for its route back
                route = net.path(origin, DEST)
            if route != want:
                raise BenchError(f"{origin} -> {DEST} is not routed over the first {h} "
                                 f"links but {' - '.join(route) or 'nowhere'}; logs in "
                                 f"{paths.log_dir(net.prefix)}")
            console.print(f"  {h} hop(s), {origin} -> {DEST} via "
                          f"{' - '.join(route[1:-1]) or 'no relay'}: filling rings ...")
            p = net.median_fill(origin, DEST, repeat, timeout)
            p.update(hops=h, origin=origin, dest=DEST, path=route)
            points.append(p)
            console.print(f"    {h} hop(s): {p['bytes'] >> 20} MiB in {p['seconds']:.2f} s = "
                          f"{p['gbps']:.2f} Gb/s (runs: "
                          f"{', '.join(f'{g:.2f}' for g in p['runs_gbps'])}; "
                          f"{p['retries']} retries)")
    finally:
        console.print(f"  removing {net.prefix} ...")
        net.down()
    result = summarize(points, plot_path, console)
    result.update(nodes=nodes, topology=f"ring of {nodes}", store_bytes=store,
                  block_bytes=block, window_bytes=window, ring_capacity=ring, workers=workers,
                  repeat=repeat, load_before=load_before, state_dir=str(paths.RUN_ROOT))
    return result


def summarize(points: list[dict], plot_path: Path | None, console: Console) -> dict:
    one = next((p for p in points if p["hops"] == 1), None)
    for p in points:
        p["ratio_to_1_hop"] = p["gbps"] / one["gbps"] if one and one["gbps"] else None
        p["hop_gbps"] = p["gbps"] * p["hops"]  # key carried over all the path's links
    t = Table(title="global key relayed over h hops of the ring (OTP tunnels, trusted relays)")
    for col in ("hops", "relays", "fill s", "Gb/s", "x 1 hop", "Gb/s x hops", "x paper"):
        t.add_column(col, justify="right")
    for p in points:
        ratio = p["ratio_to_1_hop"]
        t.add_row(str(p["hops"]), str(p["hops"] - 1), f"{p['seconds']:.2f}", f"{p['gbps']:.2f}",
                  f"{ratio:.2f}" if ratio is not None else "-", f"{p['hop_gbps']:.2f}",
                  f"{p['gbps'] * 1000 / PAPER['mbps_at_1MB']:.1f}")
    console.print(t)
    far = max(points, key=lambda p: p["hops"]) if points else None
    low = min(points, key=lambda p: p["gbps"]) if points else None
    result = {
        "bench": "relay", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "paper": PAPER,
        "hops": [p["hops"] for p in points],
        "gbps_at_1_hop": one["gbps"] if one else None,
        "max_hops": far["hops"] if far else None,
        "gbps_at_max_hops": far["gbps"] if far else None,
        "ratio_max_hops_vs_1_hop": far["ratio_to_1_hop"] if far else None,
        "ratio_vs_paper_at_max_hops": far["gbps"] * 1000 / PAPER["mbps_at_1MB"] if far else None,
        "keeps_advantage": bool(low and low["gbps"] * 1000 > PAPER["mbps_at_1MB"]),
        "points": points,
    }
    if far:
        rows = [(f"global key manager, 1 MB keys, over {p['hops']} hop(s)",
                 "85 Mb/s (1 link)", f"{p['gbps']:.2f} Gb/s",
                 f"{p['gbps'] * 1000 / PAPER['mbps_at_1MB']:.1f}") for p in points]
        console.print(paper_table(rows))
        console.print(f"over {far['hops']} hops: {far['ratio_to_1_hop'] or 0:.2f} x the 1-hop "
                      f"rate, all hops sharing {os.cpu_count()} cores; faster than the paper's "
                      f"one link at every hop count: " + verdict(result["keeps_advantage"]))
    return finish(result, console, plot_path, lambda out: plot(points, out))


def plot(points: list[dict], out: Path) -> Path:
    fig, ax = figure()
    hops = [p["hops"] for p in points]
    ax.plot(hops, [p["gbps"] * 1000 for p in points], "-o", label="global key fill rate")
    ax.plot(hops, [p["hop_gbps"] * 1000 for p in points], "--s",
            label="x hops (key carried over all links)")
    ax.axhline(PAPER["mbps_at_1MB"], color="grey", lw=0.8, ls=":")
    ax.text(hops[0], PAPER["mbps_at_1MB"] * 1.08, "paper: 85 Mb/s over one link", fontsize=8)
    log_axes(ax, hops, [str(h) for h in hops])
    return save(fig, ax, out, title="global key relayed through trusted nodes: rate against "
                                    "hop count", xlabel="hops (OTP links crossed)",
                ylabel="Mb/s")
