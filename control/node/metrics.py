"""A node's status files as Prometheus metric families.

The node's modules already publish their state as JSON files (``control.node.status``); this
turns one node's snapshot of them into metrics, afresh at each scrape, so the dataplane
counts nothing twice and pays nothing for being watched. ``families`` is pure (snapshot and
clock in, families out); ``NodeCollector`` reads the files when Prometheus asks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from control.core.config import Topology
from control.lkm.accounting import link_end
from control.node.status import STALE_AFTER_S, collect_node

log = logging.getLogger("qkdnet.metrics")

# name -> (type, help); every sample names one of these.
SPECS: dict[str, tuple[str, str]] = {
    "qkdnet_status_stale": ("gauge", "1 when a status file was last updated over 3 s ago"),
    "qkdnet_module_up": ("gauge", "1 when the supervisor's module process is alive"),
    "qkdnet_module_restarts_total": ("counter", "restarts of a module by the supervisor"),
    "qkdnet_ring_fill_bytes": ("gauge", "key stored in a link end's ring"),
    "qkdnet_ring_capacity_bytes": ("gauge", "capacity of a link end's ring"),
    "qkdnet_local_key_received_bytes_total": ("counter", "QKD key taken from the link"),
    "qkdnet_local_key_rate_bits_per_second": ("gauge", "QKD key taken from the link, recent rate"),
    "qkdnet_local_key_stored_bytes_total": ("counter", "QKD key stored per ring direction"),
    "qkdnet_local_key_discarded_bytes_total": ("counter", "QKD key discarded (rings full)"),
    "qkdnet_local_key_used_bytes_total": (
        "counter", "local key per link end and direction by use: pad, mac (one-time MAC "
                   "keys), control (keepalives), wasted (claimed and wiped unused), "
                   "released (DEC, after use)"),
    "qkdnet_local_key_ring_in_bytes_total": ("counter", "local key written to the ring"),
    "qkdnet_local_key_ring_stored_bytes": ("gauge", "local key in the ring, not yet used"),
    "qkdnet_local_key_pending_bytes": ("gauge", "local key from the source, undecided"),
    "qkdnet_agreement_synced": ("gauge", "1 when the link's key agreement is in sync"),
    "qkdnet_key_source_up": ("gauge", "1 when the link's QKD key source delivers"),
    "qkdnet_link_up": ("gauge", "1 when the link's OTP tunnel is up (and its status fresh)"),
    "qkdnet_tunnel_packets_total": ("counter", "packets through the OTP tunnel"),
    "qkdnet_tunnel_bytes_total": ("counter", "packet bytes through the OTP tunnel"),
    "qkdnet_tunnel_key_bytes_total": ("counter", "one-time pad and MAC key used"),
    "qkdnet_tunnel_dropped_packets_total": ("counter", "packets the tunnel dropped, by reason"),
    "qkdnet_tunnel_workers_alive": ("gauge", "OTP worker processes alive"),
    "qkdnet_tunnel_worker_restarts_total": ("counter", "OTP worker restarts"),
    "qkdnet_guard_up": ("gauge", "1 when the XDP guard is attached to the link's underlay"),
    "qkdnet_guard_packets_total": ("counter", "datagrams the XDP guard saw, by verdict"),
    "qkdnet_guard_bytes_total": ("counter", "bytes the XDP guard saw, by verdict"),
    "qkdnet_routes": ("gauge", "nodes this node has a route to"),
    "qkdnet_global_key_enc_usable_bytes": ("gauge", "acknowledged global key for the peer"),
    "qkdnet_global_key_enc_pending_bytes": ("gauge", "global key sent, not yet acknowledged"),
    "qkdnet_global_key_dec_stored_bytes": ("gauge", "global key received from the peer"),
    "qkdnet_global_key_taken_bytes_total": ("counter", "ENC key handed to applications"),
    "qkdnet_global_key_delivered_bytes_total": ("counter", "DEC key handed to applications"),
    "qkdnet_global_key_received_bytes_total": ("counter", "global key received, all peers"),
    "qkdnet_global_key_low_watermark_bytes": ("gauge", "restock below this much key"),
    "qkdnet_global_key_high_watermark_bytes": ("gauge", "restock up to this much key"),
    "qkdnet_relay_rate_bits_per_second": ("gauge", "global key acknowledged, recent rate"),
    "qkdnet_relay_acked_bytes_total": ("counter", "global key acknowledged by the peer"),
    "qkdnet_relay_retries_total": ("counter", "global key blocks sent again"),
    "qkdnet_relay_connected": ("gauge", "1 when the relay to the peer is connected"),
    "qkdnet_relay_state": ("gauge", "1 for the relay's current state"),
    "qkdnet_relay_paths_up": ("gauge", "node-disjoint paths to the peer the routers "
                                       "found (multipath relay)"),
    "qkdnet_relay_paths_wanted": ("gauge", "node-disjoint paths asked for ([gkm] paths)"),
    "qkdnet_relay_paths_used": ("gauge", "paths (shares) a send uses now; 0: waiting"),
    "qkdnet_relay_degraded_blocks_total": ("counter", "blocks sent as fewer shares than "
                                                      "asked for (paths_policy fewer)"),
    "qkdnet_relay_refused_total": ("counter", "relay messages and connections refused "
                                              "(not from an admitted node's key manager)"),
    "qkdnet_api_serving": ("gauge", "1 when every key API worker runs (and its manager)"),
    "qkdnet_api_workers_alive": ("gauge", "key API worker processes alive"),
    "qkdnet_api_worker_restarts_total": ("counter", "key API workers forked again"),
    "qkdnet_api_refused_connections_total": ("counter", "connections answered 503 and "
                                                        "closed: their SAE held [api] "
                                                        "max_connections_per_address "
                                                        "from their address"),
    "qkdnet_api_hand_keys": ("gauge", "keys the key API workers hold taken ahead in their "
                                      "hands"),
    "qkdnet_api_hand_served_keys_total": ("counter", "keys handed out from workers' hands"),
    "qkdnet_api_hand_given_back_bytes_total": ("counter", "key given back from idle or "
                                                          "stopping workers' hands"),
    "qkdnet_api_hand_lost_bytes_total": ("counter", "key taken into workers' hands that "
                                                    "reaches no application (held by a "
                                                    "worker that died, or not given back)"),
}
RELAY_STATES = ("ok", "retrying", "unreachable")

Sample = tuple[str, dict[str, str], float]


def _stale(node: str, source: str, link: str, st: dict, now: float) -> Sample:
    return ("qkdnet_status_stale", {"node": node, "source": source, "link": link},
            float(now - st["updated"] > STALE_AFTER_S))


def _supervisor(node: str, st: dict, now: float) -> Iterator[Sample]:
    yield _stale(node, "supervisor", "", st, now)
    for m in st["modules"]:
        lb = {"node": node, "module": m["name"]}
        yield "qkdnet_module_up", lb, float(m["alive"])
        yield "qkdnet_module_restarts_total", lb, m["restarts"]


def _lkm(node: str, link: str, st: dict, now: float) -> Iterator[Sample]:
    yield _stale(node, "lkm", link, st, now)
    peer = {"node": node, "link": link, "peer": st["peer"]}
    for direction, ring in st["rings"].items():
        lb = {"node": node, "link": link, "direction": direction, "role": ring["role"]}
        yield "qkdnet_ring_fill_bytes", lb, ring["fill"]
        yield "qkdnet_ring_capacity_bytes", lb, ring["capacity"]
    key = st["key"]
    yield "qkdnet_local_key_received_bytes_total", peer, key["bytes_in"]
    yield "qkdnet_local_key_rate_bits_per_second", peer, key["rate_bps"]
    for direction in ("ab", "ba"):
        yield ("qkdnet_local_key_stored_bytes_total",
               {"node": node, "link": link, "direction": direction},
               key[f"bytes_stored_{direction}"])
    yield ("qkdnet_local_key_discarded_bytes_total", {"node": node, "link": link},
           key["bytes_discarded"])
    if "accounting" in st:
        end = link_end(st["accounting"])
        yield "qkdnet_local_key_pending_bytes", {"node": node, "link": link}, end.pending
        for d in end.directions:
            lb = {"node": node, "link": link, "direction": d.direction, "role": d.role}
            yield "qkdnet_local_key_ring_in_bytes_total", lb, d.key_in
            yield "qkdnet_local_key_ring_stored_bytes", lb, d.stored
            uses = {"control": d.used_control, "wasted": d.wasted}
            uses |= ({"pad": d.used_pad, "mac": d.used_mac} if d.role == "enc"
                     else {"released": d.released, "pad": d.used_pad, "mac": d.used_mac})
            for use, v in uses.items():
                yield "qkdnet_local_key_used_bytes_total", {**lb, "use": use}, v
    yield "qkdnet_agreement_synced", peer, float(st["agreement"]["synced"])
    yield "qkdnet_key_source_up", {"node": node, "link": link}, float(st["source"]["up"])


def _tunnel(node: str, link: str, st: dict, now: float) -> Iterator[Sample]:
    stale = _stale(node, "tunnel", link, st, now)
    yield stale
    nl = {"node": node, "link": link}
    yield "qkdnet_link_up", {**nl, "peer": st["peer"]}, float(st["up"] and not stale[2])
    c = st["counters"]
    for d in ("tx", "rx"):
        lb = {**nl, "direction": d}
        yield "qkdnet_tunnel_packets_total", lb, c[f"{d}_pkts"]
        yield "qkdnet_tunnel_bytes_total", lb, c[f"{d}_bytes"]
        yield "qkdnet_tunnel_key_bytes_total", lb, c[f"{d}_key"]
    drops = [(k.split("_", 2)[1], k.split("_", 2)[2], v) for k, v in c.items()
             if k.startswith("drop_")]
    drops += [("control", r, v) for r, v in (st.get("control_drops") or {}).items()]
    for d, reason, v in drops:
        yield ("qkdnet_tunnel_dropped_packets_total", {**nl, "direction": d, "reason": reason},
               v)
    yield "qkdnet_tunnel_workers_alive", nl, sum(bool(w["alive"]) for w in st["workers"])
    yield ("qkdnet_tunnel_worker_restarts_total", nl,
           sum(w["restarts"] for w in st["workers"]))
    g = st.get("guard")
    if g:
        on = g.get("state") == "on"
        yield ("qkdnet_guard_up", {**nl, "mode": g.get("mode") if on else "off",
                                   "interface": g.get("interface") or ""}, float(on))
        for reason, cnt in (g.get("counts") or {}).items():
            lb = {**nl, "reason": reason}
            yield "qkdnet_guard_packets_total", lb, cnt["packets"]
            yield "qkdnet_guard_bytes_total", lb, cnt["bytes"]


def _router(node: str, st: dict, now: float) -> Iterator[Sample]:
    yield _stale(node, "router", "", st, now)
    yield "qkdnet_routes", {"node": node}, len(st.get("routes") or {})


def _gkm(node: str, st: dict, now: float) -> Iterator[Sample]:
    yield _stale(node, "gkm", "", st, now)
    n = {"node": node}
    yield "qkdnet_global_key_received_bytes_total", n, st["received_bytes"]
    yield "qkdnet_global_key_low_watermark_bytes", n, st["watermarks"]["low"]
    yield "qkdnet_global_key_high_watermark_bytes", n, st["watermarks"]["high"]
    for kind in ("message", "connection"):
        yield "qkdnet_relay_refused_total", {**n, "kind": kind}, st.get(f"refused_{kind}s", 0)
    for peer, p in st["peers"].items():
        lb = {"node": node, "peer": peer}
        if enc := p.get("enc"):
            yield "qkdnet_global_key_enc_usable_bytes", lb, enc["usable"]
            yield "qkdnet_global_key_enc_pending_bytes", lb, enc["pending"]
            yield "qkdnet_global_key_taken_bytes_total", lb, enc["taken_bytes"]
        if dec := p.get("dec"):
            yield "qkdnet_global_key_dec_stored_bytes", lb, dec["stored"]
            yield "qkdnet_global_key_delivered_bytes_total", lb, dec["delivered_bytes"]
        if relay := p.get("relay"):
            yield "qkdnet_relay_rate_bits_per_second", lb, relay["rate_bps"]
            yield "qkdnet_relay_acked_bytes_total", lb, relay["acked_bytes"]
            yield "qkdnet_relay_retries_total", lb, relay["retries"]
            yield "qkdnet_relay_connected", lb, float(relay["connected"])
            for s in RELAY_STATES:
                yield "qkdnet_relay_state", {**lb, "state": s}, float(relay["state"] == s)
            if mp := relay.get("paths"):
                yield "qkdnet_relay_paths_up", lb, mp["up"]
                yield "qkdnet_relay_paths_wanted", lb, mp["wanted"]
                yield "qkdnet_relay_paths_used", lb, mp["using"]
                yield "qkdnet_relay_degraded_blocks_total", lb, mp["degraded_blocks"]


def _api(node: str, st: dict, now: float) -> Iterator[Sample]:
    yield _stale(node, "api", "", st, now)
    n = {"node": node}
    fresh = now - st["updated"] <= STALE_AFTER_S
    yield "qkdnet_api_serving", n, float(fresh and st["state"] == "serving")
    yield "qkdnet_api_workers_alive", n, st["workers_alive"] if fresh else 0
    yield "qkdnet_api_worker_restarts_total", n, st["restarts"]
    yield "qkdnet_api_refused_connections_total", n, st.get("refused_connections", 0)
    if hands := st.get("hands"):
        yield "qkdnet_api_hand_keys", n, hands["held_keys"]
        yield "qkdnet_api_hand_served_keys_total", n, hands["served_keys"]
        yield "qkdnet_api_hand_given_back_bytes_total", n, hands["given_back_bytes"]
        yield "qkdnet_api_hand_lost_bytes_total", n, hands["lost_bytes"]


def _sources(node: str, snap: dict, now: float) -> Iterator[tuple[str, Iterator[Sample]]]:
    """(file, its samples, not yet computed) for each file the snapshot holds."""
    if st := snap.get("supervisor"):
        yield "state.json", _supervisor(node, st, now)
    for link, st in (snap.get("links") or {}).items():
        if st:
            yield f"lkm-{link}.json", _lkm(node, link, st, now)
    for link, st in (snap.get("tunnels") or {}).items():
        if st:
            yield f"tun-{link}.json", _tunnel(node, link, st, now)
    if st := snap.get("router"):
        yield "router.json", _router(node, st, now)
    if st := snap.get("gkm"):
        yield "gkm.json", _gkm(node, st, now)
    if st := snap.get("api"):
        yield "api.json", _api(node, st, now)


def families(node: str, snap: dict, now: float) -> list[Metric]:
    """Metric families of one node's snapshot (``control.node.status.collect_node``). A source
    whose file is missing or not in the expected shape adds nothing (said in the log)."""
    fams: dict[str, Metric] = {}
    for what, source in _sources(node, snap, now):
        try:
            samples = list(source)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            log.warning("node %s: %s has an unexpected shape (%r); left out", node, what, e)
            continue
        for name, labels, value in samples:
            fam = fams.get(name)
            if fam is None:
                kind, doc = SPECS[name]
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                fam = fams[name] = cls(name, doc, labels=list(labels))
            fam.add_metric(list(labels.values()), float(value))
    return list(fams.values())


class NodeCollector(Collector):
    """Reads the node's status files at each scrape; holds nothing between scrapes."""

    def __init__(self, topo: Topology, node: str):
        self.topo, self.node = topo, node

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        yield from families(self.node, collect_node(self.topo, self.node, now), now)


def node_registry(topo: Topology, node: str) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(topo, node))
    return reg
