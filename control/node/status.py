"""Collects a network's state from the files its processes publish, and renders it."""

from __future__ import annotations

import time

from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from control.core import paths
from control.core.config import Topology
from control.core.statefile import read_status
from control.core.units import rate, size
from control.lkm.accounting import link_end
from dataplane.bpf.guard import DROP_REASONS

STALE_AFTER_S = 3.0


def collect_node(topo: Topology, node: str, now: float) -> dict:
    """One node's published state; a file not (yet) written is None."""
    d = paths.node_dir(topo.prefix, node)
    state = read_status(d / "state.json")
    links, tunnels = {}, {}
    for lk in topo.links_of(node):
        for kind, out in (("lkm", links), ("tun", tunnels)):
            st = read_status(d / f"{kind}-{lk.name}.json")
            if st is not None:
                st["stale"] = now - st["updated"] > STALE_AFTER_S
            out[lk.name] = st
    router = read_status(d / "router.json")
    gkm = read_status(d / "gkm.json")
    if gkm is not None:
        gkm["stale"] = now - gkm["updated"] > STALE_AFTER_S
    api = read_status(d / "api.json")
    if api is not None:
        api["stale"] = now - api["updated"] > STALE_AFTER_S
        module = next((m for m in (state or {}).get("modules", []) if m["name"] == "api"),
                      None)
        if module is not None:  # the manager's own restarts, by the supervisor
            api["module_restarts"] = module["restarts"]
            api["module_last_restart"] = module.get("last_restart")
    return {"supervisor": state, "links": links, "tunnels": tunnels,
            "router": router, "gkm": gkm, "api": api,
            "running": bool(state and not state["stopping"]
                            and now - state["updated"] < STALE_AFTER_S)}


def collect(topo: Topology) -> dict:
    now = time.time()
    nodes = {node: collect_node(topo, node, now) for node in topo.nodes}
    return {"network": topo.name, "prefix": topo.prefix, "time": now, "nodes": nodes}


def _fill(ring: dict) -> str:
    return f"{size(ring['fill'])} {100 * ring['fill'] // max(ring['capacity'], 1)}%"


def agreement_state(st: dict) -> str:
    ag = st["agreement"]
    if ag["synced"]:
        return f"ok #{ag['session']}"
    if ag["connected"]:
        return "syncing"
    return "[red]peer down[/red]"


def _drops(counters: dict) -> str:
    drops = {k.split("_", 2)[2]: v for k, v in counters.items()
             if k.startswith("drop_") and v}
    return ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])) \
        or "0"


def guard_state(st: dict) -> str:
    """The XDP guard of a link end in a few words: its mode and drops, or why it is off."""
    g = st.get("guard")
    if not g:
        return "-"
    if g.get("state") != "on":
        return f"[yellow]off[/yellow] ({escape(str(g.get('reason')))})"
    dropped = sum(c["packets"] for r, c in (g.get("counts") or {}).items()
                  if r in DROP_REASONS)
    return f"{g['mode']}, {dropped:,} dropped"


def link_cost(router: dict | None, link: str) -> str:
    """A link's cost as this node's router counts it, and "dry" where this end's ENC ring
    ran dry (its cost is raised until the ring refills)."""
    if not router:
        return "-"
    cost = router.get("costs", {}).get(link)
    if cost is None:
        return "-"
    own = router.get("own_costs", {}).get(link, 1)
    return f"{cost} dry" if own > 1 else str(cost)


