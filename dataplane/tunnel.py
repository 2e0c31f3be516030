"""The OTP tunnel manager of one link end (module 2): owns the link's TUN device, runs its
pool of OTP workers, and keeps the link's liveness with authenticated keepalives.

One process per link end, started by the node supervisor inside the node's namespace.
It creates the persistent multi-queue TUN (so worker restarts keep the interface),
forks ``workers`` worker processes (:mod:`dataplane.worker`) and restarts any that die,
giving back the dead worker's key chunk first (its rest is never used: invariant 1).

Its own lane (CONTROL_LANE) carries keepalives through the link's own one-time pad every
KEEPALIVE_S (longer on links below about 1 Mb/s, so that they take at most 2 % of the
key: ``sizes.keepalive_s``, control.core.sizing): the peer's pool size and the node's
link-state database, which the router floods on (:mod:`control.routing.linkstate`). A
link end is up while its peer's keepalives arrive (:mod:`dataplane.liveness`: silent past
an adaptive timeout of LINK_DEAD_S to LINK_DEAD_MAX_S, as many keepalive periods, means
down, our own stalls excused, and up again only after a few timely keepalives) and key
has arrived (or more than the keepalives' reserve was there) within a few blocks' time:
"a link is down when its peer stops answering or it has no key". A link whose key
arrives slower than traffic drops packets (counted) but stays up; one whose key
stopped goes down, so routes avoid it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyroute2 import IPRoute

from control.core import paths
from control.core.config import DataplaneSpec, LinkSpec, Topology, load_topology
from control.core.lifecycle import die_with_parent, run_until_stopped
from control.core.logs import setup_logging
from control.core.procs import process_identity, same_process_alive
from control.core.statefile import write_json
from dataplane import wire
from dataplane.bpf.guard import (
    RELEASE_SLOT,
    STORED_SLOT,
    Guard,
    GuardError,
    GuardSpec,
    route_ifindex,
)
from dataplane.limits import KEEPALIVE_S, LSDB_REFRESH_S, RELEASE_GRACE_S
from dataplane.liveness import PeerLiveness
from dataplane.ring import CONTROL_LANE, MAX_LANES, CursorFile, KeyRing, RingError
from dataplane.stats import W_LINK_UP, W_PEER_WORKERS, W_PID_BASE, LinkStats
from dataplane.tun import create_persistent
from dataplane.worker import WorkerConfig, send_lanes, worker_main

log = logging.getLogger("qkdnet.tunnel")
STATUS_INTERVAL_S = 0.5
MAX_CONTROL_PAYLOAD = 16 << 10
RESTART_BACKOFF_S = 0.2
CONTROL_RCVBUF = 4 << 20  # the control socket's queue: a flood's datagrams of a loop turn
CONTROL_BUDGET_S = 0.008  # the most one loop turn spends checking control datagrams;
                          # with a backlog left, the turn sleeps as long: half a core at most
LOOP_S = 0.02  # the manager's loop turn when idle


def tun_name(link: LinkSpec) -> str:
    return f"otp{link.index}"


@dataclass(frozen=True)
class TunnelConfig:
    prefix: str
    node: str
    peer: str
    link: LinkSpec
    dp: DataplaneSpec
    tun: str
    tun_addr: str
    local_ip: str
    peer_ip: str
    port_base: int
    enc_ring: str
    dec_ring: str
    enc_dir: int
    dec_dir: int
    cursor_path: Path
    stats_name: str
    status_path: Path
    lsa_path: Path
    lsdb_path: Path
    audit_dir: Path | None
    guard_off: str | None = None  # why the node runs without the XDP guard (None: try it)
    node_net: str = "0.0.0.0/32"  # node addresses: reachable through the tunnels only
    tunnel_net: str = "0.0.0.0/32"  # the tunnels' own addresses: the same

    @classmethod
    def from_topology(cls, topo: Topology, node: str, link: LinkSpec,
                      state_dir: Path | None = None,
                      guard_off: str | None = None) -> TunnelConfig:
        is_a = node == link.a
        enc, dec = ("ab", "ba") if is_a else ("ba", "ab")
        ndir = paths.node_dir(topo.prefix, node)
        sdir = state_dir or paths.state_dir(topo.prefix, node)
        addr_a, addr_b = topo.dataplane.tunnel_addresses(link.index)
        audit = os.environ.get("QKDNET_AUDIT_DIR")
        return cls(
            prefix=topo.prefix, node=node, peer=link.peer_of(node), link=link,
            dp=topo.dataplane, tun=tun_name(link),
            tun_addr=str(addr_a if is_a else addr_b),
            local_ip=str(link.underlay_of(node).ip),
            peer_ip=str(link.underlay_of(link.peer_of(node)).ip),
            port_base=topo.ports.tunnel,
            enc_ring=paths.ring_name(topo.prefix, node, link.name, enc),
            dec_ring=paths.ring_name(topo.prefix, node, link.name, dec),
            enc_dir=0 if is_a else 1, dec_dir=1 if is_a else 0,
            cursor_path=sdir / f"{link.name}-{enc}.cursor",
            stats_name=paths.stats_name(topo.prefix, node, link.name),
            status_path=ndir / f"tun-{link.name}.json",
            lsa_path=ndir / f"lsa-{link.name}.json",
            lsdb_path=ndir / "lsdb.json",
            audit_dir=Path(audit) if audit else None, guard_off=guard_off,
            node_net=str(topo.node_net), tunnel_net=str(topo.dataplane.tunnel_net))

    def guard_spec(self) -> GuardSpec:
        return GuardSpec(peer_ip=self.peer_ip, port_lo=self.port_base, node_net=self.node_net,
                         tunnel_net=self.tunnel_net, workers=self.dp.workers,
                         link=self.link.index,
                         direction=self.dec_dir)

    def worker_config(self, lane: int, guard: Guard | None = None) -> WorkerConfig:
        dp, sizes = self.dp, self.link.sizes
        return WorkerConfig(
            link_index=self.link.index, link_name=self.link.name, lane=lane,
            workers=dp.workers, tun_name=self.tun, local_ip=self.local_ip,
            peer_ip=self.peer_ip, port_base=self.port_base, enc_ring=self.enc_ring,
            dec_ring=self.dec_ring, enc_dir=self.enc_dir, dec_dir=self.dec_dir,
            cursor_path=self.cursor_path, stats_name=self.stats_name, mtu=dp.mtu,
            chunk=sizes.chunk, conventional=dp.conventional, key_wait_s=dp.key_wait_s,
            reserve_bulk=sizes.reserve_bulk, reserve_control=sizes.reserve_control,
            pin_limit=sizes.pin_limit,
            audit_dir=self.audit_dir, floors_fd=guard.floors.fd if guard else -1,
            close_fds=guard.other_fds() if guard else ())


def setup_tun(name: str, mtu: int, address: str) -> None:
    """Create (or adopt) the link's persistent multi-queue TUN, set its MTU and address."""
    with IPRoute() as ip:
        if not ip.link_lookup(ifname=name):
            create_persistent(name)
        idx = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=idx, mtu=mtu)
        have = {a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)}
        if address not in have:
            ip.addr("add", index=idx, address=address, prefixlen=30)
        # No IPv6 chatter (router solicitations, MLD) through the pad: namespace-local.
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        ip.link("set", index=idx, state="up")


