"""`qkdctl profile`: where a running node's OTP workers spend their time.

Two views of the same window, side by side: bcc probes on the workers' syscalls and
context switches (:mod:`dataplane.bpf.profile`: latency histograms per stage, time in
and out of syscalls, on and off CPU), and the workers' own per-step counters
(:mod:`dataplane.stats`), read before and after, which give the paper's Table I per link
and direction. The probes find the workers by the pids their tunnel managers publish, so
nothing is restarted. Report building is pure (dicts in, dicts out) so tests drive it
without BPF.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from control.core import paths
from control.core.config import ConfigError, Topology, load_topology
from control.core.statefile import read_status
from control.node.status import STALE_AFTER_S
from control.tools import emulation
from dataplane.bpf.profile import STAGES, Profiler
from dataplane.stats import STEPS_RX, STEPS_TX, LinkStats

# The paper's Table I (ms per step): (step, proposed, conventional). Its steps are ours in
# order: egress reads the TUN, takes key, seals, sends UDP; ingress receives UDP, checks
# and finds key, opens, writes the TUN (the same mapping as bench/otp.py's STEP_NAMES).
PAPER_TABLE_I_MS = (("1. receive data", 4.869, 7.339),
                    ("2. read and remove used key", 7.307, 208.431),
                    ("3. OTP encryption/decryption", 0.661, 0.842),
                    ("4. send data", 0.158, 1.308))
STEPS = {"egress": STEPS_TX, "ingress": STEPS_RX}
PKTS = {"egress": "tx_pkts", "ingress": "rx_pkts"}
STAGE_NOTES = {"tun_read": "readv, TUN", "tun_write": "write, TUN", "udp_send": "sendto",
               "udp_recv": "recvfrom", "poll_wait": "poll: idle", "key_wait":
               "clock_nanosleep: waiting for key", "other_syscalls": "everything else"}
BAR_WIDTH = 40


class NotRunning(RuntimeError):
    pass


# ---- finding the workers --------------------------------------------------------------

def running_topology(node: str) -> Topology:
    """The topology of the one running network that has ``node`` (no --config given)."""
    found = []
    for prefix in emulation.known_prefixes():
        man = emulation.Manifest.load(prefix)
        if man is None:
            continue
        try:
            topo = load_topology(Path(man.config))
        except (ConfigError, OSError):
            continue
        if node in topo.nodes:
            found.append(topo)
    if not found:
        raise NotRunning(f"no running network has a node named {node!r}: give --config")
    if len(found) > 1:
        raise NotRunning(f"node {node!r} is in {len(found)} running networks "
                         f"({', '.join(t.prefix for t in found)}): give --config")
    return found[0]


def worker_pids(statuses: dict[str, dict | None], now: float) -> dict[str, list[int]]:
    """Link -> pids of its live workers, from the tunnel managers' status files (fresh
    ones only: a stale file names pids that may be reused by now)."""
    out = {}
    for link, st in statuses.items():
        if not st or now - st.get("updated", 0) > STALE_AFTER_S:
            continue
        pids = [w["pid"] for w in st.get("workers", []) if w.get("alive") and w.get("pid")]
        if pids:
            out[link] = pids
    return out


def find_workers(topo: Topology, node: str) -> dict[str, list[int]]:
    d = paths.node_dir(topo.prefix, node)
    statuses = {lk.name: read_status(d / f"tun-{lk.name}.json") for lk in topo.links_of(node)}
    if not any(statuses.values()):
        raise NotRunning(f"node {node} is not running (no tunnel status under {d})")
    pids = worker_pids(statuses, time.time())
    if not pids:
        raise NotRunning(f"node {node} is not running (tunnel status under {d} is stale or "
                         f"names no live worker)")
    return {link: [p for p in ps if Path(f"/proc/{p}").exists()] for link, ps in pids.items()}


# ---- pure report building -------------------------------------------------------------

def counter_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """after - before per counter (never negative: a restarted lane starts from zero)."""
    return {k: max(0, after.get(k, 0) - v) for k, v in before.items()}


def _ratio(paper: float, ours: float | None) -> float | None:
    return paper / ours if ours else None


def table_one(deltas: dict[str, dict[str, int]]) -> list[dict]:
    """Table I rows per link and direction: mean µs per packet of each step, beside the
    paper's figures and how many times faster ours is (paper / ours)."""
    rows = []
    for link, d in deltas.items():
        for direction, steps in STEPS.items():
            pkts = d.get(PKTS[direction], 0)
            for (step, proposed_ms, conventional_ms), counter in zip(PAPER_TABLE_I_MS, steps,
                                                                     strict=True):
                us = d.get(counter, 0) / pkts / 1e3 if pkts else None
                rows.append({"link": link, "direction": direction, "step": step,
                             "counter": counter, "pkts": pkts, "us_per_pkt": us,
                             "paper_proposed_us": proposed_ms * 1e3,
                             "paper_conventional_us": conventional_ms * 1e3,
                             "x_proposed": _ratio(proposed_ms * 1e3, us),
                             "x_conventional": _ratio(conventional_ms * 1e3, us)})
    return rows


