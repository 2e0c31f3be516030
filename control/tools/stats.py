"""`qkdctl stats`: what each link end's dataplane passed and dropped, and why.

Two sources per link end: the XDP guard's per-CPU counters, read straight from the kernel
map (by the id the tunnel manager publishes; the status file's copy when the map is gone),
and the workers' own counters from the link's shared-memory stats. Reading and rates are
separate from rendering so that `--watch` and `--json` share them.
"""

from __future__ import annotations

import time

from rich import box
from rich.table import Table

from control.core import paths
from control.core.config import Topology
from control.core.statefile import read_status
from dataplane.bpf.guard import DROP_REASONS, REASONS, read_counts
from dataplane.stats import LinkStats

WORKER_PASS = (("sent", "tx_pkts", "tx_bytes"), ("delivered", "rx_pkts", "rx_bytes"))


def _guard_counts(st: dict) -> tuple[dict | None, str]:
    """(counts, where they came from) of one link end's guard; (None, why) when off."""
    g = st.get("guard") or {}
    if g.get("state") != "on":
        return None, f"off: {g.get('reason') or 'not reported'}"
    try:
        return read_counts(g["ids"]), f"{g['mode']} on {g['interface']}"
    except (OSError, KeyError):  # the manager just restarted: its last published counts
        return g.get("counts"), f"{g['mode']} on {g['interface']} (from status)"


def collect(topo: Topology) -> dict:
    """{"time", "ends": [{node, link, guard, guard_counts, workers: {...}}]}."""
    ends = []
    for node in topo.nodes:
        d = paths.node_dir(topo.prefix, node)
        for lk in topo.links_of(node):
            st = read_status(d / f"tun-{lk.name}.json")
            end = {"node": node, "link": lk.name, "running": st is not None,
                   "guard": "not running", "guard_counts": None, "workers": None}
            if st is not None:
                end["guard_counts"], end["guard"] = _guard_counts(st)
                try:
                    ls = LinkStats(paths.stats_name(topo.prefix, node, lk.name))
                    end["workers"] = ls.totals()
                    ls.close()
                except OSError:  # not there (yet), or not the node's own file
                    end["workers"] = st.get("counters")
            ends.append(end)
    return {"network": topo.name, "prefix": topo.prefix, "time": time.time(), "ends": ends}


def rows(end: dict) -> list[tuple[str, str, str, int, int]]:
    """(where, verdict, reason, packets, bytes) of one link end, nonzero worker drops only."""
    out = []
    g = end["guard_counts"]
    if g is not None:
        for r in REASONS:
            verdict = "dropped" if r in DROP_REASONS else "passed"
            out.append(("xdp", verdict, r, g[r]["packets"], g[r]["bytes"]))
    w = end["workers"]
    if w is not None:
        for name, pkts, nbytes in WORKER_PASS:
            out.append(("workers", "passed", name, w[pkts], w[nbytes]))
        for k, v in sorted(w.items()):
            if k.startswith("drop_") and v:
                out.append(("workers", "dropped", k[len("drop_"):], v, 0))
    return out


def rates(prev: dict | None, cur: dict) -> dict[tuple[str, str, str, str], float]:
    """Packets per second per (node, link, where, reason) between two snapshots."""
    if prev is None:
        return {}
    dt = max(cur["time"] - prev["time"], 1e-6)
    before = {(e["node"], e["link"], r[0], r[2]): r[3] for e in prev["ends"] for r in rows(e)}
    return {(e["node"], e["link"], r[0], r[2]): (r[3] - before.get(
        (e["node"], e["link"], r[0], r[2]), 0)) / dt for e in cur["ends"] for r in rows(e)}


def render(snap: dict, per_s: dict | None = None) -> Table:
    t = Table(title=f"qkdnet {snap['network']} ({snap['prefix']}): dataplane verdicts per "
                    "link end (xdp = the guard on the underlay; workers = user space)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "link", "guard", "where", "verdict", "reason", "packets", "MB",
                "pkt/s"):
        t.add_column(col, justify="right" if col in ("packets", "MB", "pkt/s") else "left",
                     no_wrap=col != "guard")
    for e in snap["ends"]:
        first = True
        for where, verdict, reason, pkts, nbytes in rows(e) or [("-", "-", "-", 0, 0)]:
            rate = (per_s or {}).get((e["node"], e["link"], where, reason))
            style = "red" if verdict == "dropped" and pkts else ""
            t.add_row(e["node"] if first else "", e["link"] if first else "",
                      e["guard"] if first else "", where,
                      f"[{style}]{verdict}[/{style}]" if style else verdict, reason,
                      f"{pkts:,}", f"{nbytes / 1e6:,.1f}" if nbytes else "",
                      f"{rate:,.0f}" if rate is not None else "")
            first = False
        t.add_section()
    return t
