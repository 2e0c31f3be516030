"""Collects a network's state from the files its processes publish, and renders it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console, ConsoleOptions, Group
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from control.core import paths
from control.core.config import Topology
from control.core.statefile import read_status
from control.core.units import rate, size
from control.lkm.accounting import link_end
from dataplane.bpf.guard import DROP_REASONS

STALE_AFTER_S = 3.0

# `qkdctl status` exit statuses (2 is the command line's or the topology file's)
EXIT_RUNNING, EXIT_NODE_DOWN, EXIT_NOT_UP = 0, 1, 3


@dataclass
class Sheet:
    """A table's content, laid out when printed: at the console's width, in as many
    tables as its columns need, each repeating the leading ``keys`` columns (link, node).
    At 80 columns rich cut nearly every cell of a wide table to an ellipsis and dropped
    its last column without a word; no cell is cut now (one too wide for the console
    folds)."""

    title: str | None
    columns: list[tuple[str, str]]  # (header, "left" | "right")
    keys: int = 2
    rows: list[list[str]] = field(default_factory=list)

    def add_row(self, *cells: str) -> None:
        assert len(cells) == len(self.columns)
        self.rows.append(list(cells))

    def _table(self, cols: list[int], title: str | None) -> Table:
        t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i in cols:
            header, justify = self.columns[i]
            t.add_column(header, justify=justify, overflow="fold")
        for row in self.rows:
            t.add_row(*(row[i] for i in cols))
        return t

    def tables(self, console: Console, options: ConsoleOptions) -> list[Table]:
        """The fewest tables whose columns fit ``options.max_width``, in column order."""
        keys = list(range(min(self.keys, len(self.columns))))
        unbounded = options.update_width(1 << 16)  # (a measurement is capped by its width)

        def width(cols: list[int]) -> int:
            return Measurement.get(console, unbounded,
                                   self._table(keys + cols, None)).maximum

        groups: list[list[int]] = [[]]
        for i in range(len(keys), len(self.columns)):
            if groups[-1] and width(groups[-1] + [i]) > options.max_width:
                groups.append([])
            groups[-1].append(i)
        return [self._table(keys + g, self.title if n == 0 else "(continued)")
                for n, g in enumerate(groups)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Table]:
        yield from self.tables(console, options)


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
    if router is not None:
        router["stale"] = now - router.get("updated", 0) > STALE_AFTER_S
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
                            and (now - state["updated"] < STALE_AFTER_S
                                 or supervisor_runs(state, node, topo.prefix)))}


def supervisor_runs(state: dict, node: str, prefix: str) -> bool:
    """Whether the process that published ``state`` still runs as ``node``'s supervisor
    (``node run ... --node NODE``, and ``--netns PREFIX-NODE`` where it names one): a
    supervisor a loaded machine held back a few seconds still runs, and its node is not
    called down for a late file."""
    try:
        cmd = Path(f"/proc/{int(state['pid'])}/cmdline").read_bytes().split(b"\0")
        if b"--netns" in cmd and \
                cmd[cmd.index(b"--netns") + 1] != paths.netns_name(prefix, node).encode():
            return False  # a reused pid: another network's node of that name
        return b"run" in cmd and cmd[cmd.index(b"--node") + 1] == node.encode()
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def collect(topo: Topology) -> dict:
    """The network's state as its processes last published it; ``emulated``: every node
    runs on this host (``net up`` made it), so a node without status here is down."""
    now = time.time()
    nodes = {node: collect_node(topo, node, now) for node in topo.nodes}
    return {"network": topo.name, "prefix": topo.prefix, "time": now, "nodes": nodes,
            "emulated": paths.manifest_path(topo.prefix).exists()}


def node_down(info: dict, now: float) -> str | None:
    """Why a node is not running, in a few words (None while it runs): its supervisor
    has published no status here, is stopping, or stopped publishing (killed)."""
    if info.get("running", True):
        return None
    sup = info.get("supervisor")
    if not sup:
        return "not running (no status here: not started, or taken down)"
    ago = f"last update {_ago(sup.get('updated'), now)}"
    if sup.get("stopping") and now - sup.get("updated", 0) <= STALE_AFTER_S:
        return f"stopping ({ago})"
    return f"not running ({'stopped' if sup.get('stopping') else 'supervisor dead'}; {ago})"


def elsewhere(snapshot: dict, info: dict) -> bool:
    """A node of a deployed network with no status on this host: it runs on another
    (status reads this host's files), or not at all; this host cannot tell which."""
    return not snapshot.get("emulated", True) and not info.get("supervisor")


def exit_status(snapshot: dict) -> int:
    """0 when every node runs; 3 when none does (the network is not up: here, for a
    deployed one); 1 when some node is down. A deployed network's nodes that have no
    status on this host are left out."""
    here = {n: i for n, i in snapshot["nodes"].items() if not elsewhere(snapshot, i)}
    running = [n for n, i in here.items() if i.get("running", True)]
    if not running:
        return EXIT_NOT_UP
    return EXIT_RUNNING if len(running) == len(here) else EXIT_NODE_DOWN


def render_nodes(snapshot: dict, rows_below: bool = True) -> Table | None:
    """One line per node that is not running, and why; None when all run."""
    now = snapshot["time"]
    lines = []
    for node, info in snapshot["nodes"].items():
        why = node_down(info, now)
        if why is None:
            continue
        if elsewhere(snapshot, info):
            lines.append(f"[dim]node {escape(node)}: no status on this host (it runs on "
                         f"another, or not at all)[/dim]")
        else:
            lines.append(f"[red]node {escape(node)}: {why}[/red]")
    if not lines:
        return None
    if rows_below:
        lines.append("[dim](a node that is not running has blank rows below; --json has "
                     "what it last published)[/dim]\n")
    t = Table.grid()
    for line in lines:
        t.add_row(line)
    return t


def _gone(info: dict, st: dict | None) -> str | None:
    """Why a module's row shows no figures: its node is down, or the module stopped
    publishing (its figures would be its last ones, shown as if live)."""
    if not info.get("running", True):
        return "[red]node down[/red]"
    if st is not None and st.get("stale"):
        return "[red]stopped[/red]"
    return None


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


def _left(*headers: str) -> list[tuple[str, str]]:
    return [(h, "left") for h in headers]


def _right(*headers: str) -> list[tuple[str, str]]:
    return [(h, "right") for h in headers]


def render_tunnels(snapshot: dict) -> Sheet:
    t = Sheet("OTP tunnels per link end (out = encrypted and sent, in = received and "
              "delivered)",
              _left("link", "node", "tun", "state", "cost", "workers")
              + _right("pkts out", "out", "pkts in", "in", "key used")
              + _left("drops", "XDP guard"))
    for node, info in snapshot["nodes"].items():
        for link, st in info.get("tunnels", {}).items():
            if st is None:
                t.add_row(link, node, "-", "not running", *[""] * 9)
                continue
            if gone := _gone(info, st):
                t.add_row(link, node, st["tun"], gone, *["-"] * 9)
                continue
            c = st["counters"]
            state = "up" if st["up"] else f"[red]{escape(str(st['reason']))}[/red]"
            alive = sum(w["alive"] for w in st["workers"])
            t.add_row(link, node, st["tun"], state, link_cost(info.get("router"), link),
                      f"{alive}/{len(st['workers'])}",
                      f"{c['tx_pkts']:,}", size(c["tx_bytes"]), f"{c['rx_pkts']:,}",
                      size(c["rx_bytes"]), size(c["tx_key"] + c["rx_key"]),
                      _drops(c), guard_state(st))
    return t


def render_routes(snapshot: dict) -> Sheet:
    t = Sheet("routes (node address -> first link)",
              _left("node", "address", "destination", "via link", "dev"), keys=1)
    for node, info in snapshot["nodes"].items():
        r = info.get("router")
        if not r:
            t.add_row(node, "-", "not running", "", "")
            continue
        if gone := _gone(info, r):
            t.add_row(node, r["address"], gone, "-", "-")
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


def render_accounting(snapshot: dict) -> Sheet:
    """Every byte of local key per link end and direction (invariant 8)."""
    t = Sheet("key accounting per link end and direction (KiB; ENC: in = stored + pad + "
              "MAC + keepalives + wasted; DEC: in = stored + released + wasted (wiped at "
              "a resync), its keepalives counted within released)",
              _left("link", "node", "dir")
              + _right("in", "stored", "pad", "MAC", "keepalives", "released", "wasted",
                       "waste/used", "discarded", "balance"))
    for node, info in snapshot["nodes"].items():
        for link, st in info["links"].items():
            if st is None or "accounting" not in st:
                continue
            if gone := _gone(info, st):
                t.add_row(link, node, "-", *["-"] * 9, gone)
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


def render_restarts(snapshot: dict) -> Sheet:
    """Modules restarted by their node (a crash loop shows here, with its exit status; the
    reason is in the node's log)."""
    t = Sheet("modules restarted by their node (why: the node's log)",
              _left("node", "module", "running") + _right("restarts")
              + _left("last exit", "last restart"))
    now = snapshot["time"]
    for node, m in restarted_modules(snapshot):
        live = snapshot["nodes"][node].get("running", True)
        running = ("yes" if m.get("alive") else "[red]no[/red]") if live \
            else "[red]node down[/red]"
        t.add_row(node, m["name"], running, f"{m['restarts']:,}", str(m.get("last_exit")),
                  _ago(m.get("last_restart"), now))
    return t


def render(snapshot: dict) -> Group:
    """The tables of ``qkdctl status``, under a line per node that is not running; only
    those lines when no node runs (every row would be blank)."""
    up = exit_status(snapshot) != EXIT_NOT_UP
    nodes = render_nodes(snapshot, rows_below=up)
    head = [nodes] if nodes is not None else []
    if not up:
        return Group(*head, f"[red]network {escape(snapshot['network'])} "
                            f"({escape(snapshot['prefix'])}) is not up: no node of it runs "
                            f"here[/red] (--json: what its nodes last published)")
    parts = [render_keys(snapshot), render_accounting(snapshot), render_tunnels(snapshot),
             render_routes(snapshot)]
    if any(info.get("gkm") for info in snapshot["nodes"].values()):
        parts.append(render_global(snapshot))
    if any(info.get("api") for info in snapshot["nodes"].values()):
        parts.append(render_api(snapshot))
    if restarted_modules(snapshot):
        parts.append(render_restarts(snapshot))
    return Group(*head, *parts)


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


def render_api(snapshot: dict) -> Sheet:
    t = Sheet("key API per node (restarts: of its workers by the API's manager, of the "
              "manager by the node; hands: keys the workers took ahead, held now, handed "
              "out, lost: held by workers that died or not given back; refused: "
              "connections over \\[api] max_connections_per_address)",  # (markup)
              _left("node", "state")
              + _right("workers", "restarts", "manager restarts", "last restart", "hands",
                       "from hands", "lost", "refused"), keys=1)
    now = snapshot["time"]
    for node, info in snapshot["nodes"].items():
        api = info.get("api")
        if not api:
            continue
        if not info.get("running", True):
            t.add_row(node, "[red]node down[/red]", *["-"] * 8)
            continue
        last = max((x for x in (api.get("last_restart"), api.get("module_last_restart"))
                    if x), default=None)
        hands = api.get("hands") or {}
        live = not api["stale"]
        t.add_row(node, api_state(api),
                  f"{api['workers_alive']}/{api['workers']}" if live else "-",
                  f"{api['restarts']:,}", f"{api.get('module_restarts', 0):,}",
                  _ago(last, now),  # of a worker or of the manager
                  f"{hands.get('held_keys', 0):,}" if live else "-",
                  f"{hands.get('served_keys', 0):,}",
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


def render_global(snapshot: dict) -> Sheet:
    t = Sheet("global key per peer (ENC = usable key originated here for the peer, "
              "pending = not yet acknowledged; DEC = received from the peer)",
              _left("node", "peer") + _right("ENC", "pending", "DEC", "low-high")
              + _left("relay") + _right("paths", "rate", "retries", "last fill"))
    for node, info in snapshot["nodes"].items():
        g = info.get("gkm")
        if not g:
            continue
        if gone := _gone(info, g):
            t.add_row(node, "-", *["-"] * 4, gone, *["-"] * 4)
            continue
        wm = f"{size(g['watermarks']['low'])}-{size(g['watermarks']['high'])}"
        for peer, p in g["peers"].items():
            enc, dec, relay = p.get("enc"), p.get("dec"), p.get("relay")
            if relay is None:
                state = "-"
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


def render_keys(snapshot: dict) -> Sheet:
    t = Sheet(f"qkdnet {escape(snapshot['network'])} ({escape(snapshot['prefix'])}): local "
              "key per link end (ENC/DEC = ring fill)",
              _left("link", "node", "role", "src", "agreement")
              + _right("key rate", "key in", "ENC", "DEC", "discarded"))
    for node, info in snapshot["nodes"].items():
        for link, st in info["links"].items():
            if st is None:
                t.add_row(link, node, "-", "-", "not running", "", "", "", "", "")
                continue
            if gone := _gone(info, st):
                t.add_row(link, node, st["role"][:4], "-", gone, *["-"] * 5)
                continue
            enc = next(r for r in st["rings"].values() if r["role"] == "enc")
            dec = next(r for r in st["rings"].values() if r["role"] == "dec")
            src = "up" if st["source"]["up"] else "[red]down[/red]"
            t.add_row(link, node, st["role"][:4], src, agreement_state(st),
                      rate(st["key"]["rate_bps"]), size(st["key"]["bytes_in"]),
                      _fill(enc), _fill(dec), size(st["key"]["bytes_discarded"]))
    return t
