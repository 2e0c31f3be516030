"""`qkdctl bench keyrate`: global key and the key it costs at real QKD key rates.

Real QKD links give 1-100 Mb/s (the emulator's 1 Gb/s is a stress setting), so key, not
CPU, is what global key is made of. Per QKD rate, the triangle A, B, C with every link at
that rate and every size derived from it (control.core.sizing), global key kept for the pair
A-B only, B's key manager paused, routed by hops (so it stays on link A-B), so on link A-B
nothing but A->B global key, its acknowledgements, the keepalives and the relay's
heartbeats spends key:

- *time to first global key*: from starting the nodes to A's first usable block for B;
- *fill*: global key acknowledged A->B per second, measured over a window of the fill
  that follows (the store's high watermark is set out of reach, so it fills throughout);
- *efficiency*: global key acknowledged over the local key link A-B used in both
  directions (pads, MAC keys, keepalives, waste) in that window, from the rings' own
  accounting (invariant 8): the share of QKD key that became global key. Each counter
  is taken as a rate between the times its own process published it, so the three
  processes' publishing clocks do not skew the ratio;
- *idle*: local key a link spends per second once every key manager is paused and nothing
  flows (keepalives and heartbeats), the most of the three links, over at least two of
  the relay's ping periods (60 s apart at 50 kb/s: a shorter window could hold none).

Below 1 Mb/s (long spans) the fill is measured over 60 s: a global key block there takes
seconds.

The ceiling is the key the direction A->B gets (the link's rate times its share): the fill
cannot exceed it. The baseline is the same network in the conventional dataplane mode
(MTU 1500, key removed per packet), at one rate: the per-packet overhead it spends.
The paper has no figure at these rates (its links gave 1 Gb/s).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.table import Table

from bench.gkm import GkmNet
from bench.harness import BenchError
from bench.plotting import figure, finish, log_axes, save, verdict
from bench.topology import line, template
from control.core import paths
from control.core.statefile import read_status
from control.gkm.manager import PAUSE_FLAG
from control.lkm.accounting import link_end

FLOOR = {"efficiency_at_10mbps": 0.8, "efficiency_at_100mbps": 0.8,
         "fill_mbps_at_1mbps": 0.3, "idle_burn_kbps": 16.0}
DEFAULT_RATES = (1.0, 10.0, 100.0, 1000.0)
# The fill is measured this long (else 4 s): the global key in flight at its two ends (at
# most the relay's window, 1 s of the link's key, 16 MiB at most) moves the efficiency
# by up to that window over the key spent.
WINDOW_S = {1.0: 20.0, 10.0: 30.0, 100.0: 30.0, 1000.0: 10.0}
SLOW_WINDOW_S = 60.0  # below 1 Mb/s
IDLE_S = 15.0  # at least; and two of the relay's ping periods
TEMPLATE = """
[network]
name = "bench-keyrate"
prefix = "{prefix}"
[defaults]
key_rate_mbps = {rate}
[dataplane]
mode = "{mode}"
[gkm]
high_watermark = "{high}"
pairs = [["A", "B"]]
[routing]
metric = "hops"  # the pair's key stays on link A-B, whose economy this measures
""" + template(line("ABC", 207, closed=True))


class Sample(NamedTuple):
    """A counter's value and the wall-clock time (s) its process published it."""

    at: float
    value: int


def rate_between(a: Sample, b: Sample) -> float:
    """The counter's rate (per second) between two samples, each at its own publication
    time: the global key manager and each link end publish on their own clocks (every
    0.5-1 s), so taking two readings at one moment mixes counts up to a second apart
    (which once read an efficiency of 1.13, above what is possible)."""
    if b.at <= a.at:
        raise BenchError("a status was not republished during the window")
    return (b.value - a.value) / (b.at - a.at)


