"""The global key manager of one node (module 3): a thin shell of sockets, timers and a
database around its I/O-free cores: :mod:`control.gkm.destination` (which arrived blocks
and reservations are kept, and the answers), :mod:`control.gkm.origin` (what the answers
to this node's blocks and reservations come to), :mod:`control.gkm.relay` (outbox,
restocking), :mod:`control.gkm.take` (the local take protocol), :mod:`control.gkm.wire`
and :mod:`control.gkm.store`.

One process per node, one thread, one ZeroMQ poll loop:

1. Restock: for each destination this node originates key for, when the pair's key
   (usable + pending) is under the low watermark, generate blocks until the high one,
   never more than the send window ahead of the acknowledgements. Generation starts once
   the destination has been reached at least once since this process started.
2. Store each new block in the ENC store as *pending*, then send it (BLOCKS) from a
   DEALER socket connected to the destination's node address inside the OTP network:
   the kernel routes it through the tunnels, every hop OTP-encrypted, relays included.
3. The destination's ROUTER socket (on its node address) knows who sent it: every relay
   connection is CurveZMQ, the origin proven by its key (``control.gkm.relay_auth``); it
   stores the blocks in its DEC store, synced, and only then acknowledges (ACK).
4. The origin marks acknowledged blocks usable; the rest are resent on a new connection,
   or after the time the path needs to deliver what is in flight (control.gkm.pacing).

Blocks leave no faster than the key on their path can carry (a token bucket at a share of
the slowest hop's key rate, from the router's path), with about a second of that rate in
flight. Reservations travel on a second connection per destination, marked DSCP CS6 like
everything the ROUTER sends back, so the tunnels give them key before bulk and they never
wait behind a window of blocks.
5. Keys are taken over a Unix socket (``control.gkm.client``), one request at a time.

Multipath relay (``[gkm] paths`` = k > 1): each send of blocks leaves as k SHARES
messages (``control.gkm.shares``), one DEALER per share address of the destination,
each of which the routers route along its own node-disjoint path; the destination
stores the XOR once all k arrived, then acknowledges. With fewer paths up,
``paths_policy`` decides: "wait" sends nothing, "fewer" sends as many shares as there
are paths and counts those blocks (``degraded_blocks``).

A kill -9 anywhere leaves pending blocks that are resent with the same bytes after the
restart; the destination answers a block it already holds with DUPLICATE (invariant 4).
Status goes to ``gkm.json`` for `qkdctl status`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.utils.monitor

from control.core import paths, zmq_frames
from control.core.address import wait_for_address
from control.core.config import Topology
from control.core.procs import is_alive
from control.core.statefile import read_status, write_json
from control.gkm import client as gkm_client
from control.gkm import origin, pacing, seeds, shares, take
from control.gkm.ahead import AHEAD_IDLE_S, Ahead
from control.gkm.carving import id_text
from control.gkm.destination import Arrived, Inbox, Node, Proof, may_hold
from control.gkm.errors import StoreError, StoreFailed, UnknownError
from control.gkm.origin import Fate, Takers
from control.gkm.relay import Outbox, RateMeter, Restock
from control.gkm.relay_auth import ZAP_ENDPOINT, secure_dealer, secure_router, zap_reply
from control.gkm.relay_keys import RelayKeyError, load_relay_keys
from control.gkm.store import BlockState, KeyStore
from control.gkm.store_rules import key_id_bytes
from control.gkm.wire import (
    MAX_RESERVE_BATCH,
    Blocks,
    RelayWireError,
    Reserved,
    Shares,
    encode_blocks,
    encode_shares,
    parse_batch,
)
from control.routing.linkstate import LinkEnds, shortest_paths
from dataplane.classify import TOS_CONTROL
from dataplane.limits import (
    MAX_RELAY_BLOCKS,
    MIN_BLOCKS_AHEAD,
    RELAY_RETRY_MAX_S,
    RELAY_RETRY_S,
)

log = logging.getLogger("qkdnet.gkm")
PUBLISH_S = 0.5
UNREACHABLE_AFTER_S = 5.0
SEND_BATCH = 4 << 20          # bytes of blocks per BLOCKS message
GENERATE_BATCH = 16 << 20     # bytes generated and stored in one write
RECEIVE_BATCH = 16 << 20      # bytes of arrived messages stored with one synced write
RESERVE_RETRY_S = 2.0         # unanswered reservations are sent again after this, then
                              # backing off to RELAY_RETRY_MAX_S while none is answered
HOLD_UNCONFIRMED_S = 10.0     # a dec request for keys not yet confirmed waits this (or to
                              # its deadline)
                              # (how many may wait: destination.may_hold)
MAX_ENDED_TAKES = 8192        # dec takes whose taker gave up, remembered to refuse them
RESERVE_HOLD_S = 0.005          # new reservations wait at most this for sent ones (Nagle)
HEARTBEATS_TO_DEAD = 6        # pings unanswered (the period: topo.gkm.heartbeat_s, 5 s at
                              # 1 Mb/s and faster; they cross the tunnels, and cost key) for
                              # the connection to count as dead: 30 s at 5 s
# Anyone who reaches the relay port (a process in the node's namespace) can connect, and
# each connection holds a descriptor until its CurveZMQ handshake is done: one that says
# nothing is closed after this (libzmq's default, 30 s). A handshake takes milliseconds.
RELAY_HANDSHAKE_MS = 15_000
RENEW_HOLD_S = 3.0            # multipath: after the paths moved, no new send for this long
                              # (every router has learned the move by then)
REDIAL_S = 1.0                # a connection whose handshake failed is dialled again after
                              # this (libzmq gives up on it after an authentication failure)
PAUSE_FLAG = "gkm.paused"     # while this file exists in the node dir: no restocking
CRASH_ENV = "QKDNET_GKM_CRASH"  # tests: "point=probability,..." kills this process there
HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class CrashPoints:
    """Fault injection for the crash tests: SIGKILL this process at named points."""

    def __init__(self, spec: str | None):
        self.points: dict[str, float] = {}
        for part in (spec or "").split(","):
            if "=" in part:
                name, p = part.split("=", 1)
                self.points[name.strip()] = float(p)
        self.rng = random.Random()

    def __call__(self, point: str) -> None:
        p = self.points.get(point)
        if p and self.rng.random() < p:
            log.warning("crash point %s: killing this process (test)", point)
            os.kill(os.getpid(), signal.SIGKILL)


class OutboundPair:
    """What the origin keeps per destination: socket, outbox, restock rule, meters."""

    def __init__(self, name: str, node_id: int, address: str, gkm_spec,
                 pair: tuple[str, str] = ("", "")):
        self.name = name
        self.id = node_id
        self.address = address
        self.outbox = Outbox()
        self.restock = Restock(gkm_spec.low_watermark, gkm_spec.high_watermark,
                               gkm_spec.block_size)
        self.rate = RateMeter()
        self.data: dict[int, bytes] = {}  # bytes of pending blocks, for (re)sending
        # Where blocks go: the node address, or (multipath) one share address per path.
        mine = gkm_spec.share_addresses.get(pair, {})
        self.addresses = [str(a) for a in mine.values()] or [address]
        self.slot = {link: i for i, link in enumerate(mine)}  # origin's link -> socket
        self.socks: list[zmq.Socket] = []  # blocks (or shares), one per address
        self.monitors: list[zmq.Socket] = []
        self.sock_up: list[bool] = []
        self.wanted = gkm_spec.paths
        self.policy = gkm_spec.paths_policy
        self.share_paths: list[list[tuple[str, str]]] = []  # the router's disjoint paths
        self.degraded_blocks = 0  # blocks sent as fewer shares than wanted ("fewer")
        self.shares_sent = 0
        self.renewed = 0  # times the paths moved and the share connections were renewed
        self.hold_until = 0.0  # no send before this (the paths just moved)
        self.ctl: zmq.Socket | None = None  # reservations, marked as control traffic
        self.ctl_monitor: zmq.Socket | None = None
        self.path: list[tuple[str, str]] = []  # (link, node it leaves from), first hop first
        self.path_rate = float("inf")  # bytes/s of key the path carries our way
        self.window = gkm_spec.window
        self.pacer = pacing.Pacer(float("inf"), gkm_spec.block_size)
        self.ever_connected = False
        self.not_connected_sends = 0
        self.last_error = ""
        self.reported_state = "ok"
        self.reserve_due = 0.0   # 0: resend every unacknowledged reservation now
        self.reserve_next = 0
        self.reserve_held = 0.0  # when the oldest new, unsent reservation was made (0: none)
        self.reserve_retry = RESERVE_RETRY_S  # next resend's delay (grows while unanswered)
        self.routed = True  # the router has a route there (assumed until it says)
        self.redial: dict[str, float] = {}  # "sock<i>"/"ctl" -> when to dial it again

    @property
    def connected(self) -> bool:
        """Some data socket has a connection (multipath: one of the share addresses)."""
        return any(self.sock_up)

    @property
    def paths_up(self) -> int:
        """Disjoint paths to the destination the router has (single-path relay: 1)."""
        return 1 if self.wanted == 1 else len(self.share_paths)

    @property
    def path_slots(self) -> list[int]:
        """Per disjoint path, in the router's order, the socket its shares take: the one
        to the share address of the origin's link it leaves by."""
        return [self.slot[p[0][0]] for p in self.share_paths if p and p[0][0] in self.slot]

    def shares_now(self) -> int:
        """How many shares (paths) a send uses now: ``wanted`` when that many disjoint
        paths are up; fewer under the "fewer" policy; 0: wait."""
        if self.wanted == 1:
            return 1
        if self.paths_up >= self.wanted:
            return self.wanted
        return self.paths_up if self.policy == "fewer" else 0


