"""`qkdctl bench otp`: the OTP tunnel (module 2), iperf3 TCP through it, as the paper's
Fig. 5 (throughput against MTU) and Table I (time per processing step) in one run.

Three nodes in a line, A - B - C, each in its own namespace, with the real node processes
(key managers, tunnel managers with their worker pools, routers). *Direct* is iperf3 from
A to B over one OTP link; *via relay* is A to C, decrypted at B with the A-B key and
encrypted again with the B-C key. Each point runs the sweep's MTU on every tunnel.

Key supply: the rings are filled from the (unthrottled) emulators before each point and
the emulators are paused (SIGSTOP) while iperf3 runs, so the measurement is the tunnel's
own cost, as in the paper, where key came from QKD devices, not from the CPU under test.
A point that ran out of key says so (`key_limited`).

Modes: *proposed* (key claimed in 1 MiB chunks per worker, wiped as used, large MTU) and
*conventional* (the paper's baseline: key taken from the store and removed per packet).

Ceiling in the same run (``bench.bare_underlay``): after each point of the first mode, the
same iperf3 runs over the bare underlay of the same path, A - B or A - B - C through B's
kernel forwarding, with the point's MTU as the route's path MTU. The targets are ratios
of it at the largest MTU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import bare_underlay, iperf
from bench.ceiling import TARGETS, meets, verdict_line, vs
from bench.plotting import figure, finish, log_axes, paper_table, save
from bench.runs import median_run
from bench.topology import line
from control.core import paths
from control.core.config import Topology, parse_topology
from control.core.statefile import read_status
from control.tools import emulation
from dataplane.limits import MAX_UNDERLAY_MTU
from dataplane.ring import KeyRing, RingError
from dataplane.stats import STEPS_RX, STEPS_TX, LinkStats
from dataplane.tun import MAX_MTU

PAPER = {"direct_mbps": 185.0, "relay_mbps": 123.0, "conventional_mbps": 3.92}
PATHS = {"direct": ("A", "B"), "relay": ("A", "B", "C")}
DEFAULT_MTUS = (1500, 9000, 16000, 32000, MAX_MTU)
KEPT_LOGS = Path("/var/tmp/qkdnet-bench-logs")  # a failed bench's network logs, kept
STEP_NAMES = {"t_tx_read": "receive (TUN read)", "t_tx_key": "key read and remove",
              "t_tx_crypto": "XOR and MAC", "t_tx_send": "send (UDP)",
              "t_rx_recv": "receive (UDP)", "t_rx_key": "checks and key lookup",
              "t_rx_crypto": "MAC verify and XOR", "t_rx_write": "send (TUN write)"}

TEMPLATE = """
[network]
name = "bench-otp"
prefix = "{prefix}"
[defaults]
key_rate_mbps = 0
block_size = "1MiB"
ring_capacity = "{capacity}"
[dataplane]
mode = "{mode}"
workers = {workers}
[gkm]
pairs = []  # no global key: this network measures or tests other modules
""" + line("ABC", 204)


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class RingLevel:
    """How full a key ring is: ``available`` to its users (unclaimed in an ENC ring,
    unreleased in a DEC ring) and ``room_used`` (written and not yet freed: the writer
    can add only the rest), both shares of its capacity."""

    name: str
    is_enc: bool
    available: float
    room_used: float


class Net:
    """One bench network: brings it up, feeds and pauses key, runs iperf3 points.

    Subclasses set their own ``TEMPLATE`` and prefix ``TAG``; ``fields`` fill the template.
    """

    TEMPLATE = TEMPLATE
    TAG = "bo"

    def __init__(self, console: Console, **fields: object):
        self.prefix = self.TAG + uuid.uuid4().hex[:6]
        self.console = console
        self.cfg = paths.RUN_ROOT / f"bench-{self.prefix}.toml"
        self.cfg.parent.mkdir(parents=True, exist_ok=True)
        self.cfg.write_text(self.TEMPLATE.format(prefix=self.prefix, **fields))
        self.topo: Topology = parse_topology(self.cfg.read_text(), self.cfg)
        self.emulators: list[int] = []
        self.paused = False

    def ns(self, node: str) -> str:
        return paths.netns_name(self.prefix, node)

    def addr(self, node: str) -> str:
        return str(self.topo.node(node).address)

    def up(self) -> None:
        man = emulation.net_up(self.topo)
        self.emulators = [p for k, p in man.pids.items() if k.startswith("emulator:")]
        deadline = time.monotonic() + 60
        while not self._ready():
            if time.monotonic() > deadline:
                raise BenchError(f"network not ready within 60 s; logs in "
                                 f"{paths.log_dir(self.prefix)}")
            time.sleep(0.3)

    def routes(self, node: str) -> dict:
        """``node``'s routes as its router last published them ({} before it has)."""
        r = read_status(paths.node_dir(self.prefix, node) / "router.json")
        return (r or {}).get("routes", {})

    def _ready(self) -> bool:
        return all(len(self.routes(n)) == len(self.topo.nodes) - 1 for n in self.topo.nodes)

    def pause_key(self, paused: bool) -> None:
        for pid in self.emulators:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)
        self.paused = paused

    def fill(self, min_fill: float = 0.9, timeout: float = 40.0) -> float:
        """Let key flow until every ring is at least ``min_fill`` full; returns the
        lowest share of a ring's capacity still available to its users.

        Full means the writer has filled the room it has: key used but not yet freed
        counts (a worker's kept range may hold an ENC ring's release point back by up to
        its pin limit, half the ring, and the peer's DEC ring follows that release), so
        a ring whose release point is pinned is as full as it gets well below
        ``min_fill`` of key available, and waiting for more only ran out the timeout."""
        self.pause_key(False)
        deadline = time.monotonic() + timeout
        low = 0.0
        while time.monotonic() < deadline:
            rings = self.ring_levels()
            low = min((r.available for r in rings), default=0.0)
            if rings and min(r.room_used for r in rings) >= min_fill:
                break
            time.sleep(0.2)
        self.pause_key(True)
        return low

    def dry_rings(self, below: float = 0.01) -> list[str]:
        """ENC rings with less than ``below`` of their capacity left unclaimed."""
        return [r.name for r in self.ring_levels() if r.is_enc and r.available < below]

    def ring_levels(self) -> list[RingLevel]:
        """Every key ring of the network, as shares of its capacity."""
        out = []
        for name in paths.ring_names_of_network(self.prefix):
            if name.endswith("-stats"):
                continue
            with contextlib.suppress(RingError):
                r = KeyRing.attach(name)
                c = r.cursors()
                avail = c.write_pos - (c.claim_pos if r.is_enc else c.release_pos)
                out.append(RingLevel(name, r.is_enc, avail / c.capacity,
                                     (c.write_pos - r.free_pos) / c.capacity))
                r.close()
        return out

    def set_mtu(self, mtu: int) -> None:
        from pyroute2 import IPRoute

        for node in self.topo.nodes:
            with IPRoute(netns=self.ns(node)) as ip:
                for link in ip.get_links():
                    name = link.get_attr("IFLA_IFNAME")
                    if name.startswith("otp"):
                        ip.link("set", index=link["index"], mtu=mtu)

    def counters(self) -> dict[tuple[str, str], dict[str, int]]:
        out = {}
        for lk in self.topo.links:
            for node in (lk.a, lk.b):
                st = LinkStats(paths.stats_name(self.prefix, node, lk.name))
                out[(node, lk.name)] = st.totals()
                st.close()
        return out

    def iperf(self, src: str, dst: str, seconds: float, streams: int = 1) -> dict:
        """One iperf3 run between the node addresses (through the tunnels)."""
        return self._iperf(self.ns(src), self.addr(src), self.ns(dst), self.addr(dst),
                           seconds, streams)

    def iperf_bare(self, nodes: tuple[str, ...], seconds: float, streams: int = 1,
                   mtu: int | None = None) -> dict:
        """One iperf3 run over the bare underlay along ``nodes``, no tunnel (the ceiling):
        between underlay addresses, through the middle nodes' forwarding; with a path MTU
        of ``mtu`` if given."""
        netns = {n: self.ns(n) for n in self.topo.nodes}
        with bare_underlay.path(self.topo, netns, nodes, mtu) as (src, dst):
            return self._iperf(self.ns(nodes[0]), src, self.ns(nodes[-1]), dst, seconds,
                               streams)

    def _iperf(self, src_ns: str, src: str, dst_ns: str, dst: str, seconds: float,
               streams: int) -> dict:
        def hung(attempt: int) -> None:
            dry = self.dry_rings()
            if dry:  # key is paused during a run: a run that spends it all cannot go on
                raise BenchError(
                    f"iperf3 {src}->{dst} hung with no key left in {', '.join(dry)}: the "
                    f"run spent all the key its rings held (key is paused during runs); "
                    f"give a larger ring or a shorter run")
            self.console.print(f"  iperf3 {src}->{dst} hung (attempt {attempt + 1} of 3)")

        try:
            return iperf.run(src_ns, src, dst_ns, dst, seconds, streams, on_hang=hung)
        except iperf.IperfError as e:
            raise BenchError(f"{e}; logs in {paths.log_dir(self.prefix)}") from None

    def down(self) -> None:
        """Take the network down; when an exception is on its way out (the bench
        failed), first copy the network's logs to KEPT_LOGS, since down removes them."""
        if sys.exc_info()[0] is not None:
            kept = KEPT_LOGS / self.prefix
            with contextlib.suppress(OSError):
                shutil.copytree(paths.log_dir(self.prefix), kept, dirs_exist_ok=True)
                self.console.print(f"  the network's logs are kept in {kept}")
        with contextlib.suppress(Exception):
            self.pause_key(False)
        emulation.net_down(self.prefix)
        self.cfg.unlink(missing_ok=True)


