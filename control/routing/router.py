"""The router of one node: keeps the node's routes over its OTP tunnels current.

A thin shell around :mod:`control.routing.linkstate`, running in the node's namespace.
Before anything of the node runs (the supervisor calls :func:`prepare_namespace`, and the
router again at each start) the namespace gets, in this order: an ``unreachable`` route
for ``node_net`` (so no packet to a node address ever leaves in clear along another
route), forwarding off on the underlay, policy rules (node addresses never from an
underlay), an nftables table (the tunnels for no user but the node's and root), the node's
address (a /32 on the namespace's own loopback), and IP forwarding on, so the node relays:
a packet arriving from one tunnel leaves through the next, decrypted with one link's key
and encrypted with the next one's (the paper's key routing). Every ROUTE_INTERVAL_S it
reads its tunnel managers' link views (up or down, and under ``[routing] metric = "key"``
the key each ENC ring holds, which sets the cost its end advertises: routing.linkcost) and
the link-state entries they heard, merges them, installs the least-cost routes with
pyroute2 (only the changes) and writes ``lsdb.json`` for the keepalives to carry on.

Multipath relay (``[gkm] paths`` = k > 1): every router computes, from the same database,
the same k node-disjoint paths of every ordered pair (routing.multipath), and routes
each of the destination's share addresses along its own path only: a node routes the
addresses of the paths it lies on, and no other, so a share sent to one can never leave
its path (elsewhere it meets node_net's unreachable route). The destination holds its
share addresses as it holds its node address. A pair's paths are numbered by their first
link (a cost change that keeps them keeps their addresses), and a share route is broken
at once but made only after SHARE_HOLD_S, and only SHARE_QUARANTINE_S after this node
last routed another share address of the same pair: whatever of an older send is still
in flight when the paths change is dropped, never carried along a new path through a
node that carried another of its shares.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.main import NFTables

from control.core import paths
from control.core.config import LinkSpec, Topology, load_topology
from control.core.lifecycle import die_with_parent, run_until_stopped
from control.core.logs import setup_logging
from control.core.procs import same_process_alive
from control.core.sizing import lsa_max_age
from control.core.statefile import write_json
from control.routing.linkcost import EndCost
from control.routing.linkstate import LinkEnds, LinkStateDb, shortest_paths
from control.routing.multipath import disjoint_paths, next_link, path_nodes
from dataplane.limits import LINK_DEAD_MAX_S
from dataplane.tunnel import tun_name

log = logging.getLogger("qkdnet.router")
ROUTE_INTERVAL_S = 0.2
FILTER_CHECK_S = 5.0  # how often the tunnels' owner filter is checked to be there
FILTER_NFT_TIMEOUT_S = 5.0  # the routing loop waits this long for nft, at most
NODE_IFNAME = "lo"  # the namespace's own loopback
STALE_STATUS_S = 2.0  # a link end's status older than this counts only if its manager
STALE_STATUS_MAX_S = LINK_DEAD_MAX_S + 2.0  # still runs (held up, not dead); never older
SHARE_HOLD_S = 2.0         # a new or moved share route waits this before it is made
SHARE_QUARANTINE_S = 10.0  # ... and this after the node last routed another address of
                           # the same pair (old sends' data has drained by then)
ORPHAN_RETRIES = "1"       # TCP retries of a closed connection's data (per namespace)


def _sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", *name.split(".")).write_text(value)


RTN_UNREACHABLE = 7


class SetupError(Exception):
    """The namespace could not be made safe for the node; nothing of it may start."""


def _unreachable_installed(ip: IPRoute, net: ipaddress.IPv4Network) -> bool:
    return any(r["type"] == RTN_UNREACHABLE and r["dst_len"] == net.prefixlen
               and r.get_attr("RTA_DST") == str(net.network_address)
               for r in ip.get_routes(family=socket.AF_INET))


UNDERLAY_RULE_PREF = 10  # "from an underlay to a node address: drop", before ...
LOCAL_RULE_PREF = 100  # ... the lookup of local addresses, moved here from 0
RT_TABLE_LOCAL = 255
FR_ACT_BLACKHOLE = 6
NFT_TABLE = "qkdnet"  # the node's own nftables table in its namespace
FILTER_RULES = 2  # its rules (tunnel_owner_filter)
NFPROTO_INET = 1


def tunnel_owner_filter(tuns: list[str], uids: set[int], table: str = NFT_TABLE) -> str:
    """The nftables script (for ``nft -f -``) that lets only sockets of ``uids`` send out
    of the node's TUNs ``tuns``; it replaces the table whole, so it may run at every start.
    On the output hook, after routing, whatever chose the device (the routes, a device
    bound to the socket, a broadcast or multicast interface); forwarded packets (the
    relaying) never meet it. The kernel's own packets carry no user's socket: its replies
    only answer what a peer sent, but the IGMP reports it sends for any user's multicast
    group are dropped whole (nothing of the node sends multicast through a tunnel)."""
    if not tuns:
        return f"table inet {table} {{}}\ndelete table inet {table}\n"
    names = ", ".join(f'"{t}"' for t in tuns)
    owners = ", ".join(str(u) for u in sorted(uids))
    return (f"table inet {table} {{}}\n"
            f"delete table inet {table}\n"
            f"table inet {table} {{\n"
            f"  chain tunnels_out {{\n"
            f"    type filter hook output priority filter; policy accept;\n"
            f"    oifname {{ {names} }} ip daddr 224.0.0.0/4 counter drop\n"
            f"    oifname {{ {names} }} meta skuid != {{ {owners} }} counter "
            f"reject with icmpx admin-prohibited\n"
            f"  }}\n"
            f"}}\n")


def _close_tunnels_to_other_users(tuns: list[str], timeout: float = 30) -> None:
    """Anything sent into a tunnel spends the link's key: only the node's user and root
    (the tunnels' own managers run as root) may. Another user's process in the namespace
    still reaches this node's own services; its packets into a tunnel are refused, so it
    cannot spend key nor mark traffic as control to reach the key kept back for the
    keepalives and the relay. SetupError if nftables cannot do it."""
    try:
        res = subprocess.run(["nft", "-f", "-"], input=tunnel_owner_filter(
            tuns, {0, os.geteuid()}), text=True, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError(f"cannot close the tunnels to other users: nft: {e}; install "
                         f"nftables (make setup, or apt-get install nftables)") from None
    if res.returncode != 0:
        raise SetupError(f"cannot close the tunnels to other users: nft: "
                         f"{res.stderr.strip() or res.returncode}")


def tunnel_filter_present() -> bool | None:
    """Whether the node's table still holds its rules (a ``flush ruleset`` by a host
    firewall's reload removes it without a word); None when netlink could not say. Asked
    over netlink: no process to start every FILTER_CHECK_S in every router."""
    try:
        with NFTables(nfgen_family=NFPROTO_INET) as nft:
            return sum(r.get_attr("NFTA_RULE_TABLE") == NFT_TABLE
                       for r in nft.get_rules()) == FILTER_RULES
    except (OSError, NetlinkError):
        return None


def _close_underlay_to_nodes(ip: IPRoute, underlays: list[str],
                             nets: list[ipaddress.IPv4Network]) -> None:
    """Packets that arrive on an underlay interface for, or from, a node address or a
    tunnel's own address are dropped: both are reachable only through the OTP tunnels
    (the relay, the key API and the metrics listen on node addresses, and trust what comes
    from one), and what this node answers to such a source (an echo reply, an ICMP error,
    a reset) goes back through a tunnel and spends its key: an audit's forged
    60,000-byte pings over the underlay cost 60 KB of link key each. With reverse-path
    filtering off, the kernel would deliver such a
    packet locally; a policy rule for each underlay interface and network, consulted
    before the local table, drops it instead. The local table's rule moves from priority
    0 to LOCAL_RULE_PREF (added there first, so local delivery never stops). The XDP
    guard drops the same packets earlier where it runs."""
    rules = ip.get_rules(family=socket.AF_INET)
    prefs = {(r.get_attr("FRA_PRIORITY") or 0, r.get_attr("FRA_TABLE") or r["table"],
              r.get_attr("FRA_IIFNAME"), r["action"], r.get_attr("FRA_SRC"), r["src_len"],
              r.get_attr("FRA_DST"), r["dst_len"]) for r in rules}
    for ifname in underlays:
        for net in nets:
            for end in ("src", "dst"):
                addr, plen = str(net.network_address), net.prefixlen
                want = (addr, plen, None, 0) if end == "src" else (None, 0, addr, plen)
                if (UNDERLAY_RULE_PREF, 0, ifname, FR_ACT_BLACKHOLE, *want) not in prefs:
                    ip.rule("add", priority=UNDERLAY_RULE_PREF, iifname=ifname,
                            action=FR_ACT_BLACKHOLE, **{end: addr, f"{end}_len": plen})
    if not any(p == LOCAL_RULE_PREF and t == RT_TABLE_LOCAL for p, t, *_ in prefs):
        ip.rule("add", priority=LOCAL_RULE_PREF, table=RT_TABLE_LOCAL)
    if any(p == 0 and t == RT_TABLE_LOCAL for p, t, *_ in prefs):
        ip.rule("del", priority=0, table=RT_TABLE_LOCAL)


def prepare_namespace(address: str, underlay_addresses: list[str], node_net: str,
                      share_addresses: tuple[str, ...], tuns: tuple[str, ...],
                      tunnel_net: str) -> None:
    """Make the node's namespace safe, then give it its address. In this order, because a
    service binds the node address as soon as it exists: first ``node_net`` unreachable,
    so a node address with no tunnel route fails fast instead of leaking in clear along
    some less specific route; then forwarding off on the underlay (IPv4 decides by the
    input device's flag), so nothing arriving there is routed into a tunnel; the policy
    rules and the tunnels' owner filter (``tuns``: the node's TUN names); only then the
    address (and the node's share addresses, for multipath relay), and forwarding on.
    SetupError if the route, the rules or the filter cannot be installed."""
    net = ipaddress.IPv4Network(node_net)
    with IPRoute() as ip:
        try:
            ip.route("replace", dst=node_net, type="unreachable")
        except NetlinkError as e:
            raise SetupError(f"cannot install the unreachable route for node_net {node_net}: "
                             f"{e.args[1] if len(e.args) > 1 else e}") from None
        if not _unreachable_installed(ip, net):
            raise SetupError(f"the unreachable route for node_net {node_net} is not in "
                             f"the main table after installing it")
        underlays = [ip.get_links(a["index"])[0].get_attr("IFLA_IFNAME")
                     for under in underlay_addresses for a in ip.get_addr(address=under)]
        for ifname in underlays:
            _sysctl(f"net.ipv4.conf.{ifname}.forwarding", "0")
        try:
            _close_underlay_to_nodes(ip, underlays,
                                     [net, ipaddress.IPv4Network(tunnel_net)])
        except NetlinkError as e:
            raise SetupError(f"cannot close the underlay to node addresses (policy rules): "
                             f"{e.args[1] if len(e.args) > 1 else e}") from None
        _close_tunnels_to_other_users(list(tuns))
        idx = ip.link_lookup(ifname=NODE_IFNAME)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)}
        try:
            for a in (address, *share_addresses):
                if a not in have:
                    ip.addr("add", index=idx, address=a, prefixlen=32)
            ip.link("set", index=idx, state="up")
        except NetlinkError as e:
            raise SetupError(f"cannot add the node address {address}: "
                             f"{e.args[1] if len(e.args) > 1 else e}") from None
    # Namespace-local sysctls (this process runs inside the node's namespace).
    _sysctl("net.ipv4.ip_forward", "1")
    # A closed connection's unsent data dies within seconds, not minutes (a relay's old
    # sends must not outlive SHARE_QUARANTINE_S, see above).
    _sysctl("net.ipv4.tcp_orphan_retries", ORPHAN_RETRIES)
    for scope in ("all", "default"):
        _sysctl(f"net.ipv4.conf.{scope}.rp_filter", "0")


def prepare_node(topo: Topology, node: str) -> None:
    """:func:`prepare_namespace` for ``node`` of ``topo``."""
    prepare_namespace(str(topo.node(node).address),
                      [str(lk.underlay_of(node).ip) for lk in topo.links_of(node)],
                      str(topo.node_net), tuple(str(a) for a in topo.gkm.addresses_at(node)),
                      node_tuns(topo, node), str(topo.dataplane.tunnel_net))


def node_tuns(topo: Topology, node: str) -> tuple[str, ...]:
    """The TUN of each of ``node``'s links."""
    return tuple(tun_name(lk) for lk in topo.links_of(node))


def share_ready(now: float, wanted_since: float, left: tuple[str, float] | None,
                address: str) -> bool:
    """Whether a share route for ``address``, wanted since ``wanted_since``, may be made:
    wanted for SHARE_HOLD_S, and SHARE_QUARANTINE_S past the node's last route for
    another address of the same pair (``left``: that address and when it went)."""
    if now - wanted_since < SHARE_HOLD_S:
        return False
    return left is None or left[0] == address or now - left[1] >= SHARE_QUARANTINE_S


def _send_rate(link: LinkSpec, node: str) -> float:
    """Bytes per second of key for ``node``'s sending direction of ``link`` (0: no limit)."""
    if link.key_rate_mbps <= 0:
        return 0.0
    share = link.ratio[0 if node == link.a else 1] / sum(link.ratio)
    return link.key_rate_mbps * 1e6 / 8 * share


class Router:
    def __init__(self, topo: Topology, node: str):
        self.topo = topo
        self.node = node
        self.addr = str(topo.node(node).address)
        self.dir = paths.node_dir(topo.prefix, node)
        self.links = [LinkEnds(lk.name, lk.index, lk.a, lk.b) for lk in topo.links]
        self.mine = {lk.name: lk for lk in topo.links_of(node)}
        # Entries live longer where the slowest link's keepalives, which carry them
        # across it, are further apart (control.core.sizing).
        self.db = LinkStateDb(self.links, lsa_max_age([lk.sizes.keepalive_s
                                                       for lk in topo.links]))
        self.metric = topo.routing.metric
        self.end_costs = {name: EndCost(lk.sizes.ring_capacity, _send_rate(lk, node))
                          for name, lk in self.mine.items()}
        self.own_costs: dict[str, int] = {name: 1 for name in self.mine}
        self.installed: dict[str, str] = {}  # destination node -> link
        self.share_routes: dict[str, str] = {}  # share address -> link
        self.share_wanted: dict[str, tuple[str, float]] = {}  # address -> (link, since)
        self.share_left: dict[str, tuple[str, float]] = {}  # pair -> (address, when)
        self.share_pair = {str(a): f"{o}>{d}" for (o, d), addrs
                           in topo.gkm.share_addresses.items() for a in addrs.values()}
        self._multipath_key: tuple | None = None
        self._share_next: dict[str, str] = {}  # share address -> link, for that key
        self.multipath: dict[str, dict] = {}  # "origin>destination" -> its paths
        self.stop = False
        self.changes = 0
        self.tuns = list(node_tuns(topo, node))
        self.filter_checked = time.monotonic()
        self.filter_restored = 0  # times the tunnels' owner filter was found gone
        self.filter_failing = False  # putting it back failed last time (said once)

    def local_states(self) -> dict[str, bool]:
        """Each own link's state by its tunnel manager. A status that stopped being
        refreshed means down at once if the manager is gone, and only after
        STALE_STATUS_MAX_S if it is merely held up (a busy machine): its workers go on
        carrying traffic meanwhile. Under the key metric, each own end's cost follows the
        key its ENC ring holds (kept as it was while the status cannot be read)."""
        states = {}
        now = time.time()
        for name in self.mine:
            try:
                st = json.loads((self.dir / f"tun-{name}.json").read_text())
                age = now - float(st.get("updated", 0))
                ident = st.get("ident")
                states[name] = bool(st.get("up")) and (
                    age < STALE_STATUS_S or age < STALE_STATUS_MAX_S
                    and isinstance(ident, int) and same_process_alive(ident))
                stored = st.get("enc_stored")
                if self.metric == "key" and isinstance(stored, int) and states[name]:
                    room = st.get("enc_room_used")
                    self.own_costs[name] = self.end_costs[name].update(
                        stored, room if isinstance(room, int) else None)
            except (OSError, ValueError, TypeError):
                states[name] = False
        return states

    def watch_filter(self, now: float) -> None:
        """Put the tunnels' owner filter back if something removed it (a host firewall's
        reload flushes every table): every FILTER_CHECK_S, said in the log and counted.
        A failure to put it back is said once, until it works again; the routing loop
        waits at most FILTER_NFT_TIMEOUT_S for nft."""
        if not self.tuns or now - self.filter_checked < FILTER_CHECK_S:
            return
        self.filter_checked = now
        if tunnel_filter_present() is not False:
            return
        try:
            _close_tunnels_to_other_users(self.tuns, FILTER_NFT_TIMEOUT_S)
        except SetupError as e:
            if not self.filter_failing:
                log.error("node %s: the tunnels' owner filter is gone and %s; trying "
                          "again every %.0f s", self.node, e, FILTER_CHECK_S)
            self.filter_failing = True
            return
        self.filter_failing = False
        self.filter_restored += 1
        log.warning("node %s: the tunnels' owner filter (nftables table inet %s) was gone; "
                    "put back", self.node, NFT_TABLE)

    def step(self, ip: IPRoute) -> None:
        now = time.monotonic()
        self.watch_filter(now)
        local = self.local_states()
        for name in self.mine:
            lsa = self.dir / f"lsa-{name}.json"
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if time.time() - lsa.stat().st_mtime < self.db.max_age_s:  # a live neighbour's
                    self.db.merge(json.loads(lsa.read_text()).get("lsdb"), now)
        self.db.originate(self.node, local, time.time_ns() // 1000, now, self.own_costs)
        self.db.expire(now)
        up = self.db.up_links(self.node, local)
        costs = self.db.costs(up, self.node, self.own_costs)
        paths_now = shortest_paths(self.links, up, self.node, costs)
        self._apply(ip, {dst: path[0][0] for dst, path in paths_now.items()})
        self._apply_shares(ip, self._share_hops(up, costs), now)
        write_json(self.dir / "lsdb.json", {"entries": self.db.export()})
        write_json(self.dir / "router.json", {
            "node": self.node, "address": self.addr, "updated": time.time(),
            "metric": self.metric, "links_up": sorted(up), "changes": self.changes,
            "filter_restored": self.filter_restored,
            "costs": {name: costs[name] for name in sorted(costs)},
            "own_costs": dict(sorted(self.own_costs.items())),
            "routes": {dst: {"address": str(self.topo.node(dst).address), "via": link,
                             "dev": tun_name(self.mine[link]),
                             "path": [[name, frm] for name, frm in paths_now.get(dst, [])]}
                       for dst, link in sorted(self.installed.items())},
            "multipath": self.multipath,
            "share_routes": dict(sorted(self.share_routes.items()))})

    def _share_hops(self, up: set[str], costs: dict[str, int]) -> dict[str, str]:
        """Each share address this node routes, and the link to its next hop: every
        ordered pair's disjoint paths, recomputed only when the links or costs change."""
        g = self.topo.gkm
        if g.paths < 2:
            return {}
        key = (frozenset(up), tuple(sorted(costs.items())))
        if key == self._multipath_key:
            return self._share_next
        self._multipath_key = key
        links = {lk.name: lk for lk in self.links}
        self.multipath, self._share_next = {}, {}
        for (o, d), addrs in g.share_addresses.items():
            found = sorted(disjoint_paths(self.links, up, o, d, g.paths, costs),
                           key=lambda p: links[p[0][0]].index)  # numbered by first link
            for p in found:
                if (link := next_link(p, self.node)) is not None:
                    self._share_next[str(addrs[p[0][0]])] = link
            self.multipath[f"{o}>{d}"] = {
                "wanted": g.paths, "addresses": [str(addrs[p[0][0]]) for p in found],
                "paths": [[[name, frm] for name, frm in p] for p in found],
                "nodes": [path_nodes(o, p, links) for p in found]}
        return self._share_next

    def _apply_shares(self, ip: IPRoute, hops: dict[str, str], now: float) -> None:
        """Route each share address this node lies on the path of, and no other: a route
        no longer wanted (or via another link now) goes at once; a new one is made once
        wanted for SHARE_HOLD_S, and not before SHARE_QUARANTINE_S after this node's route
        for another address of the same pair went (``share_ready``)."""
        self.share_wanted = {a: w if (w := self.share_wanted.get(a)) and w[0] == link
                             else (link, now) for a, link in hops.items()}
        want = {a: (a, link) for a, link in hops.items()
                if self.share_routes.get(a) == link
                or share_ready(now, self.share_wanted[a][1],
                               self.share_left.get(self.share_pair[a]), a)}
        for a in self.share_routes:  # the origin sends every share: no quarantine there
            if a not in want and not self.share_pair[a].startswith(f"{self.node}>"):
                self.share_left[self.share_pair[a]] = (a, now)
        self._sync(ip, want, self.share_routes, "share ")

    def _apply(self, ip: IPRoute, hops: dict[str, str]) -> None:
        """Route each node in ``hops`` via its link (only the changes)."""
        self._sync(ip, {dst: (str(self.topo.node(dst).address), link)
                        for dst, link in hops.items()}, self.installed, "")

    def _sync(self, ip: IPRoute, want: dict[str, tuple[str, str]],
              installed: dict[str, str], what: str) -> None:
        """Make ``installed`` (key -> link) what ``want`` (key -> (address, link)) says:
        a /32 route per key via its link's TUN, from the node address; the others gone."""
        for key, (addr, link) in want.items():
            if installed.get(key) == link:
                continue
            dev = ip.link_lookup(ifname=tun_name(self.mine[link]))
            if not dev:
                continue
            try:
                ip.route("replace", dst=f"{addr}/32", oif=dev[0], prefsrc=self.addr)
            except NetlinkError as e:
                log.warning("node %s: %sroute to %s via %s: %s", self.node, what, key, link, e)
                continue
            log.info("node %s: %sroute to %s via link %s", self.node, what, key, link)
            installed[key] = link
            self.changes += 1
        for key in [k for k in installed if k not in want]:
            with contextlib.suppress(NetlinkError):
                ip.route("del", dst=f"{self._address_of(key)}/32")
            log.info("node %s: no %sroute to %s", self.node, what, key)
            del installed[key]
            self.changes += 1

    def _address_of(self, key: str) -> str:
        """The address a route's key stands for: a node's, or a share address itself."""
        return str(self.topo.node(key).address) if key in self.topo.nodes else key

    def forget_old_routes(self, ip: IPRoute) -> None:
        """Remove routes a previous router of this node left (after a crash): this one
        knows nothing of them and would never withdraw one that no longer holds."""
        for node in self.topo.nodes.values():
            if node.name != self.node:
                with contextlib.suppress(NetlinkError):
                    ip.route("del", dst=f"{node.address}/32")
        for (_, d), addrs in self.topo.gkm.share_addresses.items():
            for a in addrs.values() if d != self.node else ():
                with contextlib.suppress(NetlinkError):
                    ip.route("del", dst=f"{a}/32")

    def run(self) -> None:
        prepare_node(self.topo, self.node)  # again: a restarted router finds it as it was
        with IPRoute() as ip:
            self.forget_old_routes(ip)
            while not self.stop:
                self.step(ip)
                time.sleep(ROUTE_INTERVAL_S)



def router_main(config_path: str, node: str) -> None:

    die_with_parent()
    setup_logging()
    router = Router(load_topology(config_path), node)
    run_until_stopped(router)