class ControlChannel:
    """Keepalives on the control lane: sealed and checked exactly like data datagrams."""

    def __init__(self, cfg: TunnelConfig, enc: KeyRing, dec: KeyRing):
        self.cfg, self.enc, self.dec = cfg, enc, dec
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((cfg.local_ip, cfg.port_base))
        self.sock.setblocking(False)
        # A flood from the peer's address queues a turn's worth of datagrams (20 ms) that
        # only the MAC can refuse: room for them, so a keepalive among them is not tail
        # dropped (the default 208 KiB holds some 200). Memory is taken only when queued.
        for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if opt is not None:
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, opt, CONTROL_RCVBUF)
                    break
        self.buf = np.zeros(wire.MAX_DATAGRAM + 64, dtype=np.uint8)
        self.rbuf = np.zeros(wire.MAX_DATAGRAM + 64, dtype=np.uint8)
        self.rbuf_addr = self.rbuf.ctypes.data
        self.drops: dict[str, int] = {}
        self.release_seen = 0
        self.backlog = False  # the last receive left datagrams queued (its budget ran out)
        self.releases: deque[tuple[float, int]] = deque()

    def apply_releases(self, now: float) -> None:
        """Free (and wipe) DEC key a grace period after the peer released it.

        Every lane stores the release points the peer announces on it; the sender sends
        nothing below one any more, but datagrams it sent just before may still wait in
        another lane's socket queue, and freeing at once would drop them as old. Done here,
        off the workers' path: the wipe is the costliest part of releasing.
        """
        seen = self.dec.announced_release()
        if seen > self.release_seen:
            self.release_seen = seen
            self.releases.append((now, seen))
        upto = 0
        while self.releases and now - self.releases[0][0] >= RELEASE_GRACE_S:
            upto = self.releases.popleft()[1]
        if upto > self.dec.release_pos:
            self.dec.release_dec(upto)

    def send(self, payload: bytes) -> bool:
        """Seal and send; False when no key is there (then nothing is sent)."""
        n = len(payload)
        need = wire.pad_len(n)
        # Exactly the bytes needed, given back at once: a slowly used chunk on this lane
        # would hold the ring's release point back while the workers race ahead. Nothing
        # is claimed unless all of it is there (a part would only be handed back).
        pos, take = self.enc.claim_chunk(CONTROL_LANE, need, min_take=need)
        if not take:
            return False
        pad = self.enc.read(pos, need)
        try:
            if wire.wiped(pad):  # at its start or its end: never a pad,
                skipped = self.enc.retire_wiped(CONTROL_LANE)  # nor the zeros after it
                log.warning("link %s: wiped key at position %d for a keepalive; %d B of "
                            "wiped key ahead skipped", self.cfg.link.name, pos, skipped)
                return False
            self.buf[wire.HEADER_LEN:wire.HEADER_LEN + n] = np.frombuffer(payload, np.uint8)
            dlen = wire.seal(self.buf, n, pad, link=self.cfg.link.index,
                             direction=self.cfg.enc_dir, lane=CONTROL_LANE, pos=pos,
                             release=self.enc.release_pos, flags=wire.FLAG_CONTROL)
        finally:
            if pad.flags.owndata:  # a copy (the range wrapped): wiped on every path
                pad[:] = 0
        if self.enc.release_pos > pos:  # freed under us: the pad may be wiped
            self.enc.retire(CONTROL_LANE)
            return False
        self.enc.wipe_used(pos, need)
        self.enc.set_used(CONTROL_LANE, pos + need)
        self.enc.count_datagram(CONTROL_LANE)
        self.enc.retire(CONTROL_LANE)
        with contextlib.suppress(OSError):
            self.sock.sendto(memoryview(self.buf)[:dlen], (self.cfg.peer_ip, self.cfg.port_base))
        return True

    def receive(self, budget: float = CONTROL_BUDGET_S) -> list[bytes]:
        """Every authentic, fresh control payload waiting on the socket, read until it is
        empty or ``budget`` seconds are spent: a flood of forgeries (each checked by its
        MAC: nothing else can tell them) may take that share of the manager's loop, no
        more, and a keepalive queued among them is read within a turn or two, not lost
        to a full queue (reading 64 a turn, 20,000 a second took the link down)."""
        out: list[bytes] = []
        self.backlog = False
        view = memoryview(self.rbuf)
        try:  # the idle turn: one empty read, nothing else
            first: tuple[int, tuple] | None = self.sock.recvfrom_into(view)
        except BlockingIOError:
            return out
        except OSError:
            first = None
        dec, drops, rbuf = self.dec, self.drops, self.rbuf
        link, direction, peer = self.cfg.link.index, self.cfg.dec_dir, self.cfg.peer_ip
        # Read once a call: only this loop moves the control lane's floor, and a stale
        # write or release point is the stricter one (locate and the check after the MAC
        # see the current ones).
        lane_next = dec.lane_next(CONTROL_LANE)
        release, write, capacity = dec.release_pos, dec.write_pos, dec.capacity
        clock = time.perf_counter
        deadline = clock() + budget
        n_read = 0
        while True:
            if first is not None:
                (n, src), first = first, None
            else:
                n_read += 1
                if not n_read & 31 and clock() > deadline:
                    self.backlog = True
                    return out
                try:
                    n, src = self.sock.recvfrom_into(view)
                except BlockingIOError:
                    return out
                except OSError:
                    continue
            if src[0] != peer:
                drops["source"] = drops.get("source", 0) + 1
                continue
            try:
                hdr = wire.parse(rbuf, n, link=link, direction=direction)
                if not hdr.is_control:
                    raise wire.WireError("lane", "data datagram on the control port")
                if hdr.length > MAX_CONTROL_PAYLOAD:
                    raise wire.WireError("length", "control payload too long")
                v = wire.acceptance(hdr, lane_next=lane_next, release_pos=release,
                                    write_pos=write, capacity=capacity)
                if v == wire.WAIT:
                    v = "nokey"  # a keepalive is not worth waiting for; the next one comes
                if v != wire.ACCEPT:
                    raise wire.WireError(v)
                pad, pad_addr = dec.locate(hdr.pos, hdr.pad_len)
                try:
                    payload = wire.open_(rbuf, hdr, pad, addrs=(self.rbuf_addr, pad_addr))
                finally:
                    if pad.flags.owndata:  # a copy (the range wrapped): wiped on every path
                        pad[:] = 0
                lane_next = hdr.pos + hdr.pad_len
                dec.set_lane_next(CONTROL_LANE, lane_next)
                dec.count_accepted(CONTROL_LANE, hdr.pad_len)
                if dec.release_pos > hdr.pos:
                    raise wire.WireError("old")
                out.append(payload.tobytes())
                dec.announce_release(CONTROL_LANE, hdr.release)
            except wire.WireError as e:
                drops[e.reason] = drops.get(e.reason, 0) + 1
            except RingError:
                drops["old"] = drops.get("old", 0) + 1