def spread(unacked: int, link_key: int) -> float | None:
    """A bound on what acknowledgements trailing the key spent can move the efficiency
    by: what was sent and not yet acknowledged (at most the relay's window), at either
    end of the measuring window. (Not the error of a fill still ramping up, which the
    rates' slightly different intervals would add: the window starts 3 s into the fill.)"""
    return unacked / link_key if link_key > 0 else None


class KeyrateNet(GkmNet):
    """The triangle at one key rate; B's key manager paused, A's running from the start."""

    TEMPLATE = TEMPLATE
    TAG = "bk"

    def __init__(self, rate: float, mode: str, high: int, console: Console):
        super(GkmNet, self).__init__(console, rate=rate, mode=mode, high=high)
        self.rate = rate

    def up(self) -> None:
        super(GkmNet, self).up(paused_gkm=("B",), ready=False)  # sets ``started``

    def pause_gkm(self, node: str) -> None:
        d = paths.node_dir(self.prefix, node)
        (d / PAUSE_FLAG).touch()

    def relay(self, status: dict | None = None) -> dict:
        """The relay A->B in A's global key manager status (read now if not given)."""
        st = self.gkm("A") if status is None else status
        return ((st.get("peers") or {}).get("B") or {}).get("relay") or {}

    def acked(self) -> tuple[Sample, int]:
        """Global key acknowledged A->B so far, at the moment A's manager published it,
        and what was then sent and not yet acknowledged (at most the relay's window)."""
        st = self.gkm("A")
        relay = self.relay(st)
        if "updated" not in st or "acked_bytes" not in relay:
            raise BenchError(f"no relay A->B in A's global key manager status "
                             f"({paths.node_dir(self.prefix, 'A') / 'gkm.json'})")
        gkm = self.topo.gkm
        unacked = min(gkm.window, int(relay.get("pending_blocks", 0)) * gkm.block_size)
        return Sample(float(st["updated"]), int(relay["acked_bytes"])), unacked

    def link_ends_used(self, link: str) -> list[Sample]:
        """Local key each end of ``link`` has spent so far (its ENC direction: used and
        wasted), at the moment that end's key manager published it."""
        samples = []
        lk = self.topo.link(link)
        for node in (lk.a, lk.b):
            st = read_status(paths.node_dir(self.prefix, node) / f"lkm-{link}.json")
            if st is None or "accounting" not in st:
                raise BenchError(f"no accounting from {node}'s key manager of {link}")
            enc = link_end(st["accounting"]).enc
            samples.append(Sample(float(st["updated"]), enc.used + enc.wasted))
        return samples

    def link_used(self, link: str) -> int:
        """Local key link ``link`` has spent so far, both directions."""
        return sum(s.value for s in self.link_ends_used(link))

    def fresh_accounting(self) -> None:
        """Wait until every local key manager, and A's global key manager, has published
        since now."""
        t0 = time.time()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            files = [paths.node_dir(self.prefix, n) / f"lkm-{lk.name}.json"
                     for lk in self.topo.links for n in (lk.a, lk.b)]
            sts = [read_status(f) for f in files] + [self.gkm("A")]
            if all(s and s.get("updated", 0) > t0 for s in sts):
                return
            time.sleep(0.1)
        raise BenchError("key managers stopped publishing their status")