def _delta(after: dict, before: dict) -> dict:
    return {k: {f: after[k][f] - before[k][f] for f in after[k]} for k in after}


def _steps(d: dict[str, int], steps: tuple[str, ...], pkts_field: str) -> dict[str, float]:
    pkts = max(1, d[pkts_field])
    return {s: d[s] / pkts / 1000 for s in steps}  # microseconds per packet


def run_point(net: Net, path: str, mtu: int, seconds: float, streams: int = 1) -> dict:
    src, dst = "A", ("B" if path == "direct" else "C")
    net.set_mtu(mtu)
    low = net.fill()
    before = net.counters()
    r = net.iperf(src, dst, seconds, streams)
    delta = _delta(net.counters(), before)
    sender, receiver = delta[("A", "A-B")], delta[(dst, "A-B" if dst == "B" else "B-C")]
    drops = {k: v for (node, link), c in delta.items() for k, v in
             ((f"{node}:{link}:{f}", n) for f, n in c.items() if f.startswith("drop") and n)}
    return {
        "path": path, "mtu": mtu, **r, "fill_before": round(low, 3),
        "key_limited": sender["drop_tx_nokey"] > 0,
        "packets": sender["tx_pkts"], "key_bytes": sender["tx_key"],
        "sender_steps_us": _steps(sender, STEPS_TX, "tx_pkts"),
        "receiver_steps_us": _steps(receiver, STEPS_RX, "rx_pkts"),
        "drops": drops,
    }