class Held(NamedTuple):
    """A dec_keys request waiting for its keys (``GlobalKeyManager._hold``)."""

    envelope: list[bytes]
    body: bytes
    until: float           # answered "busy" then
    sae: str
    keys: frozenset[bytes]  # the key IDs it names, 16 bytes each (``key_id_bytes``)


class GlobalKeyManager:
    def __init__(self, topo: Topology, node: str, state_dir: Path | None = None):
        self.topo = topo
        self.node = topo.node(node)
        self.spec = topo.gkm
        self.dir = paths.node_dir(topo.prefix, node)
        self.dir.mkdir(parents=True, exist_ok=True)
        sdir = state_dir or paths.state_dir(topo.prefix, node)
        dests = self.spec.destinations_of(node)
        origins = self.spec.origins_of(node)
        if not zmq.has("curve"):
            raise SystemExit(f"gkm {node}: this libzmq has no CURVE (pyzmq's wheels bundle "
                             f"it): the relay cannot authenticate its peers")
        try:
            self.keys = load_relay_keys(self.spec.keys, node, [*dests, *origins])
        except RelayKeyError as e:
            raise SystemExit(f"gkm {node}: {e}") from None
        # The ZAP handler's table: the nodes that may send here, each from its address.
        self.admitted = {key: (name, str(topo.node(name).address))
                         for key, name in self.keys.raw_peers().items() if name in origins}
        # Blocks may run ahead of the highest held by the origin's window, not more.
        self.ahead = max(MIN_BLOCKS_AHEAD, 4 * (self.spec.window // self.spec.block_size))
        self.store = KeyStore(sdir / "gkm", self.node.id,
                              {d: topo.node(d).id for d in dests},
                              {o: topo.node(o).id for o in origins})
        self.ctx = zmq.Context()  # the local key socket
        # The relay's sockets apart: libzmq asks the ZAP handler of a socket's own context.
        self.relay_ctx = zmq.Context()
        self.dests = {d: OutboundPair(d, topo.node(d).id, str(topo.node(d).address), self.spec,
                                      (node, d))
                      for d in dests}
        self.links_by_name = {lk.name: lk for lk in topo.links}
        # Until the router says which way key goes: the shortest path over every link.
        self.link_ends = [LinkEnds(lk.name, lk.index, lk.a, lk.b) for lk in topo.links]
        planned = shortest_paths(self.link_ends, {lk.name for lk in topo.links}, node)
        for d in self.dests.values():
            self._set_path(d, planned.get(d.name, []))
        self.origins = set(origins)
        self.crash = CrashPoints(os.environ.get(CRASH_ENV))
        # The destination's rules: which arrived blocks and reservations are kept.
        self.inbox = Inbox(self.node.id, node, {n.id: Node(n.name, str(n.address))
                                                for n in topo.nodes.values()},
                           self.origins, self.ahead, self.store, self.crash,
                           block_size=self.spec.block_size)
        # Partial sets of shares an origin may have waiting: four windows of blocks.
        self.inbox.shares.max_sets = max(shares.MIN_SETS_PER_ORIGIN,
                                         4 * (self.spec.window // self.spec.block_size))
        self.stop = False
        self.pause_flag = self.dir / PAUSE_FLAG
        self.paused = self.pause_flag.exists()
        self.started = time.time()
        self.refused_messages = 0
        self.refused_connections = 0
        self.late_requests = 0
        # dec_keys requests for keys reserved here but not deliverable yet (not confirmed
        # by the master's node, or on their way to this SAE in an earlier answer):
        # (envelope, request, deadline, SAE, key IDs), answered once a confirmation,
        # cancellation or settled answer decides one of their keys, or "busy" at their
        # deadline.
        self.held: list[Held] = []
        self.ended_takes: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.here = take.Here(node, self.node.id, {d.name: d.id for d in self.dests.values()},
                              self.ended_takes)
        self.held_total = 0
        self.touched: set[bytes] = set()  # key IDs decided since the held were looked at
        self.last_refusal = ""
        self.takers = Takers()  # takes answered once the slave's node confirms
        now = time.monotonic()
        self.pools = Ahead(self.spec.reserve_ahead_s)  # keys reserved ahead of demand
        for d in self.dests.values():
            self.pools.restore(d.name, self.store.ahead_records(d.name),
                               set(self.store.enc[d.name].unacked), now)
            for seq in self.store.pending(d.name):
                data = self.store.block("enc", d.name, seq)
                if data is not None:
                    d.data[seq] = data
                    d.outbox.add(seq, len(data), now)
            if d.data:
                log.info("gkm %s: %d pending block(s) for %s to resend", node,
                         len(d.data), d.name)
            cancelled = self.store.cancel_unanswered(d.name, keep=self.pools.rseqs(d.name))
            if cancelled:
                log.info("gkm %s: %d reservation(s) for %s whose taker was never answered "
                         "(a restart): cancelled", node, len(cancelled), d.name)

    # ---- sockets ------------------------------------------------------------------------

    def _path_rate(self, path: list[tuple[str, str]]) -> float:
        links = self.links_by_name
        return pacing.path_rate([pacing.Hop(links[name].key_rate_mbps, links[name].ratio,
                                            frm == links[name].a)
                                 for name, frm in path if name in links])

    def _set_path(self, d: OutboundPair, path: list[tuple[str, str]],
                  more: list[list[tuple[str, str]]] | None = None) -> None:
        """Pace ``d``'s blocks to the key rate of ``path`` (unchanged when no path is
        known: the last one, or the planned one, is the best guess); with ``more``
        paths (multipath: one share on each), to the slowest of them all."""
        if not path:
            return
        rate = min(self._path_rate(p) for p in [path, *(more or [])])
        if path == d.path and rate == d.path_rate:
            return
        d.path, d.path_rate = path, rate
        d.window = pacing.window(self.spec.window, self.spec.block_size, rate)
        pace = rate * pacing.PACE_SHARE
        d.pacer.set_rate(pace, max(self.spec.block_size, int(pace * pacing.BURST_S))
                         if pace != float("inf") else self.spec.block_size)
        d.outbox.retry_s = pacing.resend_after(d.window, rate, None, RELAY_RETRY_S)
        d.outbox.retry_max_s = max(RELAY_RETRY_MAX_S, 2 * d.outbox.retry_s)

    def _follow_routes(self) -> None:
        """The paths the router installed (router.json), for pacing; under the key metric,
        a one-link path's stored key for its pair to spend at once (pacing.spendable_stock)."""
        router = read_status(self.dir / "router.json") or {}
        routes = router.get("routes", {})
        for d in self.dests.values():
            d.routed = d.name in routes
            if d.wanted > 1:
                self._follow_shares(d, (router.get("multipath") or {})
                                    .get(f"{self.node.name}>{d.name}") or {})
                continue
            path = routes.get(d.name, {}).get("path")
            if isinstance(path, list) and all(isinstance(h, list) and len(h) == 2
                                              for h in path):
                self._set_path(d, [(str(a), str(b)) for a, b in path])
            if self.topo.routing.metric == "key" and len(d.path) == 1 and d.routed:
                tun = read_status(self.dir / f"tun-{d.path[0][0]}.json") or {}
                stored, capacity = tun.get("enc_stored"), tun.get("enc_capacity")
                if tun.get("up") and isinstance(stored, int) and isinstance(capacity, int):
                    d.pacer.credit(pacing.spendable_stock(stored, capacity))

    def _follow_shares(self, d: OutboundPair, entry: dict) -> None:
        """The disjoint paths the router found for this pair: how many shares a send
        may use, and the pace of the slowest path used."""
        found = entry.get("paths")
        if not isinstance(found, list):
            return
        got = [[(str(a), str(b)) for a, b in p] for p in found
               if isinstance(p, list) and all(isinstance(h, list) and len(h) == 2 for h in p)]
        if d.paths_up != len(got):
            log.info("gkm %s: %d of %d disjoint paths to %s", self.node.name, len(got),
                     d.wanted, d.name)
        before = {d.slot.get(p[0][0]): p for p in d.share_paths if p}
        after = {d.slot.get(p[0][0]): p for p in got if p}
        moved = sorted(i for i in set(before) | set(after)
                       if i is not None and before.get(i) != after.get(i) and before)
        if moved:
            self._renew_shares(d, moved)
        d.share_paths = got
        used = got[:max(1, d.shares_now())]
        if used:
            self._set_path(d, used[0], used[1:])

    def _renew_shares(self, d: OutboundPair, slots: list[int]) -> None:
        """The paths of share addresses ``slots`` moved (or went): new connections to
        them, and every pending block sent again as a new send. Closing the old sockets
        drops what waited in them, so no share of an older send leaves along a new path
        (the routers hold a moved share route back meanwhile: control.routing.router)."""
        for i in slots:
            address = d.addresses[i]
            old, mon = d.socks[i], d.monitors[i]
            for sock in (old, mon):
                self.poller.unregister(sock)
            self.by_sock.pop(old, None)
            self.by_mon.pop(mon, None)
            old.disable_monitor()
            mon.close(0)
            old.close(0)
            d.socks[i], d.monitors[i] = self._dealer(d, tos=0, address=address)
            d.sock_up[i] = False
            self.poller.register(d.socks[i], zmq.POLLIN)
            self.poller.register(d.monitors[i], zmq.POLLIN)
            self.by_sock[d.socks[i]] = d
            self.by_mon[d.monitors[i]] = (d, i)
            d.redial.pop(f"sock{i}", None)
        d.renewed += 1
        now = time.monotonic()
        d.hold_until = now + RENEW_HOLD_S
        d.outbox.resend_all(now)
        log.info("gkm %s: the paths to %s moved: new connections, pending blocks sent "
                 "again as new shares", self.node.name, d.name)

    def _bind(self) -> None:
        # The ZAP handler first: a CURVE server without one would admit any client key.
        self.zap = self.relay_ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.router = self.relay_ctx.socket(zmq.ROUTER)
        secure_router(self.router, self.keys)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.HANDSHAKE_IVL, RELAY_HANDSHAKE_MS)
        # No ROUTER_HANDOVER: the peers' identities are the ones this socket assigns, so
        # a handover could only ever let one authenticated peer that names itself with
        # another's identity take over that connection (and its ACKs).
        # Everything it sends is an answer (ACK, RESERVED) or a TCP acknowledgement of
        # blocks: control traffic, which the tunnels give key before bulk.
        self.router.setsockopt(zmq.TOS, TOS_CONTROL)
        endpoint = f"tcp://{self.node.address}:{self.topo.ports.relay}"
        # The router module may not have added the node address yet.
        if wait_for_address(str(self.node.address), lambda: self.stop,
                            timeout_s=float("inf"), poll_s=0.2):
            self.router.bind(endpoint)
            for a in self.spec.addresses_at(self.node.name):  # multipath: shares arrive
                self.router.bind(f"tcp://{a}:{self.topo.ports.relay}")  # at these
        self.api = self.ctx.socket(zmq.ROUTER)
        self.api.setsockopt(zmq.LINGER, 0)
        sock = gkm_client.socket_path(self.topo.prefix, self.node.name)
        sock.unlink(missing_ok=True)
        self.api.bind(f"ipc://{sock}")
        os.chmod(sock, 0o600)  # keys are handed out here: the node's own processes only
        for d in self.dests.values():
            for a in d.addresses:
                sock, monitor = self._dealer(d, tos=0, address=a)
                d.socks.append(sock)
                d.monitors.append(monitor)
                d.sock_up.append(False)
            d.ctl, d.ctl_monitor = self._dealer(d, tos=TOS_CONTROL)

    def _dealer(self, d: OutboundPair, tos: int, address: str | None = None
                ) -> tuple[zmq.Socket, zmq.Socket]:
        s = self.relay_ctx.socket(zmq.DEALER)
        secure_dealer(s, self.keys, d.name)
        heartbeat_ms = round(self.topo.gkm.heartbeat_s * 1000)
        for opt, v in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, 64),
                       (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 1000),
                       (zmq.HEARTBEAT_IVL, heartbeat_ms),
                       (zmq.HEARTBEAT_TIMEOUT, HEARTBEATS_TO_DEAD * heartbeat_ms),
                       (zmq.CONNECT_TIMEOUT, 2000), (zmq.TOS, tos)):
            s.setsockopt(opt, v)
        monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                                       | HANDSHAKE_FAILED)
        s.connect(f"tcp://{address or d.address}:{self.topo.ports.relay}")
        return s, monitor

    def close(self) -> None:
        for d in self.dests.values():
            for sock, monitor in (*zip(d.socks, d.monitors, strict=True),
                                  (d.ctl, d.ctl_monitor)):
                if sock is not None:
                    sock.disable_monitor()
                    monitor.close(0)
                    sock.close(0)
        for s in ("router", "zap", "api"):
            if hasattr(self, s):
                getattr(self, s).close(0)
        self.ctx.term()
        self.relay_ctx.term()
        self.store.close()

    # ---- the destination's side ---------------------------------------------------------

    def on_zap(self) -> None:
        """Answer libzmq's questions about connecting relay clients: only the nodes that
        send global key here, each with its own key from its own address."""
        for _ in range(64):
            try:
                frames = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            decision = zap_reply(frames, self.admitted)
            self.zap.send_multipart(decision.reply)
            if decision.node is None:
                self._refuse(decision.reason, connection=True)

    def _refuse(self, why: str, connection: bool = False) -> None:
        """Count a refused message (or connection) and log why, once per new reason."""
        if connection:
            self.refused_connections += 1
        else:
            self.refused_messages += 1
        if why != self.last_refusal:
            log.warning("gkm %s: relay %s refused: %s", self.node.name,
                        "connection" if connection else "message", why)
        self.last_refusal = why

    def on_blocks(self, messages: list[list[zmq.Frame]]) -> None:
        """Store what several BLOCKS and RESERVE messages carry with one sync (group
        commit), then answer each: fewer syncs when messages arrive faster than one sync,
        and no answer before what it confirms is durable (``Inbox.receive``)."""
        arrived = []
        for frames in messages:
            ident, rest = frames[0], frames[1:]
            try:
                msgs = parse_batch([f.buffer for f in rest])
            except RelayWireError as e:
                self._refuse(str(e))
                continue
            arrived.append(Arrived(ident, msgs, self._proof(rest[0])))
        outcome = self.inbox.receive(arrived, time.monotonic())
        for why in outcome.refusals:
            self._refuse(why)
        if outcome.settled and self.held:
            self.touched |= outcome.settled
        for frames in outcome.answers:
            zmq_frames.send(self.router, frames)
        if self.touched:
            self.retry_held(self.touched)

    @staticmethod
    def _proof(frame: zmq.Frame) -> Proof:
        """Who a relay connection proved to be: the node name the ZAP handler admitted
        its CURVE key as (User-Id), and its address (None: not authenticated)."""
        try:
            return frame.get("User-Id"), frame.get("Peer-Address")
        except zmq.ZMQError:  # no such property: not an authenticated connection
            return None, None

    # ---- the origin's side --------------------------------------------------------------

    def on_reply(self, d: OutboundPair, frames: list[zmq.Frame], out: list[list]) -> None:
        """An ACK of blocks, or one or more RESERVED, on the connection to ``d``; answers
        to takers go to ``out``, to be sent once this turn's writes are synced."""
        try:
            msgs = parse_batch([f.buffer for f in frames])
        except RelayWireError as e:
            self._refuse(str(e))
            return
        if not origin.fits(msgs, self.node.id, d.id):
            self._refuse(f"unexpected message on the connection to {d.name}")
            return
        if isinstance(msgs[0], Reserved):
            self.on_reserved(d, msgs, out)
            return
        self.crash("origin.acked")
        acked = origin.on_ack(d.name, msgs[0], d.outbox, d.rate, d.restock,
                               time.monotonic())
        if acked.usable:
            self.store.mark(d.name, acked.usable, BlockState.USABLE)
        if acked.conflict:
            self.store.mark(d.name, acked.conflict, BlockState.CONFLICT)
        for seq in (*acked.usable, *acked.conflict):
            d.data.pop(seq, None)
        if acked.error is not None:
            d.last_error = acked.error

    def on_reserved(self, d: OutboundPair, msgs: list[Reserved], out: list[list]) -> None:
        """Answers to reservations (and to confirmations and cancellations), as
        ``control.gkm.origin.on_reserved`` decides: a waiting taker is answered only
        after the confirmation of its keys is durably queued. Called inside the turn's
        group commit (:meth:`serve_local`): the answers go to ``out``, and the queued
        confirmations out to ``d``, only after its sync."""
        now = time.monotonic()
        d.reserve_retry = RESERVE_RETRY_S  # the connection answers
        plan = origin.on_reserved(d.name, msgs, self.takers, now)
        if plan.resend:
            d.reserve_due = 0.0  # an earlier one was lost: resend all, in order
        for step in plan.steps:
            if step.fate == Fate.FORGET and self.pools.owns(d.name, step.rseq):
                dropped = self.pools.acked(d.name, step.rseq, step.refused, now)
                if dropped:  # refused there: nothing to cancel, nobody to tell
                    self.store.forget_ahead(d.name, dropped)
            if step.fate == Fate.GIVE_UP:  # the keys go to no one
                self._give_up((d.name, step.rseq), step.waiting, out)
            if step.fate != Fate.CONFIRM:
                self.store.reservation_acked(d.name, step.rseq)
            if step.fate == Fate.REFUSED:
                out.append([*step.waiting.envelope, *origin.refused_answer(d.name)])
            elif step.fate == Fate.CONFIRM:
                out.append([*step.waiting.envelope, *step.waiting.reply])
        if plan.confirmed:
            self.store.confirm_acked(d.name, plan.confirmed)

    def send_reservations(self, d: OutboundPair, now: float) -> None:
        """Unacknowledged reservations go out in order: new ones at once; all of them
        again after a new connection, a GAP, or RESERVE_RETRY_S without an answer."""
        unacked = self.store.enc[d.name].unacked
        if not unacked:
            return
        if now >= d.reserve_due:
            todo = sorted(unacked)
            # A live connection delivers what it was given (resending it spends key for
            # nothing): the resend is a safety net, backing off while nothing answers.
            d.reserve_due = now + d.reserve_retry
            d.reserve_retry = min(2 * d.reserve_retry, RELAY_RETRY_MAX_S)
        else:
            todo = sorted(s for s in unacked if s >= d.reserve_next)
            if not todo:
                return
            if not d.reserve_held:
                d.reserve_held = now
            # As Nagle's algorithm: while sent ones are unanswered, new ones wait (at
            # most RESERVE_HOLD_S) and then go together, one segment through the tunnels
            # and one group commit at the slave's node for all; a lone taker waits not.
            in_flight = len(unacked) > len(todo)
            if in_flight and now - d.reserve_held < RESERVE_HOLD_S:
                return
        d.reserve_held = 0.0
        for at in range(0, len(todo), MAX_RESERVE_BATCH):
            batch = todo[at:at + MAX_RESERVE_BATCH]
            try:
                zmq_frames.send(d.ctl, [unacked[r] for r in batch], zmq_frames.NOBLOCK)
            except zmq.Again:
                break
            d.reserve_next = max(d.reserve_next, batch[-1] + 1)

    def expire_waiting(self, now: float) -> None:
        """Takers past their deadline, or with no route to the slave's node, are given
        up (``Takers.overdue``)."""
        for key in self.takers.overdue(now, lambda name: self.dests[name].routed):
            self._give_up(key, self.takers.pop(key))

    def _give_up(self, key: tuple[str, int], waiting: origin.Waiting,
                 out: list[list] | None = None) -> None:
        """The taker of reservation ``key`` is answered "unreachable" and never gets the
        keys, so they are cancelled at the slave's node too: a numbered cancellation
        follows the reservation there (invariant 5: no SAE gets a refused key). The
        answer goes to ``out`` inside a group commit, else at once (the write is synced)."""
        self.store.cancel_reservation(*key)
        answer = [*waiting.envelope, *origin.gave_up_answer(key[0])]
        if out is None:
            zmq_frames.send(self.api, answer)
        else:
            out.append(answer)

    def _hold(self, envelope: list[bytes], body: bytes, req: take.TakeDec,
              held_until: float | None) -> bool:
        """Keep a dec request for keys not yet confirmed until the master's node confirms
        or cancels them (the confirmation is usually a round trip behind the
        reservation, and the slave SAE may ask in between), or for keys on their way to
        this SAE until that answer is settled; False: it may not wait
        (``destination.may_hold``)."""
        keys = frozenset(map(key_id_bytes, req.key_ids))
        if held_until is None:
            if not may_hold(((h.sae, h.keys) for h in self.held), req.sae, keys):
                return False
            self.held_total += 1
            held_until = req.deadline or time.monotonic() + HOLD_UNCONFIRMED_S
        self.held.append(Held(envelope, body, held_until, req.sae, keys))
        return True

    def retry_held(self, touched: set[bytes] | None = None) -> None:
        """Answer the held requests that may now be decided, with one sync: those naming
        a key of ``touched`` (key IDs a confirmation, cancellation or settled answer
        decided; emptied), or all of them (None: the periodic look, for a holder that
        died and settles nothing). Only those are read and checked again: the others'
        keys have not changed."""
        if touched is None:
            held, self.held = self.held, []
        else:
            held = [h for h in self.held if not h.keys.isdisjoint(touched)]
            if held:
                self.held = [h for h in self.held if h.keys.isdisjoint(touched)]
            touched.clear()
        answers = []
        with self.store.group():
            for h in held:
                answer = self._answer([*h.envelope, h.body], held_until=h.until)
                if answer is not None:
                    answers.append(answer)
        for frames in answers:
            zmq_frames.send(self.api, frames, copy=False)

    def expire_held(self, now: float) -> None:
        due = [h for h in self.held if now >= h.until]
        if not due:
            return
        self.held = [h for h in self.held if now < h.until]
        for h in due:
            zmq_frames.send(self.api, [*h.envelope, *take.encode_refusal(
                "busy", "the keys are reserved here but not deliverable yet (the master's "
                        "key manager has not confirmed them, or an answer carrying them "
                        "is still on its way to this SAE); nothing was delivered, try "
                        "again")])

    def restock(self, d: OutboundPair, now: float) -> None:
        if not d.ever_connected or self.paused:
            return
        st = self.store.enc[d.name]
        want = d.restock.blocks_to_make(st.usable_bytes(), st.pending_bytes(), now)
        room = (d.window - d.outbox.pending_bytes) // self.spec.block_size
        count = min(want, room, max(1, GENERATE_BATCH // self.spec.block_size))
        if count <= 0:
            return
        blocks = seeds.new_blocks(count, self.spec.block_size)
        seqs = self.store.add_pending(d.name, blocks)
        for seq, b in zip(seqs, blocks, strict=True):
            d.data[seq] = b.data
            d.outbox.add(seq, len(b.data), now)
        self.crash("origin.stored")

    def send_due(self, d: OutboundPair, now: float) -> None:
        n = d.shares_now()
        if n == 0 or now < d.hold_until:
            return  # multipath: fewer disjoint paths than wanted ("wait"), or they moved
        while d.pacer.allows(self.spec.block_size, now):
            budget = max(self.spec.block_size, int(d.pacer.tokens)) \
                if d.pacer.rate != float("inf") else SEND_BATCH
            seqs = d.outbox.due(now, min(SEND_BATCH, budget), MAX_RELAY_BLOCKS)
            if not seqs:
                return
            if not self._send(d, seqs, n):
                d.outbox.unsent(seqs, now)
                d.not_connected_sends += 1
                return
            d.pacer.spend(sum(len(d.data[s]) for s in seqs), now)
            self.crash("origin.sent")

    def _send(self, d: OutboundPair, seqs: list[int], n: int) -> bool:
        """Blocks ``seqs`` whole (one path), or as ``n`` shares of one new send, each
        to its share address; False: a socket had no connection (resent later, as a
        new send: shares already sent of this one are never completed)."""
        if d.wanted == 1:
            frames = encode_blocks(Blocks(self.node.id, d.id,
                                          tuple((s, d.data[s]) for s in seqs)))
            try:
                zmq_frames.send(d.socks[0], frames, zmq_frames.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            return True
        # All or none: a send whose shares cannot all leave now is not begun (a share
        # sent alone spends its path's key on a set that never completes).
        socks = [d.socks[i] for i in d.path_slots[:n]]
        if len(socks) < n or not all(s.getsockopt(zmq.EVENTS) & zmq.POLLOUT for s in socks):
            return False
        nonce = int.from_bytes(os.urandom(8), "big")
        parts = shares.split([d.data[s] for s in seqs], n)
        for i, part in enumerate(parts):
            frames = encode_shares(Shares(self.node.id, d.id, nonce, i, n,
                                          tuple(zip(seqs, part, strict=True))))
            try:
                zmq_frames.send(socks[i], frames, zmq_frames.NOBLOCK, copy=False)
            except zmq.Again:
                return False
        d.shares_sent += n * len(seqs)
        if n < d.wanted:
            d.degraded_blocks += len(seqs)
        return True

    def on_ctl_monitor(self, d: OutboundPair) -> None:
        """A new control connection: reservations sent on the old one may be lost."""
        while True:
            try:
                ev = zmq.utils.monitor.recv_monitor_message(d.ctl_monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                d.reserve_due = 0.0
            elif ev["event"] & HANDSHAKE_FAILED:
                self._handshake_failed(d, "ctl")

    def on_monitor(self, d: OutboundPair, i: int) -> None:
        """Events of ``d``'s data socket ``i`` (its only one, or the one to share
        address ``i``)."""
        while True:
            try:
                ev = zmq.utils.monitor.recv_monitor_message(d.monitors[i], zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if d.last_error.startswith("no authenticated connection"):
                    d.last_error = ""
                d.sock_up[i] = d.ever_connected = True
                log.info("gkm %s: connected to %s%s", self.node.name, d.name,
                         f" (share address {d.addresses[i]})" if d.wanted > 1 else "")
                # Whatever was sent on the old connection may be lost: resend soon.
                d.outbox.resend_all(time.monotonic())
                d.reserve_due = 0.0
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                d.sock_up[i] = False
            elif ev["event"] & HANDSHAKE_FAILED:
                self._handshake_failed(d, f"sock{i}")

    def _handshake_failed(self, d: OutboundPair, which: str) -> None:
        """Say why once; dial again soon: libzmq ends a connection whose handshake failed
        for good, and the destination's key manager may be back (or rekeyed) later."""
        why = (f"no authenticated connection to {d.name}: it refused this node's relay key, "
               f"or the server there does not hold {d.name}'s key (from {self.spec.keys})")
        if d.last_error != why:
            log.error("gkm %s: %s", self.node.name, why)
        d.last_error = why
        d.redial.setdefault(which, time.monotonic() + REDIAL_S)

    def redial(self, d: OutboundPair, now: float) -> None:
        for which, due in list(d.redial.items()):
            if now >= due:
                del d.redial[which]
                if which == "ctl":
                    sock, address = d.ctl, d.address
                else:
                    i = int(which.removeprefix("sock"))
                    sock, address = d.socks[i], d.addresses[i]
                endpoint = f"tcp://{address}:{self.topo.ports.relay}"
                with contextlib.suppress(zmq.ZMQError):  # gone already: fine
                    sock.disconnect(endpoint)
                sock.connect(endpoint)

    # ---- keys for local clients ---------------------------------------------------------

    def serve_local(self, requests: list[list[bytes]],
                    replies: list[tuple[OutboundPair, list[zmq.Frame]]]) -> None:
        """One turn's local requests and the slaves' nodes' replies, with one sync
        (group commit: see KeyStore.group): the takes, and the confirmations of the
        reservations just applied, become durable together; then the takers are answered
        and the new reservations and confirmations go out. A take for slave SAEs is
        answered later, once the slave's node has applied its reservation. (One sync
        instead of one for each: a key API take waits for three in a row, and a synced
        write holds the interpreter while the disk works.)"""
        answers: list[list] = []
        with self.store.group():
            for d, frames in replies:
                self.on_reply(d, frames, answers)
            for frames in requests:
                answer = self._answer(frames)
                if answer is not None:
                    answers.append(answer)
            if requests:
                self.reserve_ahead(time.monotonic())
        for frames in answers:
            zmq_frames.send(self.api, frames, copy=False)
        now = time.monotonic()
        for d in self.dests.values():
            self.send_reservations(d, now)

    def _answer(self, frames: list[bytes], held_until: float | None = None
                ) -> list[bytes] | None:
        """Serve one local request; the answer to send (None: sent later, when the
        slave's node has the reservation or the held request is decided)."""
        # The envelope: the REQ/DEALER identity frames up to and including the empty
        # delimiter (a DEALER client adds a request id before it), sent back unchanged.
        envelope, body = frames[:-1], frames[-1]
        req = None
        try:
            req = take.parse_request(body, time.monotonic(), self.here)
            head, data = self._serve(req)
            reply = take.encode_answer(head, data)
            if "rseq" in head:  # answered once the slave's node has the reservation
                self.takers.wait((req.peer, head["rseq"]), envelope, reply,
                                 time.monotonic(), req.deadline)
                return None
        except StoreError as e:
            if isinstance(e, take.LateRequest):
                self.late_requests += 1
            if e.kind in ("pending", "delivering") and isinstance(req, take.TakeDec) and \
                    self._hold(envelope, body, req, held_until):
                return None
            reply = take.refusal(e)
        except StoreFailed as e:  # the disk, not the request: 503; the loop stops after
            reply = take.refusal(StoreError("failed", str(e)))
        except Exception as e:  # a bad request must never stop the key manager
            reply = take.refusal(take.malformed(e))
        return [*envelope, *reply]

    def _serve(self, req: take.Parsed) -> tuple[dict, bytes | None]:
        """What a request (read and checked) does to the store, and its answer."""
        if isinstance(req, take.TakeEnc):
            if req.slaves is not None:
                pool = (req.peer, req.master, req.slaves, req.size)
                self.pools.note(pool, req.number, time.monotonic())
                ready = self.pools.ready(pool, req.number)
                if ready is not None:  # reserved ahead: one sync, answered at once
                    self.store.take_ahead(req.peer, [kid for kid, _ in ready])
                    self.pools.served(pool, ready)
                    return ({"key_ids": [id_text(kid) for kid, _ in ready]},
                            b"".join(k for _, k in ready))
                keys, rseq = self.store.take_enc_reserved(req.peer, req.number, req.size,
                                                          req.slaves, req.master)
                return ({"key_ids": [str(s.key_id) for s, _ in keys], "rseq": rseq},
                        b"".join(k for _, k in keys))
            keys = self.store.take_enc(req.peer, req.number, req.size)
            return ({"key_ids": [str(s.key_id) for s, _ in keys]},
                    b"".join(k for _, k in keys))
        if isinstance(req, take.Reserve):
            self.store.reserve(req.peer, req.key_ids, req.sae)
            return {}, None
        if isinstance(req, take.TakeDec):
            keys = self.store.take_dec(req.peer, req.key_ids, req.sae, req.master,
                                       holder=req.holder, alive=is_alive)
            return {"sizes": [len(k) for k in keys]}, b"".join(keys)
        if isinstance(req, take.Answered):  # a key API worker's word on a dec take
            settled = self.store.answer_written(req.peer, req.key_ids, req.sae, req.holder,
                                                req.written)
            if not req.written and not settled:  # a take not served yet (held for its
                self.ended_takes[req.holder] = None  # keys' confirmation): never serve it
                while len(self.ended_takes) > MAX_ENDED_TAKES:
                    self.ended_takes.popitem(last=False)
            if self.held:  # settled: a request held while these keys were on their way;
                # ended: the held take itself, refused now rather than at the next look
                # (its SAE may ask again at once, and waits for a key once)
                self.touched.update(map(key_id_bytes, req.key_ids))
            return {"settled": settled}, None
        if isinstance(req, take.Cancel):  # keys whose taker gave up after they were taken
            self.store.cancel_keys(req.peer, [s.id_bytes for s in req.slices])
            return {"cancelled": len(req.slices)}, None
        if isinstance(req, take.Stock):  # what a Status answer needs, cheaply
            st = self.store.enc.get(req.peer)
            if st is None:
                raise UnknownError(f"no global key is kept for node {req.peer!r}")
            return {"usable": st.usable_bytes(), "high_watermark": self.spec.high_watermark,
                    "block_size": self.spec.block_size}, None
        if isinstance(req, take.Summary):
            return {"summary": self.status()}, None
        assert isinstance(req, take.Digests)
        if (req.kind, req.peer) not in [("enc", p) for p in self.store.enc] + \
                [("dec", p) for p in self.store.dec]:
            raise UnknownError(f"no {req.kind} store for {req.peer!r}")
        return {"digests": self.store.digests(req.kind, req.peer)}, None

    def reserve_ahead(self, now: float) -> None:
        """Refill the pools of keys reserved ahead whose pair's demand asks for it
        (``control.gkm.ahead``); inside the turn's group commit, so the reservations
        leave with the turn's answers. A pool the store cannot fill now waits for the
        next take."""
        for pool, number in self.pools.wanting(now):
            peer, master, slaves, size = pool
            d = self.dests.get(peer)
            if d is None or not d.routed:
                continue
            try:
                rseq, keys = self.store.reserve_ahead(peer, number, size, slaves, master)
            except StoreError:  # not enough key (or none of that size) now
                continue
            except Exception:  # the turn's takes are durable: their answers must go out
                log.exception("gkm %s: reserving keys ahead for %s failed", self.node.name,
                              peer)
                continue
            self.pools.reserving(pool, rseq, keys)

    def close_idle_pools(self, now: float) -> None:
        """Pools of keys reserved ahead that nobody took from for a while: their keys
        are cancelled at both nodes (``control.gkm.ahead``)."""
        for pool in self.pools.idle(now):
            key_ids = self.pools.close(pool)
            self.store.cancel_ahead(pool[0], key_ids)
            log.info("gkm %s: %d key(s) reserved ahead for %s at %s unused for %.0f s: "
                     "cancelled", self.node.name, len(key_ids), pool[1] or "-", pool[0],
                     AHEAD_IDLE_S)

    # ---- status -------------------------------------------------------------------------

    def status(self) -> dict:
        now = time.monotonic()
        stores = self.store.summary()
        spec = self.spec
        peers = {}
        for name in sorted(set(stores["enc"]) | set(stores["dec"])):
            entry: dict = {"enc": stores["enc"].get(name), "dec": stores["dec"].get(name)}
            d = self.dests.get(name)
            if d is not None:
                fill = d.restock.last
                entry["relay"] = {
                    "state": d.outbox.state(now, UNREACHABLE_AFTER_S),
                    "connected": d.connected, "rate_bps": 8 * d.rate.rate(now),
                    "acked_bytes": d.rate.total, "acked_blocks": d.outbox.acked_blocks,
                    "retries": d.outbox.retries, "not_connected": d.not_connected_sends,
                    "pending_blocks": len(d.outbox.pending),
                    "conflicts": d.outbox.conflicts,
                    "ack_delay_ms": None if d.outbox.srtt is None else 1000 * d.outbox.srtt,
                    "path": [name for name, _ in d.path],
                    "paths": None if d.wanted == 1 else {
                        "wanted": d.wanted, "up": d.paths_up, "using": d.shares_now(),
                        "policy": d.policy, "degraded_blocks": d.degraded_blocks,
                        "connected": sum(d.sock_up), "renewed": d.renewed,
                        "shares_sent": d.shares_sent,
                        "links": [[name for name, _ in p] for p in d.share_paths]},
                    "path_rate_bps": None if d.path_rate == float("inf")
                    else 8 * d.path_rate,
                    "window": d.window, "resend_after_s": d.outbox.retry_s,
                    "filling": d.restock.filling, "last_error": d.last_error,
                    "last_fill": None if fill is None else {
                        "bytes": fill.bytes, "seconds": fill.seconds,
                        "ended_ago_s": now - fill.ended},
                }
                entry["ahead"] = self.pools.summary(name)
            peers[name] = entry
        return {"node": self.node.name, "pid": os.getpid(), "updated": time.time(),
                "started": self.started, "paused": self.paused,
                "watermarks": {"low": spec.low_watermark, "high": spec.high_watermark},
                "block_size": spec.block_size, "window": spec.window,
                "received_blocks": self.inbox.received_blocks,
                "shares": self.inbox.shares.summary(),
                "received_bytes": self.inbox.received_bytes,
                "refused_messages": self.refused_messages,
                "refused_connections": self.refused_connections,
                "late_requests": self.late_requests,
                "held_unconfirmed": len(self.held), "held_unconfirmed_total": self.held_total,
                "db": stores["db"], "peers": peers}

    def _report(self, now: float) -> None:
        """Say it once when a destination stops acknowledging, and when it is back."""
        for d in self.dests.values():
            st = d.outbox.state(now, UNREACHABLE_AFTER_S)
            if st == "unreachable" and d.reported_state != st:
                log.warning("gkm %s: no acknowledgement from %s for %.0f s; %d block(s) "
                            "pending, resending with backoff (retries so far: %d)",
                            self.node.name, d.name, UNREACHABLE_AFTER_S,
                            len(d.outbox.pending), d.outbox.retries)
            elif st == "ok" and d.reported_state == "unreachable":
                log.info("gkm %s: %s acknowledges again", self.node.name, d.name)
            d.reported_state = st

    # ---- loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self._bind()
        self.poller = poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.api, zmq.POLLIN)
        for d in self.dests.values():
            for sock in (*d.socks, *d.monitors, d.ctl, d.ctl_monitor):
                poller.register(sock, zmq.POLLIN)
        self.by_sock = by_sock = {s: d for d in self.dests.values() for s in (*d.socks, d.ctl)}
        self.by_mon = by_mon = {m: (d, i) for d in self.dests.values()
                                for i, m in enumerate(d.monitors)}
        by_ctl_mon = {d.ctl_monitor: d for d in self.dests.values()}
        next_publish = 0.0
        log.info("gkm %s: relay on %s:%d, originating for %s, receiving from %s",
                 self.node.name, self.node.address, self.topo.ports.relay,
                 ", ".join(self.dests) or "-", ", ".join(sorted(self.origins)) or "-")
        while not self.stop:
            now = time.monotonic()
            nearest = min((max(d.outbox.next_due(), d.pacer.next_at(self.spec.block_size, now))
                           for d in self.dests.values()), default=now + 0.05)
            held = [d.reserve_held + RESERVE_HOLD_S for d in self.dests.values()
                    if d.reserve_held]
            timeout = max(0.0, min(0.05, nearest - now, *(h - now for h in held)))
            requests: list[list[bytes]] = []
            replies: list[tuple[OutboundPair, list[zmq.Frame]]] = []
            for sock, _ in poller.poll(timeout * 1000):
                if sock is self.zap:
                    self.on_zap()
                elif sock is self.router:
                    batch, size = [], 0
                    while len(batch) < 256 and size < RECEIVE_BATCH:
                        try:
                            batch.append(zmq_frames.recv(self.router, zmq_frames.NOBLOCK,
                                                         copy=False))
                        except zmq.Again:
                            break
                        size += sum(len(f) for f in batch[-1])
                    if batch:
                        self.on_blocks(batch)
                elif sock is self.api:
                    for _ in range(256):
                        try:
                            requests.append(zmq_frames.recv(self.api, zmq_frames.NOBLOCK))
                        except zmq.Again:
                            break
                elif sock in by_sock:
                    d = by_sock[sock]
                    for _ in range(1024):
                        try:
                            replies.append((d, zmq_frames.recv(sock, zmq_frames.NOBLOCK,
                                                               copy=False)))
                        except zmq.Again:
                            break
                elif sock in by_mon:
                    self.on_monitor(*by_mon[sock])
                elif sock in by_ctl_mon:
                    self.on_ctl_monitor(by_ctl_mon[sock])
            if requests or replies:
                self.serve_local(requests, replies)
                if self.touched:  # after the turn's answers: held ones its settles decided
                    self.retry_held(self.touched)
            now = time.monotonic()
            for d in self.dests.values():
                if d.redial:
                    self.redial(d, now)
                self.restock(d, now)
                self.send_due(d, now)
                self.send_reservations(d, now)
            if self.takers:
                self.expire_waiting(now)
            if self.held:
                self.expire_held(now)
            if now >= next_publish:
                self.inbox.shares.expire(now)
                self.store.expire_handed(alive=is_alive)
                self.close_idle_pools(now)
                if self.held:  # a holder that died settles nothing: look again
                    self.retry_held()
                self.paused = self.pause_flag.exists()
                self._follow_routes()
                self._report(now)
                write_json(self.dir / "gkm.json", self.status())
                next_publish = now + PUBLISH_S
            if self.store.failed is not None:
                self.stop_on_failed_store()

    def stop_on_failed_store(self) -> None:
        """A write to the key store failed (a full or failing disk): the in-memory index
        may now be ahead of the disk, so nothing may be answered from it. Stop; the node
        restarts this key manager, which reads the store again, and the origins resend
        whatever went unanswered."""
        log.critical("gkm %s: the key store could not write (%s): stopping, to be "
                     "restarted from what the disk holds", self.node.name, self.store.failed)
        raise SystemExit(f"gkm {self.node.name}: key store write failed: {self.store.failed}")


def gkm_main(config_path: str, node: str, state_dir: str | None) -> None:
    from control.core.config import load_topology
    from control.core.lifecycle import die_with_parent, run_until_stopped
    from control.core.logs import setup_logging
    from control.core.memory import keep_freed_memory

    die_with_parent()
    setup_logging()
    keep_freed_memory()  # blocks and keys of up to 16 MiB pass through on every take
    gkm = GlobalKeyManager(load_topology(config_path), node,
                           Path(state_dir) if state_dir else None)
    try:
        run_until_stopped(gkm)
    except StoreFailed:  # raised out of a turn (a group commit's sync, a restock): stop
        gkm.stop_on_failed_store()
    finally:
        gkm.close()