def measure(rate: float, mode: str, console: Console, first_timeout: float = 120.0) -> dict:
    window = WINDOW_S.get(rate, SLOW_WINDOW_S if rate < 1 else 4.0)
    # The store must not be full before the window ends: the high watermark is set to
    # several times what the fill can bring in that time (at most 1 GiB).
    expect = rate * 1e6 / 8 * (window + 10)
    high = int(min(1 << 30, max(4 << 20, 4 * expect)))
    net = KeyrateNet(rate, mode, high, console)
    try:
        net.up()
        deadline = net.started + first_timeout
        while not (net.gkm("A").get("peers", {}).get("B", {}).get("enc") or {}).get("usable"):
            if time.monotonic() > deadline:
                raise BenchError(f"no global key A->B within {first_timeout:.0f} s at "
                                 f"{rate:g} Mb/s; logs in {paths.log_dir(net.prefix)}")
            time.sleep(0.05)
        first = time.monotonic() - net.started
        time.sleep(3.0)  # past the start: the store's first blocks, the rings' first fill
        net.fresh_accounting()
        (acked0, unacked0), ends0, t0 = net.acked(), net.link_ends_used("A-B"), \
            time.monotonic()
        time.sleep(window)
        net.fresh_accounting()
        relay = net.relay()
        (acked1, unacked1), ends1, t1 = net.acked(), net.link_ends_used("A-B"), \
            time.monotonic()
        if relay.get("filling") is False:
            raise BenchError(f"the store filled within the window at {rate:g} Mb/s: the "
                             "fill was not measured throughout")
        net.pause_gkm("A")
        time.sleep(2.0)  # what was in flight arrives
        net.fresh_accounting()
        idle0 = {lk.name: net.link_used(lk.name) for lk in net.topo.links}
        ti = time.monotonic()
        time.sleep(max(IDLE_S, 2 * net.topo.gkm.heartbeat_s))
        net.fresh_accounting()
        idle_s = time.monotonic() - ti
        idle = {name: (net.link_used(name) - v) * 8 / idle_s / 1000
                for name, v in idle0.items()}
    finally:
        net.down()
    lk = net.topo.link("A-B")
    ceiling = lk.key_rate_mbps * lk.ratio[0] / sum(lk.ratio)
    seconds = t1 - t0
    acked_bps = rate_between(acked0, acked1)
    spent_bps = sum(rate_between(a, b) for a, b in zip(ends0, ends1, strict=True))
    fill = acked_bps * 8 / 1e6
    link_key = sum(b.value - a.value for a, b in zip(ends0, ends1, strict=True))
    return {"rate_mbps": rate, "mode": mode, "first_key_s": round(first, 2),
            "fill_mbps": fill, "ceiling_mbps": ceiling,
            "ratio_vs_ceiling": fill / ceiling if ceiling else None,
            "efficiency": acked_bps / spent_bps if spent_bps > 0 else None,
            "efficiency_spread": spread(max(unacked0, unacked1), link_key),
            "acked_bytes": acked1.value - acked0.value, "link_key_bytes": link_key,
            "window_s": round(seconds, 2), "retries": relay.get("retries", 0),
            "idle_kbps": {k: round(v, 2) for k, v in idle.items()},
            "idle_burn_kbps": max(idle.values()),
            "sizes": {"block": lk.block_size, "ring": lk.ring_capacity,
                      "gkm_block": net.topo.gkm.block_size, "window": net.topo.gkm.window}}