def run_ceiling(net: Net, path: str, mtu: int, seconds: float, streams: int,
                repeat: int) -> dict:
    """The median of ``repeat`` iperf3 runs over the bare underlay of ``path`` with the
    tunnel's MTU as the path MTU (a route's, so TCP sends segments the size the tunnel
    carries): the same TCP work without the tunnel."""
    runs = [net.iperf_bare(PATHS[path], seconds, streams, mtu) for _ in range(repeat)]
    return {"path": path, "mtu": mtu, "underlay_mtu": MAX_UNDERLAY_MTU, **median_run(runs)}


def plot(points: list[dict], out: Path, ceilings: list[dict] | None = None) -> Path:
    fig, ax = figure()
    for mode, style in (("proposed", "-o"), ("conventional", "--s")):
        for path in ("direct", "relay"):
            pts = sorted((p["mtu"], p["gbps"] * 1000) for p in points
                         if p["mode"] == mode and p["path"] == path)
            if pts:
                ax.plot([m for m, _ in pts], [v for _, v in pts], style,
                        label=f"{mode}, {'direct' if path == 'direct' else 'via relay'}")
    for path, style in (("direct", "k:^"), ("relay", "k:v")):
        pts = sorted((c["mtu"], c["gbps"] * 1000) for c in ceilings or [] if c["path"] == path)
        if pts:
            ax.plot([m for m, _ in pts], [v for _, v in pts], style, lw=0.8,
                    label=f"bare underlay (ceiling), {path}")
    ax.axhline(PAPER["direct_mbps"], color="grey", lw=0.8, ls=":")
    ax.text(1500, PAPER["direct_mbps"] * 1.08, "paper: 185 Mb/s direct", fontsize=8)
    ax.axhline(PAPER["conventional_mbps"], color="grey", lw=0.8, ls=":")
    ax.text(1500, PAPER["conventional_mbps"] * 1.08, "paper: 3.92 Mb/s conventional",
            fontsize=8)
    mtus = sorted({p["mtu"] for p in points})
    log_axes(ax, mtus, [str(m) for m in mtus], base=10)
    return save(fig, ax, out, title="OTP tunnel throughput against MTU (cf. paper Fig. 5)",
                xlabel="tunnel MTU (bytes)", ylabel="TCP throughput (Mb/s)")