def stage_summary(st: dict) -> dict:
    """A stage of the probes' result with its mean latency in µs."""
    n = st["count"]
    return {**st, "mean_us": st["total_ns"] / n / 1e3 if n else None}


def time_shares(prof: dict) -> dict:
    """How the workers' observed time splits: inside syscalls (each stage), in user space
    between them; and on CPU in syscalls / on CPU in user space / off CPU, which add up.
    Off-CPU time inside a syscall (blocked in poll or asleep) is part of that syscall's
    stage time, so it is taken out of the on-CPU shares, not counted twice."""
    syscall_ns = sum(st["total_ns"] for st in prof["stages"].values())
    user_ns = prof["user"]["total_ns"]
    observed = syscall_ns + user_ns
    off_sys, off_user = prof["offcpu_in_syscall_ns"], prof["offcpu_in_user_ns"]
    parts = {"syscalls_on_cpu": max(0, syscall_ns - off_sys),
             "user_on_cpu": max(0, user_ns - off_user), "off_cpu": off_sys + off_user}
    whole = sum(parts.values())
    return {
        "observed_ns": observed, "syscall_ns": syscall_ns, "user_ns": user_ns,
        "offcpu_ns": prof["offcpu_ns"], "offcpu_runnable_ns": prof["offcpu_runnable_ns"],
        "oncpu_ns": prof["oncpu_ns"], "parts_ns": parts,
        "shares": {k: v / whole if whole else 0.0 for k, v in parts.items()},
        "stage_shares": {**{s: st["total_ns"] / observed if observed else 0.0
                            for s, st in prof["stages"].items()},
                         "user_space": user_ns / observed if observed else 0.0},
    }


def build_report(topo_name: str, prefix: str, node: str, workers: dict[str, list[int]],
                 prof: dict, deltas: dict[str, dict[str, int]]) -> dict:
    return {
        "network": topo_name, "prefix": prefix, "node": node, "seconds": prof["seconds"],
        "workers": workers,
        "stages": {s: stage_summary(st) for s, st in prof["stages"].items()},
        "user": stage_summary(prof["user"]),
        "table_i": table_one(deltas),
        "counters": deltas,
        "time": time_shares(prof),
        "per_worker": prof["per_worker"],
    }


# ---- rendering ------------------------------------------------------------------------

def _bar(n: int, top: int) -> str:
    stars = round(BAR_WIDTH * n / top) if top else 0
    return "|" + "*" * stars + " " * (BAR_WIDTH - stars) + "|"


def render_hist(title: str, st: dict) -> Table:
    """One latency histogram the way bcc's print_log2_hist draws it."""
    mean = f"{st['mean_us']:,.1f}" if st["mean_us"] is not None else "-"
    t = Table(title=f"{title}: {st['count']:,} calls, mean {mean} µs", title_justify="left",
              box=None, pad_edge=False, show_edge=False)
    t.add_column("µs", justify="right", no_wrap=True)
    t.add_column("count", justify="right", no_wrap=True)
    t.add_column("distribution", no_wrap=True)
    top = max((c for _, _, c in st["hist"]), default=0)
    for lo, hi, c in st["hist"]:
        t.add_row(f"{lo} -> {hi}", str(c), _bar(c, top))
    return t


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}x"


