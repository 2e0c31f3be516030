"""`qkdctl bench scaling`: the OTP tunnel's worker pool against its size (issue 20, item 4).

For each pool size N (default 1, 2, 4, 8, 16 workers per link end): two nodes A - B in
namespaces with the real node processes, N OTP workers at each end of their link, MTU
65449, and iperf3 TCP from A to B with 2 streams per worker, spread over N iperf3
processes (one iperf3 drives all its streams from one thread, so one process would be
the bottleneck long before 16 workers are). Then the same load over the bare underlay
between the same namespaces: the ceiling, measured at every N, in the same run.

Key is paused during a run, as in ``bench otp``, and each run sends a fixed share of the
key its rings hold after the refill (``iperf3 -n``), so a fast pool cannot run them dry
and a slow one still runs long enough to measure; the bare underlay runs for ``seconds``.

Meant for a machine with many cores (the device machine; ``bench/device/``): on two
cores it shows only that a larger pool does not help there.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import calibrate
from bench.all import machine
from bench.harness import Net
from bench.plotting import figure, finish, log_axes, save
from bench.runs import median_run
from bench.topology import line, tunnel_bench
from control.core import paths
from control.core.config import parse_size
from dataplane.ring import MAX_LANES
from dataplane.stats import IDX, LinkStats
from dataplane.tun import MAX_MTU

DEFAULT_WORKERS = (1, 2, 4, 8, 16)
STREAMS_PER_WORKER = 2
KEY_SHARE = 0.6  # of the key the A -> B ring holds after a refill, sent by one run

TEMPLATE = tunnel_bench("bench-scaling", 'mode = "proposed"\nworkers = {workers}',
                        line("AB", 205))


class ScalingNet(Net):
    """A - B, one OTP link with ``workers`` workers at each end."""

    TEMPLATE = TEMPLATE
    TAG = "bw"


def run_bytes(available: float, capacity: int, share: float = KEY_SHARE) -> int:
    """What one run sends: ``share`` of the key the fullest-drained ring still holds
    (``available``, a share of ``capacity``); the datagrams' own key (headers, MACs,
    TCP's acknowledgements the other way) is well under 1 % of it."""
    return max(1 << 20, int(available * capacity * share))


def lane_packets(net: Net, node: str, link: str) -> list[int]:
    """Data packets sent so far by each lane (worker) of ``node``'s end of ``link``."""
    st = LinkStats(paths.stats_name(net.prefix, node, link))
    try:
        return [int(v) for v in st.words[:MAX_LANES, IDX["tx_pkts"]]]
    finally:
        st.close()