def run(rates: tuple[float, ...] = DEFAULT_RATES, baseline_rate: float | None = 10.0,
        plot_path: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    listed = ", ".join(f"{r:g}" for r in rates)
    console.print(f"[bold]bench keyrate[/bold]: the triangle at {listed} Mb/s per link, "
                  f"sizes from the rate; global key A->B; {os.cpu_count()} cores")
    points = []
    for rate in rates:
        console.print(f"  {rate:g} Mb/s: bringing up, first key, fill, idle ...")
        p = measure(rate, "proposed", console)
        points.append(p)
        console.print(f"    first key {p['first_key_s']:.1f} s, fill {p['fill_mbps']:.2f} Mb/s"
                      f" ({100 * (p['ratio_vs_ceiling'] or 0):.0f} % of the direction's "
                      f"{p['ceiling_mbps']:g} Mb/s), efficiency {p['efficiency'] or 0:.3f}"
                      f"{_pm(p.get('efficiency_spread'))}, "
                      f"idle {p['idle_burn_kbps']:.1f} kb/s per link, {p['retries']} retries")
    baseline = None
    if baseline_rate is not None:
        console.print(f"  baseline: conventional dataplane (MTU 1500, key removed per "
                      f"packet) at {baseline_rate:g} Mb/s ...")
        baseline = measure(baseline_rate, "conventional", console)
        console.print(f"    fill {baseline['fill_mbps']:.2f} Mb/s, efficiency "
                      f"{baseline['efficiency'] or 0:.3f}")
    return summarize(points, baseline, plot_path, console)


def _pm(spread_: float | None) -> str:
    return f" ±{spread_:.3f}" if spread_ else ""


def parse_rates(text: str) -> tuple[float, ...]:
    """'1,10,100' -> (1.0, 10.0, 100.0): distinct rates from 0.01 to 10,000 Mb/s."""
    try:
        rates = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BenchError(f"expected rates in Mb/s separated by commas, got {text!r}") from None
    if not rates or len(set(rates)) != len(rates) \
            or not all(0.01 <= r <= 10_000 for r in rates):
        raise BenchError("give distinct rates from 0.01 to 10000 Mb/s, e.g. 1,10,100,1000")
    return rates


def _at(points: list[dict], rate: float) -> dict | None:
    return next((p for p in points if p["rate_mbps"] == rate), None)


def summarize(points: list[dict], baseline: dict | None, plot_path: Path | None,
              console: Console) -> dict:
    t = Table(title="global key at real QKD key rates (triangle, global key A->B)")
    for col in ("key rate", "first key", "fill Mb/s", "x direction's key", "efficiency",
                "idle kb/s/link", "retries"):
        t.add_column(col, justify="right")
    for p in points:
        t.add_row(f"{p['rate_mbps']:g} Mb/s", f"{p['first_key_s']:.1f} s",
                  f"{p['fill_mbps']:.2f}", f"{p['ratio_vs_ceiling'] or 0:.2f}",
                  f"{p['efficiency'] or 0:.3f}{_pm(p.get('efficiency_spread'))}",
                  f"{p['idle_burn_kbps']:.1f}",
                  str(p["retries"]))
    console.print(t)

    def eff(rate: float) -> float | None:
        p = _at(points, rate)
        return p["efficiency"] if p else None

    one = _at(points, 1.0)
    result = {
        "bench": "keyrate", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "floor": FLOOR,
        "efficiency_at_10mbps": eff(10.0), "efficiency_at_100mbps": eff(100.0),
        "fill_mbps_at_1mbps": one["fill_mbps"] if one else None,
        "idle_burn_kbps": max(p["idle_burn_kbps"] for p in points) if points else None,
        "baseline": baseline,
        "ratio_vs_baseline": (eff(baseline["rate_mbps"]) / baseline["efficiency"]
                              if baseline and baseline["efficiency"]
                              and eff(baseline["rate_mbps"]) else None),
        "points": points,
    }
    checks = {k: result[k] for k in FLOOR}
    met = {k: v is not None and (v <= FLOOR[k] if k == "idle_burn_kbps" else v >= FLOOR[k])
           for k, v in checks.items()}
    result["meets_floor"] = all(met[k] for k, v in checks.items() if v is not None)
    for k, ok in met.items():
        if checks[k] is not None:
            console.print(f"floor {k} {'<=' if k == 'idle_burn_kbps' else '>='} {FLOOR[k]}: "
                          f"{checks[k]:.3f} " + verdict(ok))
    if result["ratio_vs_baseline"]:
        console.print(f"efficiency over the conventional dataplane's, same rate: "
                      f"{result['ratio_vs_baseline']:.2f}x")
    return finish(result, console, plot_path, lambda out: plot(points, out))


def plot(points: list[dict], out: Path) -> Path:
    fig, ax = figure()
    rates = [p["rate_mbps"] for p in points]
    ax.plot(rates, [p["fill_mbps"] for p in points], "-o", label="global key fill A->B")
    ax.plot(rates, [p["ceiling_mbps"] for p in points], "k--",
            label="key the direction A->B gets")
    ax.set_yscale("log")
    log_axes(ax, rates, [f"{r:g}" for r in rates])
    return save(fig, ax, out, title="global key against the QKD key rate",
                xlabel="QKD key rate per link (Mb/s)", ylabel="Mb/s")
