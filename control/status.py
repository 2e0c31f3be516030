"""Collects a network's state from the files its processes publish, and renders it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich import box
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


def _fill(ring: dict) -> str:
    return f"{_mib(ring['fill'])} {100 * ring['fill'] // max(ring['capacity'], 1)}%"


def agreement_state(st: dict) -> str:
    ag = st["agreement"]
    if ag["synced"]:
        return f"ok #{ag['session']}"
    if ag["connected"]:
        return "syncing"
    return "[red]peer down[/red]"


def render(snapshot: dict) -> Table:
    t = Table(title=f"qkdnet {snapshot['network']} ({snapshot['prefix']}): local key per "
                    "link end (MiB; ENC/DEC = ring fill)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("link", "node", "role", "src", "agreement", "Mb/s in", "key in", "ENC",
                "DEC", "discarded"):
        t.add_column(col, justify="left" if col in ("link", "node", "role", "src",
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
            t.add_row(link, node, st["role"][:4], src, ag,
                      f"{st['key']['rate_bps'] / 1e6:,.0f}", _mib(st["key"]["bytes_in"]),
                      _fill(enc), _fill(dec), _mib(st["key"]["bytes_discarded"]))
    return t
