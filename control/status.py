"""Collects a network's state from the files its processes publish, and renders it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from control import paths
from control.config import Topology

STALE_AFTER_S = 3.0


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def collect(topo: Topology) -> dict:
    now = time.time()
    nodes = {}
    for node in topo.nodes:
        d = paths.node_dir(topo.prefix, node)
        state = _read(d / "state.json")
        links = {}
        for lk in topo.links_of(node):
            st = _read(d / f"lkm-{lk.name}.json")
            if st is not None:
                st["stale"] = now - st["updated"] > STALE_AFTER_S
            links[lk.name] = st
        nodes[node] = {"supervisor": state, "links": links,
                       "running": bool(state and not state["stopping"]
                                       and now - state["updated"] < STALE_AFTER_S)}
    return {"network": topo.name, "prefix": topo.prefix, "time": now, "nodes": nodes}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f}"


def agreement_state(st: dict) -> str:
    ag = st["agreement"]
    if ag["synced"]:
        return f"agreed #{ag['session']}"
    if ag["connected"]:
        return "syncing"
    return "[red]peer down[/red]"


def render(snapshot: dict) -> Table:
    t = Table(title=f"qkdnet {snapshot['network']} ({snapshot['prefix']}): local key per "
                    "link end (MiB)", title_justify="left")
    for col in ("link", "node", "role", "source", "agreement", "in Mb/s", "key in",
                "ENC fill", "DEC fill", "discarded"):
        t.add_column(col, justify="left" if col in ("link", "node", "role", "source",
                                                    "agreement") else "right", no_wrap=True)
    for node, info in snapshot["nodes"].items():
        for link, st in info["links"].items():
            if st is None:
                t.add_row(link, node, "-", "-", "not running", "", "", "", "", "")
                continue
            enc = next(r for r in st["rings"].values() if r["role"] == "enc")
            dec = next(r for r in st["rings"].values() if r["role"] == "dec")
            src = "up" if st["source"]["up"] else "[red]down[/red]"
            ag = agreement_state(st)
            if st["stale"]:
                ag = "[red]stopped[/red]"
            t.add_row(link, node, st["role"], src, ag, f"{st['key']['rate_bps'] / 1e6:,.0f}",
                      _mib(st["key"]["bytes_in"]), f"{_mib(enc['fill'])}/{_mib(enc['capacity'])}",
                      f"{_mib(dec['fill'])}/{_mib(dec['capacity'])}",
                      _mib(st["key"]["bytes_discarded"]))
    return t