def run(mtus: tuple[int, ...] = DEFAULT_MTUS, seconds: float = 1.5, workers: int = 0,
        repeat: int = 3, streams: int = 1,
        capacity: str = "1GiB", modes: tuple[str, ...] = ("proposed", "conventional"),
        plot_path: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    workers = workers or (os.cpu_count() or 1)
    console.print(f"[bold]bench otp[/bold]: A - B - C in namespaces, iperf3 TCP {seconds} s "
                  f"per run ({streams} stream(s)), median of {repeat} runs per point, "
                  f"{workers} worker(s) per link "
                  f"end, {os.cpu_count()} cores, rings {capacity}")
    points: list[dict] = []
    ceilings: list[dict] = []
    for mode in modes:
        net = Net(console, mode=mode, workers=workers, capacity=capacity)
        try:
            console.print(f"  {mode}: bringing up {net.prefix} and filling rings ...")
            net.up()
            for path in ("direct", "relay"):
                for mtu in mtus:
                    runs = [run_point(net, path, mtu, seconds, streams) for _ in range(repeat)]
                    p = {"mode": mode, **median_run(runs),
                         "key_limited": any(r["key_limited"] for r in runs)}
                    points.append(p)
                    console.print(f"  {mode:12} {path:6} MTU {mtu:5}: {p['gbps']:6.2f} Gb/s "
                                  f"(median of {repeat}: "
                                  f"{', '.join(f'{g:.2f}' for g in p['runs_gbps'])})"
                                  + ("  (ran out of key)" if p["key_limited"] else ""))
                    if mode == modes[0]:  # the ceiling once, in the first network
                        c = run_ceiling(net, path, mtu, seconds, streams, repeat)
                        ceilings.append(c)
                        console.print(f"  {'bare':12} {path:6} MTU {mtu:5}: {c['gbps']:6.2f} "
                                      f"Gb/s (underlay, no tunnel; median of {repeat}: "
                                      f"{', '.join(f'{g:.2f}' for g in c['runs_gbps'])})")
        finally:
            net.down()
    result = summarize(points, mtus, workers, plot_path, console, ceilings)
    result.update(seconds=seconds, repeat=repeat, streams=streams, ring_capacity=capacity)
    return result


def _best(points: list[dict], mode: str, path: str, mtu: int | None = None) -> dict | None:
    cands = [p for p in points if p["mode"] == mode and p["path"] == path
             and (mtu is None or p["mtu"] == mtu)]
    return max(cands, key=lambda p: p["gbps"]) if cands else None


def summarize(points: list[dict], mtus: tuple[int, ...], workers: int,
              plot_path: Path | None, console: Console,
              ceilings: list[dict] | None = None) -> dict:
    top = max(mtus)
    direct = _best(points, "proposed", "direct", top)
    relay = _best(points, "proposed", "relay", top)
    conv = _best(points, "conventional", "direct", 1500) if 1500 in mtus else None
    conv_relay = _best(points, "conventional", "relay", 1500) if 1500 in mtus else None
    d_gbps = direct["gbps"] if direct else 0.0
    r_gbps = relay["gbps"] if relay else 0.0
    ceil = {c["path"]: c["gbps"] for c in ceilings or [] if c["mtu"] == top}
    for p in points:  # each point beside the bare underlay at its MTU, where measured
        c = next((c for c in ceilings or [] if (c["path"], c["mtu"]) == (p["path"], p["mtu"])),
                 None)
        p["ratio_vs_ceiling"] = vs(p["gbps"], c["gbps"]) if c else None
    result = {
        "bench": "otp", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "workers": workers, "paper": PAPER, "floor": TARGETS["otp"],
        "direct_gbps": d_gbps, "relay_gbps": r_gbps,
        "baseline_gbps": conv["gbps"] if conv else None,
        "baseline_relay_gbps": conv_relay["gbps"] if conv_relay else None,
        "ratio_direct_vs_paper": d_gbps * 1000 / PAPER["direct_mbps"],
        "ratio_relay_vs_paper": r_gbps * 1000 / PAPER["relay_mbps"],
        "ratio_vs_baseline": d_gbps / conv["gbps"] if conv and conv["gbps"] else None,
        "ceiling_direct_gbps": ceil.get("direct"), "ceiling_relay_gbps": ceil.get("relay"),
        "ratio_direct_vs_ceiling": vs(d_gbps if direct else None, ceil.get("direct")),
        "ratio_relay_vs_ceiling": vs(r_gbps if relay else None, ceil.get("relay")),
        "points": points, "ceiling_points": ceilings or [],
    }
    result["meets_floor"] = meets(result, "otp")
    t = Table(title="OTP tunnel, iperf3 TCP (Gb/s) against MTU — cf. paper Fig. 5")
    t.add_column("mode / path")
    for m in mtus:
        t.add_column(str(m), justify="right")
    for mode in ("proposed", "conventional"):
        for path in ("direct", "relay"):
            row = [_best(points, mode, path, m) for m in mtus]
            if any(row):
                t.add_row(f"{mode}, {path}", *(f"{p['gbps']:.2f}" if p else "-" for p in row))
    for path in ("direct", "relay"):
        row = [next((c for c in ceilings or [] if c["path"] == path and c["mtu"] == m), None)
               for m in mtus]
        if any(row):
            t.add_row(f"bare underlay (ceiling), {path}",
                      *(f"{c['gbps']:.2f}" if c else "-" for c in row))
    console.print(t)
    s = Table(title="time per packet and step, direct (us) — cf. paper Table I")
    s.add_column("step")
    cols = [(m, p) for m, p in (("proposed", direct), ("conventional", conv)) if p]
    for mode, p in cols:
        s.add_column(f"{mode} (MTU {p['mtu']})", justify="right")
    for side, steps in (("sender_steps_us", STEPS_TX), ("receiver_steps_us", STEPS_RX)):
        for st in steps:
            s.add_row(("sender: " if side.startswith("sender") else "receiver: ")
                      + STEP_NAMES[st], *(f"{p[side][st]:.1f}" for _, p in cols))
    console.print(s)
    rows = [("direct", "185 Mb/s", f"{d_gbps:.2f} Gb/s",
             f"{result['ratio_direct_vs_paper']:.1f}"),
            ("via one relay", "123 Mb/s", f"{r_gbps:.2f} Gb/s",
             f"{result['ratio_relay_vs_paper']:.1f}")]
    if conv:
        rows.append(("conventional (MTU 1500, per-packet key removal)", "3.92 Mb/s",
                     f"{conv['gbps']:.3f} Gb/s", f"{conv['gbps'] * 1000 / 3.92:.1f}"))
    console.print(paper_table(rows))
    if result["ratio_vs_baseline"]:
        console.print(f"proposed / conventional measured in this run: "
                      f"{result['ratio_vs_baseline']:.1f}x")
    for path, g in (("direct", d_gbps), ("relay", r_gbps)):
        if ceil.get(path):
            console.print(f"{path}: {g:.2f} Gb/s through the tunnel, {ceil[path]:.2f} Gb/s over "
                          f"the bare underlay (same run): {g / ceil[path]:.2f} of the ceiling")
    console.print(verdict_line(result, "otp"))
    return finish(result, console, plot_path, lambda out: plot(points, out, ceilings))