def render_tunnels(snapshot: dict) -> Table:
    t = Table(title="OTP tunnels per link end (out = encrypted and sent, in = received "
                    "and delivered)", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    for col in ("link", "node", "tun", "state", "cost", "workers", "pkts out", "out",
                "pkts in", "in", "key used", "drops", "XDP guard"):
        t.add_column(col, justify="right" if col in ("pkts out", "out", "pkts in", "in",
                                                     "key used") else "left",
                     no_wrap=col != "XDP guard")
    for node, info in snapshot["nodes"].items():
        for link, st in info.get("tunnels", {}).items():
            if st is None:
                t.add_row(link, node, "-", "not running", "", "", "", "", "", "", "", "", "")
                continue
            c = st["counters"]
            state = ("up" if st["up"] and not st["stale"]
                     else f"[red]{escape(str(st['reason']))}[/red]")
            if st["stale"]:
                state = "[red]stopped[/red]"
            alive = sum(w["alive"] for w in st["workers"])
            t.add_row(link, node, st["tun"], state, link_cost(info.get("router"), link),
                      f"{alive}/{len(st['workers'])}",
                      f"{c['tx_pkts']:,}", size(c["tx_bytes"]), f"{c['rx_pkts']:,}",
                      size(c["rx_bytes"]), size(c["tx_key"] + c["rx_key"]),
                      _drops(c), guard_state(st))
    return t


def render_routes(snapshot: dict) -> Table:
    t = Table(title="routes (node address -> first link)", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "address", "destination", "via link", "dev"):
        t.add_column(col, no_wrap=True)
    for node, info in snapshot["nodes"].items():
        r = info.get("router")
        if not r:
            t.add_row(node, "-", "not running", "", "")
            continue
        routes = r.get("routes", {})
        if not routes:
            t.add_row(node, r["address"], "[red]none[/red]", "", "")
        for i, (dst, rt) in enumerate(routes.items()):
            t.add_row(node if i == 0 else "", r["address"] if i == 0 else "",
                      f"{dst} {rt['address']}", rt["via"], rt["dev"])
    return t


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def render_accounting(snapshot: dict) -> Table:
    """Every byte of local key per link end and direction (invariant 8)."""
    t = Table(title="key accounting per link end and direction (KiB; ENC: in = stored + "
                    "pad + MAC + keepalives + wasted; DEC: in = stored + released + wiped)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("link", "node", "dir", "in", "stored", "pad", "MAC", "keepalives",
                "released", "wasted", "waste/used", "discarded", "balance"):
        t.add_column(col, justify="left" if col in ("link", "node", "dir") else "right",
                     no_wrap=True)
    for node, info in snapshot["nodes"].items():
        for link, st in info["links"].items():
            if st is None or "accounting" not in st:
                continue
            end = link_end(st["accounting"])
            for i, d in enumerate((end.enc, end.dec)):
                ratio = d.waste_ratio
                ok = d.balance == 0 and (i or end.source_balance == 0)
                t.add_row(link if i == 0 else "", node if i == 0 else "",
                          f"{d.direction} {d.role.upper()}", _kib(d.key_in), _kib(d.stored),
                          _kib(d.used_pad) if d.role == "enc" else "-",
                          _kib(d.used_mac) if d.role == "enc" else "-",
                          _kib(d.used_control), _kib(d.released) if d.role == "dec" else "-",
                          _kib(d.wasted), "-" if ratio is None else f"{100 * ratio:.2f}%",
                          _kib(end.discarded) if i == 0 else "",
                          "ok" if ok else f"[yellow]{d.balance:+,} B[/yellow]")
    return t


def restarted_modules(snapshot: dict) -> list[tuple[str, dict]]:
    """(node, module) of every module its node's supervisor has restarted."""
    return [(node, m) for node, info in snapshot["nodes"].items()
            for m in ((info.get("supervisor") or {}).get("modules") or [])
            if m.get("restarts")]


def render_restarts(snapshot: dict) -> Table:
    """Modules restarted by their node (a crash loop shows here, with its exit status; the
    reason is in the node's log)."""
    t = Table(title="modules restarted by their node (why: the node's log)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "module", "running", "restarts", "last exit", "last restart"):
        t.add_column(col, justify="right" if col == "restarts" else "left", no_wrap=True)
    now = snapshot["time"]
    for node, m in restarted_modules(snapshot):
        t.add_row(node, m["name"], "yes" if m.get("alive") else "[red]no[/red]",
                  f"{m['restarts']:,}", str(m.get("last_exit")),
                  _ago(m.get("last_restart"), now))
    return t


def render(snapshot: dict) -> Group:
    parts = [render_keys(snapshot), render_accounting(snapshot), render_tunnels(snapshot),
             render_routes(snapshot)]
    if any(info.get("gkm") for info in snapshot["nodes"].values()):
        parts.append(render_global(snapshot))
    if any(info.get("api") for info in snapshot["nodes"].values()):
        parts.append(render_api(snapshot))
    if restarted_modules(snapshot):
        parts.append(render_restarts(snapshot))
    return Group(*parts)


def api_state(api: dict) -> str:
    """The key API of a node in a word: serving only while every worker runs and its
    manager publishes; otherwise what is missing."""
    if api["stale"]:
        return "[red]down[/red] (manager not running)"
    if api["state"] == "serving":
        return "serving"
    color = "red" if api["state"] == "down" else "yellow"
    return f"[{color}]{api['state']}[/{color}]"


def _ago(t: float | None, now: float) -> str:
    return "-" if not t else f"{now - t:,.0f} s ago"


def render_api(snapshot: dict) -> Table:
    t = Table(title="key API per node (restarts: of its workers by the API's manager, of "
                    "the manager by the node; hands: keys the workers took ahead, held now, "
                    "handed out, lost: held by workers that died or not given back; refused: "
                    "connections over \\[api] max_connections_per_address)",  # (markup)
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "state", "workers", "restarts", "last restart", "manager restarts",
                "hands", "from hands", "lost", "refused"):
        t.add_column(col, justify="left" if col in ("node", "state") else "right",
                     no_wrap=True)
    now = snapshot["time"]
    for node, info in snapshot["nodes"].items():
        api = info.get("api")
        if not api:
            continue
        last = max((x for x in (api.get("last_restart"), api.get("module_last_restart"))
                    if x), default=None)
        hands = api.get("hands") or {}
        t.add_row(node, api_state(api), f"{api['workers_alive']}/{api['workers']}",
                  f"{api['restarts']:,}", _ago(last, now),
                  f"{api.get('module_restarts', 0):,}",
                  f"{hands.get('held_keys', 0):,}", f"{hands.get('served_keys', 0):,}",
                  f"{hands.get('lost_bytes', 0):,} B",
                  f"{api.get('refused_connections', 0):,}")
    return t


def _paths(relay: dict | None) -> str:
    """Multipath relay: disjoint paths up of those wanted, and blocks sent as fewer
    shares ("1/2, 40 degraded"); "-" for single-path relay."""
    mp = relay and relay.get("paths")
    if not mp:
        return "-"
    text = f"{mp['up']}/{mp['wanted']}"
    if mp["degraded_blocks"]:
        text += f", {mp['degraded_blocks']:,} degraded"
    return text if mp["up"] >= mp["wanted"] else f"[yellow]{text}[/yellow]"


def render_global(snapshot: dict) -> Table:
    t = Table(title="global key per peer (ENC = usable key originated here for the peer, "
                    "pending = not yet acknowledged; DEC = received from the peer)",
              title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("node", "peer", "ENC", "pending", "DEC", "low-high", "relay", "paths",
                "rate", "retries", "last fill"):
        t.add_column(col, justify="left" if col in ("node", "peer", "relay") else "right",
                     no_wrap=True)
    for node, info in snapshot["nodes"].items():
        g = info.get("gkm")
        if not g:
            continue
        wm = f"{size(g['watermarks']['low'])}-{size(g['watermarks']['high'])}"
        for peer, p in g["peers"].items():
            enc, dec, relay = p.get("enc"), p.get("dec"), p.get("relay")
            if relay is None:
                state = "-"
            elif g["stale"]:
                state = "[red]stopped[/red]"
            elif g.get("paused"):
                state = "paused"
            else:
                state = {"ok": "ok", "retrying": "[yellow]retrying[/yellow]"}.get(
                    relay["state"], f"[red]{relay['state']}[/red]")
                if relay["state"] == "ok" and relay["filling"]:
                    state = "filling"
                if (mp := relay.get("paths")) and mp["using"] == 0:
                    state = "[yellow]waiting for paths[/yellow]"
            fill = relay and relay.get("last_fill")
            t.add_row(node, peer, size(enc["usable"]) if enc else "-",
                      size(enc["pending"]) if enc else "-",
                      size(dec["stored"]) if dec else "-", wm if enc else "-", state,
                      _paths(relay),
                      rate(relay["rate_bps"]) if relay else "-",
                      f"{relay['retries']:,}" if relay else "-",
                      rate(fill["bytes"] * 8 / fill["seconds"])
                      if fill and fill["seconds"] else "-")
    return t


def render_keys(snapshot: dict) -> Table:
    t = Table(title=f"qkdnet {snapshot['network']} ({snapshot['prefix']}): local key per "
                    "link end (ENC/DEC = ring fill)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("link", "node", "role", "src", "agreement", "key rate", "key in", "ENC",
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
                      rate(st["key"]["rate_bps"]), size(st["key"]["bytes_in"]),
                      _fill(enc), _fill(dec), size(st["key"]["bytes_discarded"]))
    return t
