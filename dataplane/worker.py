"""One OTP worker: a process holding one TUN queue and one UDP socket of a link end.

Egress: packet from its TUN queue -> next bytes of the chunk of ENC key it holds -> XOR and
one-time MAC (:mod:`dataplane.wire`) -> UDP to the peer's worker of the same lane.
Ingress: datagram -> framing checks -> lane/replay/age checks -> MAC verify -> XOR with the
DEC bytes the datagram names -> TUN. A datagram naming key not stored here yet is parked
(dataplane.parking) and looked at again each loop, never waited for: no datagram anyone
can send from the peer's address stalls the worker. Nothing unauthenticated or replayed
reaches the TUN, and nothing leaves without fresh key: with no key, a packet waits a
bounded time and is dropped (counted), never sent in clear.

Lanes are the replay unit on the wire: within one, positions only grow. Worker *i* of a
pool of *W* owns lanes i, i+W, i+2W, ... (at most MAX_SUBLANES): it sends on them, each
holding at most one range of ENC key (ring lane words), and it alone accepts datagrams of
those lanes, so per-lane replay floors need no lock. A packet uses the lowest held range
it fits (dataplane.claims); one that fits none claims a new range on another lane, so the
rest of a range too small for a large packet stays for smaller ones instead of being
wiped. Claims are sized to the worker's recent traffic; control traffic
(dataplane.classify) may use the ring's control reserve, bulk may not. An idle worker
hands back what it holds when that is the last claim, or keeps it unless it holds the
ring's release point back too far (dataplane.ring.give_back_idle). Counters are kept
locally and copied to the link's shared stats row a few times a second; the ring counts
datagrams and key per lane itself (the accounting of invariant 8).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from control.core.lifecycle import die_with_parent, run_until_stopped
from control.core.procs import process_identity
from dataplane import wire
from dataplane.bpf.syscall import ArrayMap
from dataplane.claims import ClaimSizer, lane_to_claim, pick_range
from dataplane.classify import is_control
from dataplane.limits import IDLE_RETIRE_S, MAX_KEY_LAG, MAX_SUBLANES
from dataplane.parking import PARK_SLOTS, ParkingLot, ParkPacer
from dataplane.ring import CONTROL_LANE, CursorFile, KeyRing, RingError
from dataplane.stats import IDX, W_PEER_WORKERS, W_PID_BASE, LinkStats, new_counters
from dataplane.tun import open_queue, vnet_header_ok

log = logging.getLogger("qkdnet.worker")
SOCK_BUF = 8 << 20
BATCH = 64  # packets handled per readiness event before polling again
PARK_POLL_MS = 5  # while datagrams wait for key: how often an idle worker looks again
FLUSH_S = 0.1
AUDIT = struct.Struct("<BQQ")
AUDIT_CLAIM, AUDIT_SENT, AUDIT_ACCEPTED = 1, 2, 3
CLAIMS = IDX["claims"]
DROP_RX_LANE = IDX["drop_rx_lane"]
DROP_RX_NOKEY = IDX["drop_rx_nokey"]
DROP_RX_OLD = IDX["drop_rx_old"]
DROP_RX_TUN = IDX["drop_rx_tun"]
DROP_RX_SOURCE = IDX["drop_rx_source"]
DROP_RX_VNET = IDX["drop_rx_vnet"]
DROP_TX_NOKEY = IDX["drop_tx_nokey"]
DROP_TX_SEND = IDX["drop_tx_send"]
RX_BYTES = IDX["rx_bytes"]
RX_KEY = IDX["rx_key"]
RX_PKTS = IDX["rx_pkts"]
T_RX_CRYPTO = IDX["t_rx_crypto"]
T_RX_KEY = IDX["t_rx_key"]
T_RX_RECV = IDX["t_rx_recv"]
T_RX_WRITE = IDX["t_rx_write"]
T_TX_CRYPTO = IDX["t_tx_crypto"]
T_TX_KEY = IDX["t_tx_key"]
T_TX_READ = IDX["t_tx_read"]
T_TX_SEND = IDX["t_tx_send"]
TX_BYTES = IDX["tx_bytes"]
TX_KEY = IDX["tx_key"]
TX_PKTS = IDX["tx_pkts"]


@dataclass(frozen=True)
class WorkerConfig:
    link_index: int
    link_name: str
    lane: int
    workers: int
    tun_name: str
    local_ip: str
    peer_ip: str
    port_base: int  # control socket; lane i listens on port_base + 1 + i
    enc_ring: str
    dec_ring: str
    enc_dir: int
    dec_dir: int
    cursor_path: Path
    stats_name: str
    mtu: int
    chunk: int
    conventional: bool
    key_wait_s: float
    reserve_bulk: int  # ENC key bulk packets leave for control traffic and keepalives
    reserve_control: int  # ... and control packets leave for the keepalives
    pin_limit: int  # see dataplane.ring.KeyRing.give_back_idle
    audit_dir: Path | None = None
    floors_fd: int = -1  # the XDP guard's floor map (-1: no guard); see flush()
    close_fds: tuple[int, ...] = ()  # the guard's other descriptors: not the worker's


    def lane_port(self, lane: int) -> int:
        return self.port_base + 1 + lane

    def send_lanes(self) -> list[int]:
        return send_lanes(self.lane, self.workers)


def send_lanes(worker: int, workers: int) -> list[int]:
    """The lanes worker ``worker`` of ``workers`` sends on (the peer's worker that takes
    lane L is L modulo the peer's pool size)."""
    return list(range(worker, CONTROL_LANE, workers))[:MAX_SUBLANES]


class Audit:
    """Test-only record of every claim, send and accept (QKDNET_AUDIT_DIR): one unbuffered
    write per event, so that a kill -9 loses nothing that went out."""

    def __init__(self, d: Path | None, tag: str):
        self.fd = None
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(d / f"{tag}-{os.getpid()}.audit",
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def __call__(self, kind: int, pos: int, n: int) -> None:
        if self.fd is not None:
            os.write(self.fd, AUDIT.pack(kind, pos, n))


def read_audit(path: Path) -> list[tuple[int, int, int]]:
    data = path.read_bytes()
    return [AUDIT.unpack_from(data, i) for i in range(0, len(data) - len(data) % AUDIT.size,
                                                       AUDIT.size)]


class Worker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.stop = False
        self.enc = KeyRing.attach(cfg.enc_ring, CursorFile(cfg.cursor_path))
        self.dec = KeyRing.attach(cfg.dec_ring)
        self.stats = LinkStats(cfg.stats_name)
        self.c = new_counters()
        self.tun = open_queue(cfg.tun_name)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)  # *BUFFORCE (root)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        self.sock.bind((cfg.local_ip, cfg.lane_port(cfg.lane)))
        self.peer_workers = cfg.workers
        self.tbuf = np.zeros(wire.MAX_DATAGRAM + 64, dtype=np.uint8)
        self.tmv = memoryview(self.tbuf)
        self.rbuf = np.zeros(wire.MAX_DATAGRAM + 64, dtype=np.uint8)
        self.rmv = memoryview(self.rbuf)
        self.lot = ParkingLot(PARK_SLOTS)
        self.park_pacer = ParkPacer()
        self.park_buf = np.zeros((PARK_SLOTS, wire.MAX_DATAGRAM + 64), dtype=np.uint8)
        self.park_due = float("inf")  # ... and the earliest of their deadlines
        self.park_min_end = float("inf")  # ... and the lowest end of the key they name
        self.tbuf_addr = self.tbuf.ctypes.data
        self.rbuf_addr = self.rbuf.ctypes.data
        self.lanes = cfg.send_lanes()
        self.held: dict[int, list[int]] = {}  # lane -> [next unused byte, end] of its range
        self.sizer = ClaimSizer(cfg.chunk)
        self.dry = False  # the last wait for key timed out
        self.errors = 0
        self.last_tx = time.monotonic()
        self.wiped_said = float("-inf")
        self.release_step = 0 if cfg.conventional else max(cfg.chunk // 2, 4096)
        self.release_seen = 0
        self.audit = Audit(cfg.audit_dir, f"{cfg.link_name}-{cfg.enc_ring[-2:]}-{cfg.lane}")
        self.floors = ArrayMap(cfg.floors_fd, CONTROL_LANE + 1, owned=False) \
            if cfg.floors_fd >= 0 else None
        self.own_lanes = range(cfg.lane, CONTROL_LANE, cfg.workers)  # the peer's lanes it takes
        self.floor_seen = dict.fromkeys(self.own_lanes, -1)

    # ---- egress ------------------------------------------------------------------------

    def _claim(self, need: int, control: bool) -> int | None:
        """Claim a range holding at least ``need`` bytes; its lane, or None after waiting
        at most key_wait_s.

        Once a wait has timed out the link is dry: later packets are dropped at once
        (no wait each, which would stall this worker's ingress too) until key is back.
        """
        cfg, enc = self.cfg, self.enc
        now = time.monotonic()
        deadline = now + (0.0 if self.dry else cfg.key_wait_s)
        # The last reserve bytes are for control traffic and keepalives (enforced under
        # the ring lock): a busy link that runs dry must still carry what keeps it alive.
        reserve = cfg.reserve_control if control else cfg.reserve_bulk
        races = 0
        while True:
            if enc.write_pos - enc.claim_pos >= need + reserve:
                size = need if cfg.conventional or control else self.sizer.size(need, now)
                lane, top = lane_to_claim(self.held, self.lanes, enc.claim_pos,
                                          self.sizer.smallest)
                pos, take = enc.claim_chunk(lane, size, reserve=reserve, min_take=need,
                                            if_top=top)
                self.c[CLAIMS] += 1
                if pos < 0 and races < 4:  # another worker claimed past our range first:
                    races += 1  # at once again, on another lane
                    continue
                if pos >= 0:
                    self.held.pop(lane, None)  # given up by the claim in any case
                    if take:
                        self.audit(AUDIT_CLAIM, pos, take)
                        self.held[lane] = [pos, pos + take]
                        self.dry = False
                        self._unpin(lane)
                        return lane
            if now >= deadline or self.stop:
                self.dry = True
                return None
            time.sleep(0.0005)
            now = time.monotonic()

    def _unpin(self, busy: int) -> None:
        """A range this worker keeps for small packets must not hold the ring's release
        point back without end while its other lane streams: offer it back once others
        have used more than pin_limit past it."""
        limit = self.enc.claim_pos - self.cfg.pin_limit
        for lane in [x for x, (cur, _) in self.held.items() if x != busy and cur < limit]:
            if self.enc.give_back_idle(lane, self.cfg.pin_limit):
                del self.held[lane]

    def _wiped(self, lane: int, pos: int) -> None:
        """The range of ``lane`` met wiped key at ``pos``: given up as dead, and the run of
        zeros ahead of the claims skipped (dataplane.ring.retire_wiped)."""
        skipped = self.enc.retire_wiped(lane)
        del self.held[lane]
        now = time.monotonic()
        if now >= self.wiped_said + 1.0:  # a bug's trace, at most once a second
            self.wiped_said = now
            log.warning("link %s lane %d: wiped key at position %d; range given up, "
                        "%d B of wiped key ahead skipped", self.cfg.link_name, lane, pos,
                        skipped)

    def egress(self) -> None:
        cfg, c, enc, tbuf, held = self.cfg, self.c, self.enc, self.tbuf, self.held
        clock = time.perf_counter_ns
        body = self.tmv[wire.HEADER_LEN:wire.HEADER_LEN + wire.MAX_PAYLOAD]  # MTU may change
        peers = max(1, self.peer_workers)
        for _ in range(BATCH):
            t0 = clock()
            try:
                n = os.readv(self.tun, [body])
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("link %s lane %d: TUN read failed: %s", cfg.link_name, cfg.lane, e)
                return
            t1 = clock()
            need = wire.pad_len(n)
            lane = pick_range(held, need)
            if lane is None:
                lane = self._claim(need, is_control(body, n))
                if lane is None:
                    c[DROP_TX_NOKEY] += 1
                    continue
            rng = held[lane]
            pos = rng[0]
            try:
                pad, pad_addr = enc.locate(pos, need)
            except RingError:  # our range was given up under us: take a new one next time
                c[DROP_TX_NOKEY] += 1
                del held[lane]
                continue
            try:
                if wire.wiped(pad):  # at its start or its end: never a pad
                    c[DROP_TX_NOKEY] += 1
                    self._wiped(lane, pos)
                    continue
                t2 = clock()
                dlen = wire.seal(tbuf, n, pad, link=cfg.link_index, direction=cfg.enc_dir,
                                 lane=lane, pos=pos, release=enc.release_pos,
                                 addrs=(self.tbuf_addr, pad_addr))
                if enc.release_pos > pos:  # freed under us (a reset): the pad may be wiped
                    c[DROP_TX_NOKEY] += 1
                    del held[lane]
                    continue
                enc.wipe_used(pos, need)  # in cache now; cheaper than at release
            finally:
                if pad.flags.owndata:  # a copy (the range wrapped): wiped on every path
                    pad[:] = 0
            rng[0] = pos + need
            enc.set_used(lane, rng[0])  # (after the check: this lets release pass pos)
            enc.count_datagram(lane)
            self.sizer.used(need)
            if cfg.conventional:  # the paper's per-packet key removal
                enc.retire(lane)
                del held[lane]
            t3 = clock()
            if self.audit.fd is not None:
                self.audit(AUDIT_SENT, pos, need)
            try:
                self.sock.sendto(self.tmv[:dlen], (cfg.peer_ip, cfg.lane_port(lane % peers)))
            except OSError:
                c[DROP_TX_SEND] += 1
                continue
            t4 = clock()
            self.last_tx = time.monotonic()
            c[TX_PKTS] += 1
            c[TX_BYTES] += n
            c[TX_KEY] += need
            c[T_TX_READ] += t1 - t0
            c[T_TX_KEY] += t2 - t1
            c[T_TX_CRYPTO] += t3 - t2
            c[T_TX_SEND] += t4 - t3

    # ---- ingress -----------------------------------------------------------------------

    def _verdict(self, hdr: wire.Header) -> str:
        dec = self.dec
        v = wire.acceptance(hdr, lane_next=dec.lane_next(hdr.lane),
                            release_pos=dec.release_pos, write_pos=dec.write_pos,
                            capacity=dec.capacity)
        if v == wire.WAIT and hdr.pos + hdr.pad_len > dec.write_pos + MAX_KEY_LAG:
            return "ahead"  # far beyond what the agreement could still be delivering
        return v

    def ingress(self) -> None:
        cfg, c, rbuf = self.cfg, self.c, self.rbuf
        clock = time.perf_counter_ns
        if self.lot:  # key may have come for what waits: it goes before what follows
            self.unpark(time.monotonic())
        for _ in range(BATCH):
            t0 = clock()
            try:
                n, src = self.sock.recvfrom_into(self.rmv, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                continue
            t1 = clock()
            if src[0] != cfg.peer_ip:
                c[DROP_RX_SOURCE] += 1
                continue
            try:
                hdr = wire.parse(rbuf, n, link=cfg.link_index, direction=cfg.dec_dir)
            except wire.WireError as e:
                c[IDX[f"drop_rx_{e.reason}"]] += 1
                continue
            if hdr.is_control or hdr.lane % cfg.workers != cfg.lane:
                c[DROP_RX_LANE] += 1
                continue
            v = self._verdict(hdr)
            if v == wire.WAIT:
                self._park(hdr, n)
                continue
            if v != wire.ACCEPT:
                c[IDX[f"drop_rx_{v}"]] += 1
                continue
            if self.lot:  # earlier datagrams of its lane whose key came with its own first
                self._unpark(self.lot.before(hdr.lane, hdr.pos), time.monotonic())
            self._deliver(rbuf, self.rbuf_addr, hdr, t0, t1)

    def _park(self, hdr: wire.Header, n: int) -> None:
        """Keep a datagram whose key is not here yet; the loop looks at it again. At most
        PARK_PPS a second: a flood of them costs the worker a bounded share of its time."""
        now = time.monotonic()
        if not self.park_pacer.allow(now):
            self.c[DROP_RX_NOKEY] += 1
            return
        p, out = self.lot.park(hdr, n, now + self.cfg.key_wait_s)
        if out is not None:
            self.c[DROP_RX_NOKEY] += 1
        if p is None:
            self.c[DROP_RX_NOKEY] += 1
            return
        self.park_buf[p.slot, :n] = self.rbuf[:n]
        self.park_due = min(self.park_due, p.deadline)
        self.park_min_end = min(self.park_min_end, hdr.pos + hdr.pad_len)

    def unpark(self, now: float) -> None:
        """Deliver parked datagrams whose key has come and drop those whose wait is over;
        nothing to do (and nothing done) while no wait ran out and the key that came
        completes none of them: under a flood naming key far ahead, key arrives all the
        time, and looking at every parked datagram each time cost the workers dearly."""
        w = self.dec.write_pos
        # (after a look, every datagram left ends beyond the write position it saw)
        if now < self.park_due and w < self.park_min_end:
            return
        self._unpark(self.lot.in_order(), now)
        self.park_due = self.lot.earliest_deadline()
        self.park_min_end = min((p.hdr.pos + p.hdr.pad_len for p in self.lot.parked),
                                default=float("inf"))

    def _unpark(self, parked: list, now: float) -> None:
        clock = time.perf_counter_ns
        for p in parked:
            v = self._verdict(p.hdr)
            if v == wire.WAIT and now < p.deadline:
                continue
            self.lot.leave(p)
            if v == wire.ACCEPT:
                t = clock()
                buf = self.park_buf[p.slot]
                self._deliver(buf, buf.ctypes.data, p.hdr, t, t)
            else:
                self.c[DROP_RX_NOKEY if v == wire.WAIT else IDX[f"drop_rx_{v}"]] += 1

    def _deliver(self, buf: np.ndarray, buf_addr: int, hdr: wire.Header, t0: int,
                 t1: int) -> None:
        """MAC verify, decrypt and write to the TUN one datagram whose key is here."""
        cfg, c, dec = self.cfg, self.c, self.dec
        clock = time.perf_counter_ns
        try:
            pad, pad_addr = dec.locate(hdr.pos, hdr.pad_len)
        except RingError:
            c[DROP_RX_OLD] += 1
            return
        t2 = clock()
        try:
            payload = wire.open_(buf, hdr, pad, addrs=(buf_addr, pad_addr))
        except wire.WireError as e:
            c[IDX[f"drop_rx_{e.reason}"]] += 1
            return
        finally:
            if pad.flags.owndata:  # a copy (the range wrapped): wiped on every path
                pad[:] = 0
        end = hdr.pos + hdr.pad_len
        dec.set_lane_next(hdr.lane, end)  # before delivery: one delivery per key
        dec.count_accepted(hdr.lane, hdr.pad_len)
        if not vnet_header_ok(payload):
            c[DROP_RX_VNET] += 1
            return
        if dec.release_pos > hdr.pos:  # wiped while we used it
            c[DROP_RX_OLD] += 1
            return
        if self.audit.fd is not None:
            self.audit(AUDIT_ACCEPTED, hdr.pos, hdr.pad_len)
        t3 = clock()
        try:
            os.write(self.tun, payload)
        except OSError:
            c[DROP_RX_TUN] += 1
            return
        t4 = clock()
        if hdr.release > self.release_seen + self.release_step:
            self.release_seen = hdr.release
            dec.announce_release(cfg.lane, hdr.release)  # the manager frees it
        c[RX_PKTS] += 1
        c[RX_BYTES] += hdr.length
        c[RX_KEY] += hdr.pad_len
        c[T_RX_RECV] += t1 - t0
        c[T_RX_KEY] += t2 - t1
        c[T_RX_CRYPTO] += t3 - t2
        c[T_RX_WRITE] += t4 - t3

    # ---- loop --------------------------------------------------------------------------

    def flush(self) -> None:
        self.stats.publish(self.cfg.lane, self.c)
        self.peer_workers = self.stats.link_word(W_PEER_WORKERS) or self.cfg.workers
        if self.floors is not None:
            self.publish_floors()

    def publish_floors(self) -> None:
        """Tell the XDP guard the lowest position each of our lanes still accepts: it drops
        replays and stale datagrams before they cost a wake-up (we would refuse them)."""
        for lane in self.own_lanes:
            v = self.dec.lane_next(lane)
            if v != self.floor_seen[lane]:
                try:
                    self.floors.set(lane, v)
                except OSError:
                    return  # the guard is gone (its manager is stopping): nothing to keep
                self.floor_seen[lane] = v

    def run(self) -> None:
        cfg = self.cfg
        self.stats.set_link_word(W_PID_BASE + cfg.lane, process_identity(os.getpid()))
        poller = select.poll()
        poller.register(self.tun, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        sock_fd = self.sock.fileno()
        next_flush = next_idle = 0.0
        try:
            while not self.stop:
                # While datagrams wait for key and nothing arrives, look again every
                # PARK_POLL_MS (with traffic, every ingress batch looks first).
                events = poller.poll(PARK_POLL_MS if self.lot else IDLE_RETIRE_S * 1000)
                for fd, _ in events:
                    try:
                        if fd == self.tun:
                            self.egress()
                        elif fd == sock_fd:
                            self.ingress()
                    except (RingError, ValueError, IndexError, OverflowError) as e:
                        # A bug hit by one packet must not become a crash loop of the
                        # lane: that packet is lost, the worker goes on.
                        self.errors += 1
                        if self.errors <= 10:
                            log.exception("link %s lane %d: packet lost: %s", cfg.link_name,
                                          cfg.lane, e)
                now = time.monotonic()
                if self.lot:
                    self.unpark(now)
                if self.held and now - self.last_tx > IDLE_RETIRE_S and now >= next_idle:
                    next_idle = now + IDLE_RETIRE_S  # (the loop may turn far more often)
                    for lane in list(self.held):  # idle: the last claim goes back at once
                        if self.enc.give_back_idle(lane, cfg.pin_limit):
                            del self.held[lane]
                if now >= next_flush:
                    self.flush()
                    next_flush = now + FLUSH_S
        finally:
            with contextlib.suppress(Exception):
                for lane in list(self.held):
                    self.enc.retire(lane)
            self.flush()


def worker_main(cfg: WorkerConfig) -> None:
    """Entry point of a worker process (forked by the tunnel manager)."""

    die_with_parent()
    for fd in cfg.close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    w = Worker(cfg)
    gc.freeze()  # the packet loop makes no reference cycles: no collector pauses in it
    gc.disable()
    run_until_stopped(w)