def render_table_one(rows: list[dict]) -> Table:
    t = Table(title="Table I: mean µs per packet and step (workers' counters) beside the "
                    "paper's; x = paper / ours",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("link", "direction", "step", "pkts", "ours", "proposed", "x",
                "conventional", "x "):
        t.add_column(col, justify="left" if col in ("link", "direction", "step") else "right",
                     no_wrap=True, min_width=7 if col.startswith("x") else None)
    for i, r in enumerate(rows):
        first = i % len(PAPER_TABLE_I_MS) == 0
        t.add_row(r["link"] if first else "", r["direction"] if first else "", r["step"],
                  f"{r['pkts']:,}" if first else "", _us(r["us_per_pkt"]),
                  f"{r['paper_proposed_us']:,.0f}", _x(r["x_proposed"]),
                  f"{r['paper_conventional_us']:,.0f}", _x(r["x_conventional"]))
    return t


def render_shares(report: dict) -> Table:
    tm = report["time"]
    t = Table(title="worker time (probes)", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    for col in ("where", "ms", "share"):
        t.add_column(col, justify="left" if col == "where" else "right", no_wrap=True)
    for key, label in (("syscalls_on_cpu", "in syscalls, on CPU"),
                       ("user_on_cpu", "user space (Python, XOR/MAC, rings), on CPU"),
                       ("off_cpu", "off CPU (blocked or preempted)")):
        t.add_row(label, f"{tm['parts_ns'][key] / 1e6:,.1f}", f"{tm['shares'][key]:.1%}")
    t.add_section()
    for stage, share in sorted(tm["stage_shares"].items(), key=lambda kv: -kv[1]):
        st = report["user"] if stage == "user_space" else report["stages"][stage]
        if not st["count"]:
            continue
        note = "between syscalls" if stage == "user_space" else STAGE_NOTES[stage]
        t.add_row(f"{stage} ({note})", f"{st['total_ns'] / 1e6:,.1f}", f"{share:.1%}")
    t.add_section()
    t.add_row("of off CPU: runnable, waiting for a CPU", f"{tm['offcpu_runnable_ns'] / 1e6:,.1f}",
              f"{tm['offcpu_runnable_ns'] / tm['offcpu_ns']:.1%}" if tm["offcpu_ns"] else "-")
    return t


def render(report: dict) -> Group:
    pids = sum(len(p) for p in report["workers"].values())
    parts: list = [f"[bold]node {report['node']}[/bold] of {report['network']!r} "
                   f"({report['prefix']}): {pids} worker(s) on "
                   f"{', '.join(report['workers'])}, {report['seconds']:.1f} s"]
    for stage in STAGES:
        st = report["stages"][stage]
        if st["count"]:
            parts.append(render_hist(f"{stage} ({STAGE_NOTES[stage]})", st))
    if report["user"]["count"]:
        parts.append(render_hist("user space between syscalls", report["user"]))
    parts += [render_table_one(report["table_i"]), render_shares(report)]
    return Group(*parts)


# ---- the run --------------------------------------------------------------------------

def _totals(stats: dict[str, LinkStats]) -> dict[str, dict[str, int]]:
    return {link: s.totals() for link, s in stats.items()}


def profile_node(topo: Topology, node: str, seconds: float = 5.0,
                 console: Console | None = None) -> dict:
    """Probe ``node``'s running workers for ``seconds`` and build the report; progress goes
    to ``console`` (stderr for --json)."""
    if node not in topo.nodes:
        raise NotRunning(f"no node named {node!r} in {topo.path}")
    workers = find_workers(topo, node)
    stats: dict[str, LinkStats] = {}
    try:
        for link in workers:
            with contextlib.suppress(FileNotFoundError):
                stats[link] = LinkStats(paths.stats_name(topo.prefix, node, link))
        before: dict[str, dict[str, int]] = {}
        pids = [p for ps in workers.values() for p in ps]
        progress = Progress(TextColumn("{task.description}"), BarColumn(),
                            TimeRemainingColumn(), console=console, transient=True,
                            disable=console is None)
        with progress:
            task = progress.add_task("compiling and attaching probes", total=seconds)

            def start() -> None:
                before.update(_totals(stats))
                progress.update(task, description=f"profiling node {node} "
                                f"({len(pids)} worker(s))")

            prof = Profiler(pids).run(seconds, on_start=start,
                                      tick=lambda t: progress.update(task, completed=t))
        after = _totals(stats)
    finally:
        for s in stats.values():
            s.close()
    deltas = {link: counter_deltas(before[link], after[link]) for link in after}
    return build_report(topo.name, topo.prefix, node, workers, prof, deltas)
