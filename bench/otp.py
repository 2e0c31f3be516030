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

import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.ceiling import TARGETS, meets, verdict_line, vs
from bench.harness import KeyDry, Net
from bench.plotting import figure, finish, log_axes, paper_table, save
from bench.runs import median_run
from bench.topology import line, tunnel_bench
from dataplane.limits import MAX_UNDERLAY_MTU
from dataplane.stats import STEPS_RX, STEPS_TX
from dataplane.tun import MAX_MTU

PAPER = {"direct_mbps": 185.0, "relay_mbps": 123.0, "conventional_mbps": 3.92}
PATHS = {"direct": ("A", "B"), "relay": ("A", "B", "C")}
DEFAULT_MTUS = (1500, 9000, 16000, 32000, MAX_MTU)
STEP_NAMES = {"t_tx_read": "receive (TUN read)", "t_tx_key": "key read and remove",
              "t_tx_crypto": "XOR and MAC", "t_tx_send": "send (UDP)",
              "t_rx_recv": "receive (UDP)", "t_rx_key": "checks and key lookup",
              "t_rx_crypto": "MAC verify and XOR", "t_rx_write": "send (TUN write)"}

TEMPLATE = tunnel_bench("bench-otp", 'mode = "{mode}"\nworkers = {workers}',
                        line("ABC", 204))


class OtpNet(Net):
    """A - B - C with OTP tunnels of one mode, rings filled from paused emulators."""

    TEMPLATE = TEMPLATE
    TAG = "bo"


def _delta(after: dict, before: dict) -> dict:
    return {k: {f: after[k][f] - before[k][f] for f in after[k]} for k in after}


def _steps(d: dict[str, int], steps: tuple[str, ...], pkts_field: str) -> dict[str, float]:
    pkts = max(1, d[pkts_field])
    return {s: d[s] / pkts / 1000 for s in steps}  # microseconds per packet


DRY_RETRIES = 2  # a run that spent every byte of key is run again after a refill


def run_point(net: OtpNet, path: str, mtu: int, seconds: float, streams: int = 1) -> dict:
    """One iperf3 run through the tunnels of ``path``, after the rings were refilled.

    A kept range can hold an ENC ring's release point back by up to half the ring (see
    ``Net.fill``), so a full ring may offer only half its capacity: a fast run can spend
    it all. Such a run is refilled and run again (``dry_retries`` says how often), and
    the bench fails only when that keeps happening."""
    src, dst = "A", ("B" if path == "direct" else "C")
    net.set_mtu(mtu)
    for attempt in range(DRY_RETRIES + 1):
        low = net.fill()
        before = net.counters()
        try:
            r = net.iperf(src, dst, seconds, streams)
            break
        except KeyDry as e:
            if attempt == DRY_RETRIES:
                raise
            net.console.print(f"  {e}: refilled, running again", markup=False)
    delta = _delta(net.counters(), before)
    sender, receiver = delta[("A", "A-B")], delta[(dst, "A-B" if dst == "B" else "B-C")]
    drops = {k: v for (node, link), c in delta.items() for k, v in
             ((f"{node}:{link}:{f}", n) for f, n in c.items() if f.startswith("drop") and n)}
    return {
        "path": path, "mtu": mtu, **r, "fill_before": round(low, 3), "dry_retries": attempt,
        "key_limited": sender["drop_tx_nokey"] > 0,
        "packets": sender["tx_pkts"], "key_bytes": sender["tx_key"],
        "sender_steps_us": _steps(sender, STEPS_TX, "tx_pkts"),
        "receiver_steps_us": _steps(receiver, STEPS_RX, "rx_pkts"),
        "drops": drops,
    }


def run_ceiling(net: OtpNet, path: str, mtu: int, seconds: float, streams: int,
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
        net = OtpNet(console, mode=mode, workers=workers, capacity=capacity)
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