@dataclass
class WorkerSlot:
    lane: int
    proc: mp.Process | None = None
    restarts: int = 0
    next_start: float = 0.0
    last_exit: int | None = None


class TunnelManager:
    def __init__(self, cfg: TunnelConfig):
        self.cfg = cfg
        self.stop = False
        self.ctx = mp.get_context("fork")
        self.slots = [WorkerSlot(i) for i in range(cfg.dp.workers)]
        self.last_heard = 0.0
        period = cfg.link.sizes.keepalive_s
        floor, cap = cfg.link.sizes.peer_dead_s
        # The verdict on the peer, from its keepalives (both ends keep one period).
        self.liveness = PeerLiveness(period=period, floor=floor, cap=cap)
        self.last_sent = 0.0  # when a keepalive last found key and went out
        self.last_key = 0.0  # when key last arrived, or more than the reserve was there
        self._write_seen = -1
        self.peer_workers = 0
        self.started = time.time()
        self.state_said: bool | None = None  # the link state last logged (up or down)
        self.ident = process_identity(os.getpid())  # the router tells a stalled manager
        self.guard: Guard | None = None
        self.guard_off = cfg.guard_off
        self._floors_seen = (-1, -1, -1)
        self._lsdb_sent: list = []
        self._lsdb_sent_at = -LSDB_REFRESH_S
        self._data_seen = -1  # the DEC data lanes' accepted datagrams, as last looked at

    # ---- setup -------------------------------------------------------------------------

    def _attach_rings(self) -> tuple[KeyRing, KeyRing]:
        """Wait for the local key manager to create the rings."""
        while not self.stop:
            try:
                return (KeyRing.attach(self.cfg.enc_ring, CursorFile(self.cfg.cursor_path)),
                        KeyRing.attach(self.cfg.dec_ring))
            except RingError:
                time.sleep(0.1)
        raise SystemExit(0)

    def _reap_leftovers(self, stats: LinkStats) -> None:
        """Workers of a previous manager must be gone before their chunks are reset."""
        for lane in range(MAX_LANES):
            ident = stats.link_word(W_PID_BASE + lane)
            if ident and same_process_alive(ident):
                pid = ident & 0xFFFFFF
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5.0
                while same_process_alive(ident):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"worker {pid} of a previous tunnel manager does "
                                         f"not die; not touching its key")
                    time.sleep(0.01)
            stats.set_link_word(W_PID_BASE + lane, 0)

    # ---- XDP guard ---------------------------------------------------------------------

    def _start_guard(self) -> None:
        """Attach the guard before any worker starts (they inherit its floor map). Off when
        the node found BPF unusable (it said so once) or this link's attach fails (said
        here, once); with ``guard = "require"`` the tunnel does not start without it."""
        cfg = self.cfg
        if self.guard_off is None:
            try:
                ifindex, ifname = route_ifindex(cfg.peer_ip)
                self.guard = Guard(cfg.guard_spec(), ifindex, ifname)
                log.info("link %s: XDP guard on %s (%s mode)", cfg.link.name, ifname,
                         self.guard.mode)
            except GuardError as e:
                self.guard_off = str(e)
                log.warning("link %s: running WITHOUT the XDP guard: %s; the workers' own "
                            "checks still drop bad datagrams", cfg.link.name, e)
        if self.guard is None and cfg.dp.guard == "require":
            raise SystemExit(f"link {cfg.link.name}: the XDP guard is required "
                             f"([dataplane] guard = \"require\") but off: {self.guard_off}")

    def _publish_floors(self, dec: KeyRing) -> None:
        """The control lane's and the release floors, and how far key is stored (the
        workers keep their lanes' floors)."""
        seen = (dec.lane_next(CONTROL_LANE), dec.release_pos, dec.write_pos)
        if self.guard is not None and seen != self._floors_seen:
            self.guard.floors.set(CONTROL_LANE, seen[0])
            self.guard.floors.set(RELEASE_SLOT, seen[1])
            self.guard.floors.set(STORED_SLOT, seen[2])
            self._floors_seen = seen

    def guard_status(self) -> dict:
        if self.guard is None:
            return {"state": "off", "reason": self.guard_off}
        return self.guard.status()

    # ---- workers -----------------------------------------------------------------------

    def _check_workers(self, enc: KeyRing, now: float) -> None:
        for s in self.slots:
            if s.proc is not None and not s.proc.is_alive():
                s.proc.join(0)
                s.last_exit = s.proc.exitcode
                s.proc = None
                s.restarts += 1
                s.next_start = now + RESTART_BACKOFF_S
                for lane in send_lanes(s.lane, len(self.slots)):  # what it held: wiped
                    enc.retire(lane, dead=True)  # whole, never used again
                log.warning("link %s: worker %d exited with %s; restarting",
                            self.cfg.link.name, s.lane, s.last_exit)
            if s.proc is None and now >= s.next_start and not self.stop:
                s.proc = self.ctx.Process(target=worker_main,
                                          args=(self.cfg.worker_config(s.lane, self.guard),),
                                          name=f"otp-{self.cfg.link.name}-{s.lane}")
                s.proc.start()

    def _stop_workers(self) -> None:
        procs = [s.proc for s in self.slots if s.proc is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + 2.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)

    # ---- keepalives --------------------------------------------------------------------

    def _read_lsdb(self) -> tuple[list, list]:
        """The node's link-state database as the router last wrote it, and its links'
        states and costs (what makes it news)."""
        try:
            lsdb = json.loads(self.cfg.lsdb_path.read_text()).get("entries", [])
        except (OSError, ValueError):
            lsdb = []
        states = sorted((str(e[0]), str(e[1]), bool(e[3]), e[4] if len(e) == 5 else 1)
                        for e in lsdb if isinstance(e, list) and len(e) in (4, 5))
        return lsdb, states

    def _lsdb_news(self) -> tuple[list, list] | None:
        """The database, read, if a link's state or cost changed since it last went out:
        on a slow link, whose keepalives are seconds apart, that goes now, not with the
        next one (routes, and the multipath relay's holds, expect it to spread within a
        second)."""
        lsdb, states = self._read_lsdb()
        return (lsdb, states) if states != self._lsdb_sent else None

    def _keepalive_payload(self, now: float, read: tuple[list, list] | None = None) -> bytes:
        """Our pool size, and the link-state database (``read``: as just read) when its
        links' states or costs changed or every LSDB_REFRESH_S (entries expire after the
        routers' max age): the keepalives' pads are most of what an idle link spends, so
        they carry no more than they must."""
        body: dict = {"node": self.cfg.node, "workers": self.cfg.dp.workers}
        lsdb, states = read or self._read_lsdb()
        if states != self._lsdb_sent or now - self._lsdb_sent_at >= LSDB_REFRESH_S:
            self._lsdb_sent, self._lsdb_sent_at = states, now
            body["lsdb"] = lsdb
        data = json.dumps(body, separators=(",", ":")).encode()
        if len(data) > MAX_CONTROL_PAYLOAD:  # a huge network: send our own state only
            body["lsdb"] = [e for e in lsdb if isinstance(e, list) and e[1:2] == [self.cfg.node]]
            data = json.dumps(body, separators=(",", ":")).encode()
        return data

    def _on_keepalive(self, payload: bytes, stats: LinkStats) -> None:
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict) or not isinstance(msg.get("workers"), int):
                raise ValueError("not a keepalive object")
            if msg.get("node") != self.cfg.peer:
                raise ValueError(f"keepalive from {msg.get('node')!r}")
            workers = int(msg["workers"])
            if not 1 <= workers <= CONTROL_LANE:
                raise ValueError(f"peer pool size {workers}")
            lsdb = msg.get("lsdb")
            if lsdb is not None and not isinstance(lsdb, list):
                raise ValueError("lsdb is not a list")
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
            log.warning("link %s: keepalive refused: %s", self.cfg.link.name, e)
            return
        self.last_heard = time.monotonic()
        self.liveness.heard(self.last_heard)
        self.peer_workers = workers
        stats.set_link_word(W_PEER_WORKERS, workers)
        if lsdb is not None:
            write_json(self.cfg.lsa_path, {"from": self.cfg.peer, "lsdb": lsdb})

    def _watch_data(self, dec: KeyRing, now: float) -> None:
        """Datagrams the workers accepted (MAC checked) since we last looked prove the
        peer alive, as keepalives do, which a flood of forgeries on the control port can
        crowd out. Looked at only once a keepalive is half a period late, so a link whose
        keepalives come costs nothing more; from then on data counts at the turn that
        sees it (what came before that first look is not counted)."""
        if now - self.last_heard <= 1.5 * self.liveness.period:
            self._data_seen = -1  # taken afresh when next needed
            return
        seen = dec.data_accepted()
        if self._data_seen >= 0 and seen != self._data_seen:
            self.liveness.traffic(now)
        self._data_seen = seen

    # ---- status ------------------------------------------------------------------------

    def _watch_key(self, enc: KeyRing, now: float) -> None:
        w = enc.write_pos
        # "Key there" = room for one more full-size packet beyond the control reserve.
        room = self.cfg.link.sizes.reserve_bulk + wire.pad_len(self.cfg.dp.mtu)
        if w != self._write_seen or w - enc.claim_pos >= room:
            self.last_key = now
        self._write_seen = w

    def link_state(self, now: float) -> tuple[bool, str]:
        # No key: none arrived and no full packet fits beyond the control reserve
        # for key_dead_s (a few blocks' time at the link's rate), or not even a keepalive
        # could go for as long as a silent peer is given.
        if now - self.last_key > self.cfg.link.sizes.key_dead_s \
                or now - self.last_sent > self.liveness.floor:
            return False, "no key"
        if self.liveness.alive(now):
            return True, "up"
        return False, "peer silent" if self.liveness.downs else "waiting for peer"

    def _publish(self, stats: LinkStats, chan: ControlChannel, enc: KeyRing, dec: KeyRing,
                 now: float) -> None:
        up, reason = self.link_state(now)
        stats.set_link_word(W_LINK_UP, int(up))
        self._say_state(up, reason, enc, now)
        ec, dc = enc.cursors(), dec.cursors()
        write_json(self.cfg.status_path, {
            "link": self.cfg.link.name, "node": self.cfg.node, "peer": self.cfg.peer,
            "pid": os.getpid(), "ident": self.ident, "updated": time.time(), "up": up,
            "reason": reason,
            "tun": self.cfg.tun, "mtu": self.cfg.dp.mtu, "mode": self.cfg.dp.mode,
            "workers": [{"lane": s.lane, "pid": s.proc.pid if s.proc else None,
                         "alive": bool(s.proc and s.proc.is_alive()),
                         "restarts": s.restarts} for s in self.slots],
            "peer_workers": self.peer_workers,
            "heard_ago_s": round(now - self.last_heard, 3) if self.last_heard else None,
            "keepalive_s": round(self.liveness.period, 3),
            "liveness": dataclasses.asdict(self.liveness.stats()),
            "enc_available": ec.write_pos - ec.claim_pos, "dec_fill": dc.fill,
            "enc_stored": enc.accounting().stored, "enc_capacity": ec.capacity,
            "enc_room_used": ec.write_pos - enc.free_pos,
            "counters": stats.totals(), "control_drops": chan.drops,
            "guard": self.guard_status(),
        })

    def _say_state(self, up: bool, reason: str, enc: KeyRing, now: float) -> None:
        """Log each change of the link's state, with what led to it: the operator's
        record of when and why the routers lost or regained the link. Not the "down"
        before it first comes up, nor a change of only the reason it is down."""
        if up == self.state_said or (self.state_said is None and not up):
            return
        self.state_said = up
        if up:
            log.info("link %s: up", self.cfg.link.name)
            return
        c = enc.cursors()
        log.warning("link %s: down (%s): key last seen %.1f s ago, keepalive last sent %s, "
                    "peer heard %s; ENC ring write %d claim %d release %d free %d",
                    self.cfg.link.name, reason, now - self.last_key,
                    f"{now - self.last_sent:.1f} s ago" if self.last_sent else "never",
                    f"{now - self.last_heard:.1f} s ago" if self.last_heard else "never",
                    c.write_pos, c.claim_pos, c.release_pos, enc.free_pos)

    # ---- main loop ---------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        setup_tun(cfg.tun, cfg.dp.mtu, cfg.tun_addr)
        stats = LinkStats(cfg.stats_name, create=True)
        self._reap_leftovers(stats)
        enc, dec = self._attach_rings()
        enc.reset_lanes()  # no worker of ours runs: chunks they held are never used
        self._start_guard()
        chan = ControlChannel(cfg, enc, dec)
        log.info("link %s: tunnel %s up, mtu %d, %d worker(s), mode %s", cfg.link.name,
                 cfg.tun, cfg.dp.mtu, cfg.dp.workers, cfg.dp.mode)
        next_ka = next_status = next_news = 0.0
        slow = self.liveness.period > KEEPALIVE_S  # keepalives seconds apart: news goes now
        try:
            while not self.stop:
                now = time.monotonic()
                stalled = self.liveness.tick(now)
                if stalled:  # we were not running: nobody's silence, nor our own sends
                    self.last_sent += stalled if self.last_sent else 0.0
                    self.last_key += stalled if self.last_key else 0.0
                self._check_workers(enc, now)
                for payload in chan.receive():
                    self._on_keepalive(payload, stats)
                self._watch_data(dec, now)
                chan.apply_releases(now)
                self._publish_floors(dec)
                news = None
                if slow and now >= next_news and now < next_ka:  # (a flapping link's
                    news = self._lsdb_news()  # news: one extra keepalive a second at most)
                    next_news = now + (LSDB_REFRESH_S if news else KEEPALIVE_S)
                if now >= next_ka or news:
                    if chan.send(self._keepalive_payload(now, news)):
                        self.last_sent = now
                    next_ka = now + self.liveness.period
                self._watch_key(enc, now)
                if now >= next_status:
                    self._publish(stats, chan, enc, dec, now)
                    next_status = now + STATUS_INTERVAL_S
                time.sleep(CONTROL_BUDGET_S if chan.backlog else LOOP_S)
        finally:
            self._stop_workers()
            with contextlib.suppress(Exception):
                for slot in self.slots:  # all joined: wipe whatever they still held
                    for lane in send_lanes(slot.lane, len(self.slots)):
                        enc.retire(lane, dead=True)
                enc.retire(CONTROL_LANE)
            if self.guard is not None:  # detached now, not when the last descriptor goes
                self.guard.close()
                self.guard = None
                self.guard_off = "stopped"
            with contextlib.suppress(Exception):
                self._publish(stats, chan, enc, dec, time.monotonic())



def tunnel_main(config_path: str, node: str, link: str, state_dir: str | None,
                guard_off: str | None = None) -> None:
    """Entry point of the tunnel manager process (forked by the node supervisor)."""

    die_with_parent()
    setup_logging()
    topo = load_topology(config_path)
    cfg = TunnelConfig.from_topology(topo, node, topo.link(link),
                                     Path(state_dir) if state_dir else None, guard_off)
    mgr = TunnelManager(cfg)
    run_until_stopped(mgr)