def busiest_share(before: list[int], after: list[int]) -> float | None:
    """The busiest lane's share of a run's packets (1/N were N workers' shares even, 1.0
    when one worker carried all); None when no packet went."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(d)
    return max(d) / total if total > 0 else None


def scaling_rows(points: list[dict]) -> list[dict]:
    """Each point with its speedup over the smallest pool measured and its efficiency
    (speedup per worker added: 1.0 is linear), for the tunnel and the bare underlay."""
    if not points:
        return []
    base = min(points, key=lambda p: p["workers"])
    out = []
    for p in sorted(points, key=lambda p: p["workers"]):
        speedup = p["gbps"] / base["gbps"] if base["gbps"] > 0 else None
        scale = p["workers"] / base["workers"]
        out.append({**p, "speedup": speedup,
                    "efficiency": speedup / scale if speedup is not None else None,
                    "ratio_vs_ceiling": (p["gbps"] / p["ceiling_gbps"]
                                         if p.get("ceiling_gbps") else None)})
    return out


def run_point(net: ScalingNet, workers: int, seconds: float, repeat: int,
              capacity: int, console: Console) -> dict:
    """``repeat`` runs through the tunnel and ``repeat`` over the bare underlay, the
    medians of each."""
    streams = STREAMS_PER_WORKER * workers
    runs = []
    for _ in range(repeat):
        low = net.fill()
        before = lane_packets(net, "A", "A-B")
        nbytes = run_bytes(low, capacity)
        r = net.iperf("A", "B", max(seconds, 30.0), streams, procs=workers, nbytes=nbytes)
        r["busiest_lane_share"] = busiest_share(before, lane_packets(net, "A", "A-B"))
        r["fill_before"] = round(low, 3)
        runs.append(r)
    tunnel = median_run(runs)
    bare = median_run([net.iperf_bare(("A", "B"), seconds, streams, MAX_MTU, procs=workers)
                       for _ in range(repeat)])
    p = {"workers": workers, "streams": streams, "iperf3_procs": min(workers, streams),
         "gbps": tunnel["gbps"], "runs_gbps": tunnel["runs_gbps"],
         "seconds_per_run": tunnel["seconds"], "bytes_per_run": tunnel["bytes"],
         "retransmits": tunnel["retransmits"],
         "busiest_lane_share": tunnel["busiest_lane_share"],
         "ceiling_gbps": bare["gbps"], "ceiling_runs_gbps": bare["runs_gbps"]}
    console.print(f"  {workers:2} worker(s), {streams:2} streams: tunnel {p['gbps']:6.2f} Gb/s "
                  f"(runs {', '.join(f'{g:.2f}' for g in p['runs_gbps'])}; "
                  f"{p['seconds_per_run']:.1f} s each), bare underlay {p['ceiling_gbps']:6.2f}"
                  f" Gb/s, busiest worker {_pct(p['busiest_lane_share'])} of the packets")
    return p


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f} %"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def plot(rows: list[dict], out: Path) -> Path:
    fig, ax = figure()
    ws = [r["workers"] for r in rows]
    ax.plot(ws, [r["gbps"] for r in rows], "-o", label="OTP tunnel, direct, MTU 65449")
    ax.plot(ws, [r["ceiling_gbps"] for r in rows], "k:^", lw=0.8,
            label="bare underlay (ceiling), same load")
    base = rows[0]
    ax.plot(ws, [base["gbps"] * w / base["workers"] for w in ws], color="grey", lw=0.6,
            ls="--", label="linear from the smallest pool")
    log_axes(ax, ws, [str(w) for w in ws])
    return save(fig, ax, out, title="OTP worker pool scaling (2 iperf3 streams per worker)",
                xlabel="OTP workers per link end", ylabel="TCP throughput (Gb/s)")


def run(workers: tuple[int, ...] = DEFAULT_WORKERS, seconds: float = 2.0, repeat: int = 3,
        capacity: str = "4GiB", plot_path: Path | None = None,
        console: Console | None = None) -> dict:
    console = console or Console()
    cap = parse_size(capacity)
    cores = os.cpu_count() or 1
    console.print(f"[bold]bench scaling[/bold]: A - B in namespaces, {', '.join(map(str, workers))}"
                  f" OTP worker(s) per link end, {STREAMS_PER_WORKER} iperf3 streams per "
                  f"worker, median of {repeat} runs per point; {cores} cores, rings {capacity}")
    if max(workers) > cores:
        console.print(f"  note: {max(workers)} workers per end on {cores} cores: the larger "
                      f"pools share cores with each other and with iperf3")
    console.print("  calibrating the machine ...")
    calib = calibrate.run(console)
    points = []
    for n in workers:
        net = ScalingNet(console, workers=n, capacity=capacity)
        try:
            console.print(f"  {n} worker(s): bringing up {net.prefix} and filling rings ...")
            net.up()
            points.append(run_point(net, n, seconds, repeat, cap, console))
        finally:
            net.down()
    rows = scaling_rows(points)
    t = Table(title="OTP worker pool scaling, direct, MTU 65449, 2 streams per worker")
    for col in ("workers", "tunnel (Gb/s)", "speedup", "efficiency", "bare underlay (Gb/s)",
                "x ceiling", "busiest worker"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["workers"]), f"{r['gbps']:.2f}", _x(r["speedup"]),
                  _x(r["efficiency"]), f"{r['ceiling_gbps']:.2f}", _x(r["ratio_vs_ceiling"]),
                  _pct(r["busiest_lane_share"]))
    console.print(t)
    result = {"bench": "scaling", "machine": machine(), "cores": cores, "ring_capacity": capacity,
              "streams_per_worker": STREAMS_PER_WORKER, "seconds_bare": seconds,
              "repeat": repeat, "calibration": calib, "points": rows}
    return finish(result, console, plot_path, lambda out: plot(rows, out))
