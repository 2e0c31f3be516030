"""`qkdctl bench guard`: legitimate iperf3 through the OTP tunnel while an attacker floods
the receiving link end with forged datagrams, with the XDP guard on and off in one run.

Two nodes A - B in namespaces with the real node processes, and a third namespace, the
attacker, wired to A, which forwards its packets onto the A-B underlay: they reach B's
guarded interface as an attacker on the underlay network would. The flood (bench/flood.py)
mixes datagrams from the attacker's own address, spoofed from A's address with malformed
headers, and spoofed well-formed replays of long-released key positions, to every one of
B's worker ports. iperf3 TCP runs A -> B meanwhile (B's workers receive both). A second
flood, *ahead*, sends well-formed datagrams spoofed from A's address naming key just beyond
what B has stored, on every lane: the guard cannot tell them from genuine traffic (only
the MAC, whose key has not arrived, can), so B's workers park them instead of waiting;
legitimate throughput under it must stay at least 0.8 of the clean figure.

Per guard state, each point the median of ``repeat`` runs: *clean* (no flood) and
*flood* (and, guard on, *stale* and *ahead*), run in interleaved rounds (clean, flood,
stale, ahead, then again) so that the machine's drift between runs falls on each kind
alike; the ahead figure is the median of the per-round ratios ahead / clean.
Measured: legitimate throughput, CPU seconds per second of B's workers, what the guard and
the workers dropped. The figures are the ratios guard on / guard off under the flood; the
clean points show what the guard costs legitimate traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.harness import BenchError, Net
from bench.plotting import verdict
from bench.runs import median_run
from bench.topology import line, tunnel_bench
from control.core import paths
from control.tools import emulation
from dataplane.bpf.guard import DROP_REASONS

TEMPLATE = tunnel_bench("bench-guard", 'workers = {workers}\nguard = "{guard}"',
                        line("AB", 207))
ATTACKER_NET = ("10.207.9.1", "10.207.9.2")  # the attacker, and A's side of its veth
AHEAD_FLOOR = 0.8  # legitimate throughput under the flood naming key ahead, over clean
# The flood naming key ahead is paced: the flood process shares the machine's cores with
# the tunnel (on two cores an unpaced flood of any kind halves the legitimate stream by
# the CPU it takes, as the unpaced flood the guard drops whole shows beside it).
AHEAD_FLOOD_PPS = 20_000


class GuardNet(Net):
    TEMPLATE = TEMPLATE
    TAG = "bg"

    @property
    def attacker_ns(self) -> str:
        return paths.netns_name(self.prefix, "attacker")  # removed by net down with the rest

    def up(self) -> None:
        super().up()
        x, a = self.attacker_ns, self.ns("A")
        emulation.claim_namespace(self.prefix, x)  # so net down removes it with the rest
        atk, gw = ATTACKER_NET
        ul_a = str(self.topo.link("A-B").underlay_a.ip)
        steps = [
            ["ip", "netns", "add", x],
            ["ip", "-n", x, "link", "add", "atk0", "type", "veth", "peer", "name", "atk1",
             "netns", a],
            ["ip", "-n", x, "addr", "add", f"{atk}/30", "dev", "atk0"],
            ["ip", "-n", a, "addr", "add", f"{gw}/30", "dev", "atk1"],
            ["ip", "-n", x, "link", "set", "atk0", "up"],
            ["ip", "-n", a, "link", "set", "atk1", "up"],
            ["ip", "-n", x, "route", "add", "default", "via", gw],
            # B routes replies toward the attacker: its address looks like any host's
            ["ip", "-n", self.ns("B"), "route", "add", f"{atk}/32", "via", ul_a],
            # A forwards, and takes packets claiming its own address from the attacker's
            # side (a spoofing attacker on a shared underlay; these sysctls are A's own)
            ["ip", "netns", "exec", a, "sh", "-c",
             "echo 1 > /proc/sys/net/ipv4/ip_forward; "
             "echo 1 > /proc/sys/net/ipv4/conf/atk1/accept_local; "
             "echo 0 > /proc/sys/net/ipv4/conf/atk1/rp_filter; "
             "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter"],
        ]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise BenchError(f"attacker setup: {' '.join(cmd)}: {r.stderr.strip()}")

    def flood(self, seconds: float, size: int, ahead: bool = False,
              stale: bool = False) -> subprocess.Popen:
        link = self.topo.link("A-B")
        ring = paths.ring_name(self.prefix, "B", "A-B", "ab")  # B's DEC ring of A's key
        return subprocess.Popen(
            ["ip", "netns", "exec", self.attacker_ns, sys.executable, "-P", "-m", "bench.flood",
             "--seconds", str(seconds), "--src", ATTACKER_NET[0],
             "--peer", str(link.underlay_a.ip), "--dst", str(link.underlay_b.ip),
             "--port-lo", str(self.topo.ports.tunnel), "--ports",
             str(self.topo.dataplane.workers), "--link", str(link.index), "--direction", "0",
             "--size", str(size),
             *(["--ahead-ring", ring, "--pps", str(AHEAD_FLOOD_PPS)] if ahead else []),
             *(["--stale-only", "--pps", str(AHEAD_FLOOD_PPS)] if stale else [])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=Path(__file__).resolve().parents[1])

    def b_tunnel(self) -> dict:
        return json.loads((paths.node_dir(self.prefix, "B") / "tun-A-B.json").read_text())


def worker_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used (0 for one that is gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
    return total / tick


def guard_drops(tun: dict) -> dict[str, int]:
    counts = (tun.get("guard") or {}).get("counts") or {}
    return {r: counts.get(r, {}).get("packets", 0) for r in DROP_REASONS}


def run_point(net: GuardNet, flood: bool, seconds: float, size: int,
              ahead: bool = False, stale: bool = False) -> dict:
    net.fill()
    tun = net.b_tunnel()
    pids = [w["pid"] for w in tun["workers"] if w["pid"]]
    proc = net.flood(seconds + 1.5, size, ahead, stale) if flood else None
    flood_cpu = 0.0
    try:
        if proc is not None:
            time.sleep(0.5)  # the flood at full rate before iperf3 starts
        c0, g0, t0 = net.counters()[("B", "A-B")], guard_drops(tun), time.monotonic()
        cpu0 = worker_cpu_s(pids)
        f0 = worker_cpu_s([proc.pid]) if proc is not None else 0.0
        r = net.iperf("A", "B", seconds)
        cpu = worker_cpu_s(pids) - cpu0
        flood_cpu = worker_cpu_s([proc.pid]) - f0 if proc is not None else 0.0
        dt = time.monotonic() - t0
        time.sleep(0.6)  # the guard's counters reach B's status file
        c1, g1 = net.counters()[("B", "A-B")], guard_drops(net.b_tunnel())
    finally:
        sent = None
        if proc is not None:
            out, errs = proc.communicate(timeout=seconds + 30)
            if proc.returncode:
                raise BenchError(f"flood failed: {errs.strip()[-300:]}")
            sent = json.loads(out.strip().splitlines()[-1])
    worker_drops = {k[len("drop_rx_"):]: c1[k] - c0[k] for k in c1
                    if k.startswith("drop_rx_") and c1[k] - c0[k]}
    return {"flood": flood, "ahead": ahead, "stale": stale, "gbps": r["gbps"],
            "worker_cpu_per_s": cpu / dt, "flood_cpu_per_s": flood_cpu / dt,
            "flood_pps": sum(sent["sent"].values()) / sent["seconds"] if sent else 0.0,
            "flood_sent": sent["sent"] if sent else None,
            "xdp_drops": {k: g1[k] - g0[k] for k in g1},
            "worker_drops": worker_drops}


def _median(runs: list[dict]) -> dict:
    p = median_run(runs)
    p["worker_cpu_per_s"] = statistics.median(x["worker_cpu_per_s"] for x in runs)
    p["flood_cpu_per_s"] = statistics.median(x["flood_cpu_per_s"] for x in runs)
    return p


def run(seconds: float = 1.5, repeat: int = 3, size: int = 128, workers: int = 0,
        capacity: str = "2GiB", console: Console | None = None) -> dict:
    console = console or Console()
    workers = workers or (os.cpu_count() or 1)
    console.print(f"[bold]bench guard[/bold]: A - B plus an attacker namespace forwarding "
                  f"through A; iperf3 TCP A->B {seconds} s per run, median of {repeat}; "
                  f"flood of {size} B forged datagrams; {workers} worker(s) per link end, "
                  f"{os.cpu_count()} cores")
    points: dict[str, dict] = {}
    rounds: dict[str, list[float]] = {}  # per round, a flood kind's throughput / clean's
    modes: dict[str, str] = {}
    for guard in ("auto", "off"):
        net = GuardNet(console, workers=workers, capacity=capacity, guard=guard)
        try:
            console.print(f"  guard {guard}: bringing up {net.prefix} ...")
            net.up()
            g = net.b_tunnel().get("guard") or {}
            state = "on" if g.get("state") == "on" else "off"
            if guard == "auto" and state != "on":
                raise BenchError(f"the guard did not attach: {g.get('reason')} "
                                 f"(qkdctl doctor tells why)")
            modes[state] = g.get("mode", "-")
            kinds = [("clean", False, False, False), ("flood", True, False, False)]
            if state == "on":
                kinds += [("stale", True, False, True), ("ahead", True, True, False)]
            # Interleaved (clean, flood, ... then again), so that the machine's drift
            # between runs falls on every kind alike; ratios are taken per round.
            runs: dict[str, list[dict]] = {name: [] for name, *_ in kinds}
            for _ in range(repeat):
                for name, flood, ahead, stale in kinds:
                    runs[name].append(run_point(net, flood, seconds, size, ahead, stale))
            if state == "on":
                rounds["ahead"] = [a["gbps"] / c["gbps"] if c["gbps"] else 0.0
                                   for a, c in zip(runs["ahead"], runs["clean"], strict=True)]
                rounds["stale"] = [a["gbps"] / c["gbps"] if c["gbps"] else 0.0
                                   for a, c in zip(runs["stale"], runs["clean"], strict=True)]
            for name, flood, *_ in kinds:
                p = _median(runs[name])
                key = f"{state}_{name}"
                points[key] = p
                console.print(
                    f"  guard {state:3} {key.split('_')[1]:5}: "
                    f"{p['gbps']:6.2f} Gb/s, B's workers {p['worker_cpu_per_s']:.2f} CPU s/s"
                    + (f", flood {p['flood_pps']:,.0f} pkt/s, dropped by XDP "
                       f"{sum(p['xdp_drops'].values()):,}, by workers "
                       f"{sum(p['worker_drops'].values()):,}" if flood else ""))
        finally:
            net.down()
    return summarize(points, modes, workers, seconds, repeat, size, console, rounds)


def summarize(points: dict[str, dict], modes: dict[str, str], workers: int, seconds: float,
              repeat: int, size: int, console: Console,
              rounds: dict[str, list[float]] | None = None) -> dict:
    on, off = points["on_flood"], points["off_flood"]
    ratio_gbps = on["gbps"] / off["gbps"] if off["gbps"] else None
    ratio_cpu = on["worker_cpu_per_s"] / off["worker_cpu_per_s"] \
        if off["worker_cpu_per_s"] else None
    result = {
        "bench": "guard", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "workers": workers, "seconds": seconds, "repeat": repeat, "flood_size": size,
        "guard_mode": modes.get("on"),
        "flood_gbps_on": on["gbps"], "flood_gbps_off": off["gbps"],
        "clean_gbps_on": points["on_clean"]["gbps"], "clean_gbps_off": points["off_clean"]["gbps"],
        "ratio_gbps_on_vs_off": ratio_gbps,
        "worker_cpu_on": on["worker_cpu_per_s"], "worker_cpu_off": off["worker_cpu_per_s"],
        "ratio_worker_cpu_on_vs_off": ratio_cpu,
        "guard_helps": bool(ratio_gbps and ratio_gbps > 1.0 and ratio_cpu and ratio_cpu < 1.0),
        "points": points,
    }
    rounds = rounds or {}
    ahead = points.get("on_ahead")
    if ahead is not None:
        clean = points["on_clean"]["gbps"]
        result["ahead_gbps"] = ahead["gbps"]
        # The median of the per-round ratios when the rounds were interleaved (each
        # ahead run beside its own clean run), else the ratio of the medians.
        result["ratio_ahead_vs_clean"] = statistics.median(rounds["ahead"]) \
            if rounds.get("ahead") else (ahead["gbps"] / clean if clean else None)
        result["ratio_ahead_vs_clean_rounds"] = rounds.get("ahead")
        result["ahead_holds"] = bool(result["ratio_ahead_vs_clean"]
                                     and result["ratio_ahead_vs_clean"] >= AHEAD_FLOOR)
    stale = points.get("on_stale")
    if stale is not None and ahead is not None:
        clean = points["on_clean"]["gbps"]
        result["ratio_stale_vs_clean"] = statistics.median(rounds["stale"]) \
            if rounds.get("stale") else (stale["gbps"] / clean if clean else None)
        result["ratio_stale_vs_clean_rounds"] = rounds.get("stale")
        result["ratio_ahead_vs_stale"] = ahead["gbps"] / stale["gbps"] \
            if stale["gbps"] else None
    t = Table(title=f"XDP guard ({modes.get('on', '-')} mode) under a forged-datagram flood: "
                    "legitimate iperf3 A->B and B's OTP workers")
    for col in ("guard", "flood", "Gb/s", "worker CPU s/s", "flood pkt/s", "flood CPU s/s",
                "dropped in XDP", "dropped by workers"):
        t.add_column(col, justify="left" if col in ("guard", "flood") else "right")
    for key in ("on_clean", "off_clean", "on_flood", "off_flood", "on_stale", "on_ahead"):
        if key not in points:
            continue
        p = points[key]
        state, fl = key.split("_")
        t.add_row(state, fl, f"{p['gbps']:.2f}", f"{p['worker_cpu_per_s']:.2f}",
                  f"{p['flood_pps']:,.0f}" if p["flood"] else "-",
                  f"{p['flood_cpu_per_s']:.2f}" if p["flood"] else "-",
                  f"{sum(p['xdp_drops'].values()):,}", f"{sum(p['worker_drops'].values()):,}")
    console.print(t)
    if ratio_gbps is not None and ratio_cpu is not None:
        clean = result["clean_gbps_on"] / max(result["clean_gbps_off"], 1e-9)
        result["ratio_clean_gbps_on_vs_off"] = clean
        console.print(f"under the flood, guard on / off: throughput {ratio_gbps:.2f}x, "
                      f"workers' CPU {ratio_cpu:.2f}x; without a flood: throughput "
                      f"{clean:.2f}x (the paper has no guard: the baseline is guard off)")
    console.print("guard helps under the flood (more throughput, less worker CPU): "
                  + verdict(result["guard_helps"]))
    if ahead is not None:
        console.print(f"under a flood naming key ahead of the ring: "
                      f"{result['ratio_ahead_vs_clean'] or 0:.2f} of the clean throughput "
                      f"(at least {AHEAD_FLOOR}): " + verdict(result["ahead_holds"]))
        if result.get("ratio_ahead_vs_stale") is not None:
            console.print(f"the same rate of replays the guard drops at first sight: "
                          f"{result['ratio_stale_vs_clean']:.2f} of clean; ahead / that: "
                          f"{result['ratio_ahead_vs_stale']:.2f} (what the workers' "
                          f"parking costs beyond the flood's own cost to the machine)")
    return result
