"""Local key manager for one link end: a thin I/O shell around :mod:`control.lkm.agreement`.

One process per link end. It reads blocks from the key source, talks to the peer's key
manager over the underlay (TCP, frames authenticated by :class:`FrameCodec`), carries out
the agreement's actions on the two shared-memory rings, and publishes its state as a JSON
file that `qkdctl status` and the supervisor read.

Locking: this process is the only writer of both rings' write cursors; OTP workers only
claim and release (see :mod:`dataplane.ring`), so the rings need no lock here.

The leader listens; a new connection from the follower's address is only a candidate
(:class:`Candidate`, served without blocking) until it delivers a frame authenticated for
its own fresh nonces. Only then does it replace the live session: a connection anyone can
open from a spoofed or shared address never costs a resync, and so never skipped key.

A source whose two ends must talk (the ETSI 014 source: the leader's device names the
keys, the follower's fetches them) has the optional hooks of :class:`NotingSource`; the
shell carries its notes over the agreement channel, which authenticates them, and keeps
them away from the agreement state machines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import selectors
import signal
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from control.core import paths
from control.core.config import LinkSpec, Topology
from control.core.counter_rate import CounterRate
from control.core.statefile import write_json
from control.lkm.agreement import AB, BA, Dropped, Follower, Leader, Send, SkipTo, Store
from control.lkm.messages import (
    AUTH_KEY_LEN,
    NONCE_LEN,
    FrameCodec,
    KeyIds,
    Message,
    ProtocolError,
)
from control.lkm.source import KeySource, SourceUnavailable, make_source
from dataplane.limits import PENDING_BLOCK_TIMEOUT_S
from dataplane.private import NotPrivateError, secret_file
from dataplane.ring import ROLE_DEC, ROLE_ENC, CursorFile, KeyRing, RingError

log = logging.getLogger("qkdnet.lkm")
DIRS = {AB: "ab", BA: "ba"}
STATUS_INTERVAL_S = 0.5
RECONNECT_S = 1.0
CANDIDATE_TIMEOUT_S = 5.0  # a new connection must authenticate within this
# A live session proves itself: each end sends a frame at least every HEARTBEAT_S, and one
# that has heard nothing authentic for PEER_SILENT_S drops the session and starts anew. A
# TCP stream an underlay attacker has desynchronised (a few forged bytes in it) stays
# open, and without this the key stopped flowing for as long as TCP took to give up.
HEARTBEAT_S = 1.0
PEER_SILENT_S = 10.0
DIAL_TIMEOUT_S = 4.0  # the follower's connection: up and the leader's nonce read (SYNs
                      # are sent again after 1 and 3 s)
MAX_CANDIDATES = 16        # new connections authenticating at once; the oldest goes first
ACCEPT_BATCH = 64          # connections accepted per loop, so a flood cannot starve it


def load_link_key(path: Path) -> bytes:
    """The link's pre-shared authentication key: what keeps an attacker on the underlay
    from posing as the peer's agreement end (and so from making both ends file one block
    under different directions). Read, like every secret of the node, only from a regular
    file of this user's alone, never through a symbolic link (``secret_file``)."""
    what = "link authentication key"
    try:
        with secret_file(path, what) as checked:
            key = Path(checked).read_bytes()
    except FileNotFoundError:
        raise SystemExit(f"{what} {path} is missing "
                         f"(qkdctl net up creates it in emulation)") from None
    except NotPrivateError as e:
        raise SystemExit(str(e)) from None
    except OSError as e:
        raise SystemExit(f"cannot read {what} {path}: {e.strerror}") from None
    if len(key) != AUTH_KEY_LEN:
        raise SystemExit(f"{what} {path} must be exactly {AUTH_KEY_LEN} bytes, "
                         f"has {len(key)}")
    return key


class NotingSource(Protocol):
    """Optional hooks of a key source that talks to its peer end (e.g. ETSI 014)."""

    def outgoing(self) -> list[Message]:
        """Notes for the peer's source, sent as they are (dropped if no channel)."""
        ...

    def on_peer_note(self, msg: Message) -> None:
        """A note from the peer's source, authenticated by the agreement channel."""
        ...

    def on_agreement(self, synced: bool, undecided: int) -> None:
        """The agreement's state, every loop: whether the ends are in session and how
        many of this end's blocks await a decision (a leader source paces on it)."""
        ...


@dataclass(eq=False)
class Candidate:
    """A new agreement connection that has not yet proven it is the peer's: our nonce
    sent, theirs and a first authentic frame awaited, without blocking the loop."""

    sock: socket.socket
    mine: bytes
    deadline: float
    theirs: bytes = b""
    codec: FrameCodec | None = None
    buffered: list[Message] = field(default_factory=list)


@dataclass(eq=False)
class Dial:
    """The follower's connection to the leader on its way up, without blocking the loop
    (a blocking connect to an unreachable leader held it for seconds at every try): TCP
    connected, our nonce sent, the leader's awaited."""

    sock: socket.socket
    mine: bytes
    deadline: float
    connected: bool = False
    theirs: bytes = b""


@dataclass
class EndConfig:
    """Everything one link end's key manager needs, resolved by the caller."""

    prefix: str
    node: str
    link: LinkSpec
    port: int
    state_dir: Path
    status_path: Path
    auth_key: bytes
    source: KeySource

    @classmethod
    def from_topology(cls, topo: Topology, node: str, link: LinkSpec,
                      state_dir: Path | None = None) -> EndConfig:
        key_path = link.auth_key_file or paths.link_key_path(topo.prefix, link.name)
        return cls(
            prefix=topo.prefix, node=node, link=link,
            port=topo.ports.agreement + link.index,
            state_dir=state_dir or paths.state_dir(topo.prefix, node),
            status_path=paths.node_dir(topo.prefix, node) / f"lkm-{link.name}.json",
            auth_key=load_link_key(key_path),
            source=make_source(topo, node, link),
        )


class LinkKeyManager:
    def __init__(self, cfg: EndConfig):
        self.cfg = cfg
        lk = cfg.link
        self.is_leader = cfg.node == lk.a
        self.peer = lk.peer_of(cfg.node)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        enc_dir = AB if self.is_leader else BA
        self.rings: dict[int, KeyRing] = {}
        for d in (AB, BA):
            name = paths.ring_name(cfg.prefix, cfg.node, lk.name, DIRS[d])
            cursor = CursorFile(cfg.state_dir / f"{lk.name}-{DIRS[d]}.cursor")
            role = ROLE_ENC if d == enc_dir else ROLE_DEC
            self.rings[d] = KeyRing.create_or_attach(name, lk.ring_capacity, lk.block_size,
                                                     role, cursor)
        write = (self.rings[AB].write_pos, self.rings[BA].write_pos)
        self.machine: Leader | Follower
        # How long a block waits for the other end's copy: a source may say (ETSI 014).
        timeout = getattr(cfg.source, "block_timeout_s", PENDING_BLOCK_TIMEOUT_S)
        if self.is_leader:
            self.machine = Leader(lk.ratio, lk.ring_capacity, write, timeout)
        else:
            self.machine = Follower(lk.ring_capacity, write, timeout)
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.peer_sock: socket.socket | None = None
        self.codec: FrameCodec | None = None
        self.candidates: list[Candidate] = []
        self.dial: Dial | None = None
        self.refused_connections = 0  # new connections that never authenticated
        self.source_up = False
        self.source_reading = False
        self.source_error = ""
        self.notes: NotingSource | None = (cfg.source if hasattr(cfg.source, "outgoing")
                                           else None)  # type: ignore[assignment]
        self.peer_error = ""
        self._heard = self._said = 0.0  # monotonic: the live session's last frame in, out
        self.stop = False
        self._next_source_try = 0.0
        self._next_peer_try = 0.0
        self._last_status = 0.0
        self._key_rate = CounterRate()
        self._key_rate.update(0, time.monotonic())
        self.rate_bps = 0.0
        self.started = time.time()

    # ---- helpers -----------------------------------------------------------------------

    def released(self) -> tuple[int, int]:
        return (self.rings[AB].free_pos, self.rings[BA].free_pos)

    def _carry_out(self, actions) -> None:
        for a in actions:
            if isinstance(a, Store):
                self.rings[a.direction].append(a.pos, a.data)
            elif isinstance(a, SkipTo):
                self.rings[a.direction].skip_to(a.pos)
                log.info("link %s: skipped %s to position %d", self.cfg.link.name,
                         DIRS[a.direction], a.pos)
            elif isinstance(a, Send):
                self._send(a)
            elif isinstance(a, Dropped):
                pass

    def _send(self, a: Send) -> None:
        if self.peer_sock is None or self.codec is None:
            return
        try:
            self.peer_sock.sendall(self.codec.seal(a.msg))
            self._said = time.monotonic()
        except OSError as e:
            self._drop_peer(f"send failed: {e}")

    def _keep_alive(self, now: float) -> None:
        """Drop a live session that has been silent too long; else say something if this
        end has been quiet for a heartbeat."""
        if self.peer_sock is None:
            return
        if now - self._heard > PEER_SILENT_S:
            self._drop_peer(f"nothing authentic heard for {PEER_SILENT_S:.0f} s")
            return
        if now - self._said >= HEARTBEAT_S:
            msg = self.machine.heartbeat(self.released())
            if msg is not None:
                self._send(Send(msg))

    # ---- key source --------------------------------------------------------------------

    def _try_source(self, now: float) -> None:
        if self.source_up or now < self._next_source_try:
            return
        try:
            self.cfg.source.open()
        except SourceUnavailable as e:
            self._source_failed(str(e), "key source unavailable")
            self._next_source_try = now + RECONNECT_S
            return
        self.source_up = True
        self.sel.register(self.cfg.source.fileno(), selectors.EVENT_READ, "source")
        self.source_reading = True
        log.info("link %s: key source connected (%s)", self.cfg.link.name,
                 self.cfg.source.description)

    def _has_room(self) -> bool:
        """Can a ring this link's ratio feeds take another block?"""
        lk = self.cfg.link
        for d, share in zip((AB, BA), lk.ratio, strict=True):
            r = self.rings[d]
            if share and r.capacity - (r.write_pos - r.free_pos) >= lk.block_size:
                return True
        return False

    def _pace_source(self) -> None:
        """Stop reading the source while every ring it feeds is full, so an unthrottled
        source waits (and a throttled one drops) instead of burning CPU on discards."""
        if not self.source_up:
            return
        room = self._has_room()
        if room == self.source_reading:
            return
        if room:
            self.sel.register(self.cfg.source.fileno(), selectors.EVENT_READ, "source")
        else:
            self.sel.unregister(self.cfg.source.fileno())
        self.source_reading = room

    def _on_source(self, now: float) -> None:
        try:
            blocks = self.cfg.source.read_blocks()
        except SourceUnavailable as e:
            self._source_failed(str(e), "key source lost; running on stored key")
            if self.source_reading:
                self.sel.unregister(self.cfg.source.fileno())
            self.source_reading = False
            self.cfg.source.close()
            self.source_up = False
            self._next_source_try = now + RECONNECT_S
            return
        if blocks:
            if self.source_error:
                log.info("link %s: key source delivers again", self.cfg.link.name)
            self.source_error = ""
            self._carry_out(self.machine.on_blocks(blocks, self.released(), now))

    def _source_failed(self, error: str, what: str) -> None:
        """Note a source failure; say it once, not at every retry of a source that
        opens but keeps failing (a device that is down)."""
        if error != self.source_error:
            log.warning("link %s: %s: %s", self.cfg.link.name, what, error)
        self.source_error = error

    def _exchange_notes(self) -> None:
        """Tell a noting source the agreement's state and send its notes to the peer."""
        if self.notes is None:
            return
        self.notes.on_agreement(self.machine.synced and self.peer_sock is not None,
                                len(self.machine.pending))
        if self.peer_sock is not None:  # else they wait in the source (which ages them)
            for m in self.notes.outgoing():
                self._send(Send(m))

    # ---- peer channel ------------------------------------------------------------------

    def _peer_addr(self) -> tuple[str, int]:
        return (str(self.cfg.link.underlay_a.ip), self.cfg.port)

    def _try_peer(self, now: float) -> None:
        if self.is_leader:
            if self.listener is None and now >= self._next_peer_try:
                try:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(self._peer_addr())
                    s.listen(MAX_CANDIDATES)
                    s.setblocking(False)
                except OSError as e:
                    s.close()
                    self.peer_error = f"cannot listen on {self._peer_addr()}: {e}"
                    self._next_peer_try = now + RECONNECT_S
                    return
                self.listener = s
                self.sel.register(s, selectors.EVENT_READ, "listen")
            return
        if self.peer_sock is not None or self.dial is not None or now < self._next_peer_try:
            return
        self._next_peer_try = now + RECONNECT_S
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((str(self.cfg.link.underlay_b.ip), 0))
            err = s.connect_ex(self._peer_addr())
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as e:
            s.close()
            self.peer_error = f"peer {self.peer} at {self._peer_addr()[0]}: {e}"
            return
        self.dial = Dial(s, secrets.token_bytes(NONCE_LEN), now + DIAL_TIMEOUT_S)
        self.sel.register(s, selectors.EVENT_WRITE, self.dial)

    def _on_dial(self, d: Dial, now: float) -> None:
        """The follower's connection progressed: connected (send our nonce), or the
        leader's nonce (the session starts once all of it is here)."""
        try:
            if not d.connected:
                err = d.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                d.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if d.sock.send(d.mine) != NONCE_LEN:  # a fresh socket's empty buffer
                    raise OSError("our nonce did not go out whole")
                d.connected = True
                self.sel.modify(d.sock, selectors.EVENT_READ, d)
                return
            chunk = d.sock.recv(NONCE_LEN - len(d.theirs))
        except BlockingIOError:
            return
        except OSError as e:
            self._dial_failed(str(e))
            return
        if not chunk:
            self._dial_failed("peer closed during handshake")
            return
        d.theirs += chunk
        if len(d.theirs) < NONCE_LEN:
            return
        self.sel.unregister(d.sock)
        self.dial = None
        d.sock.setblocking(True)
        d.sock.settimeout(5.0)
        self._install(d.sock, FrameCodec(self.cfg.auth_key, b"F", d.mine, d.theirs))
        self._carry_out(self.machine.on_connect(self.released()))  # type: ignore[union-attr]

    def _dial_failed(self, why: str) -> None:
        d, self.dial = self.dial, None
        if d is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(d.sock)
        with contextlib.suppress(OSError):
            d.sock.close()
        self.peer_error = f"peer {self.peer} at {self._peer_addr()[0]}: {why}"

    def _accept(self, now: float) -> None:
        """New connections become candidates; the live session is not touched."""
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                s, addr = self.listener.accept()
            except OSError:
                return
            if addr[0] != str(self.cfg.link.underlay_b.ip):
                self._refuse_candidate(None, s, f"from {addr[0]}, not the peer's address")
                continue
            s.setblocking(False)
            c = Candidate(s, secrets.token_bytes(NONCE_LEN), now + CANDIDATE_TIMEOUT_S)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.send(c.mine)  # 16 bytes into a fresh socket's empty buffer
            except OSError as e:
                self._refuse_candidate(None, s, f"send failed: {e}")
                continue
            if len(self.candidates) >= MAX_CANDIDATES:
                self._refuse_candidate(self.candidates[0], None, "too many at once")
            self.candidates.append(c)
            self.sel.register(s, selectors.EVENT_READ, c)

    def _refuse_candidate(self, c: Candidate | None, s: socket.socket | None,
                          why: str) -> None:
        """Close a connection that did not prove to be the peer's; said once in a while
        (a flood would otherwise flood the log too)."""
        if c is not None:
            self.candidates.remove(c)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(c.sock)
            s = c.sock
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()
        self.refused_connections += 1
        n = self.refused_connections
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...
            log.warning("link %s: refused an agreement connection (%s); %d so far",
                        self.cfg.link.name, why, n)

    def _on_candidate(self, c: Candidate, now: float) -> None:
        """Read what a candidate sent: the peer's nonce, then frames. The first authentic
        frame makes it the session; anything unauthentic closes it."""
        try:
            data = c.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as e:
            self._refuse_candidate(c, None, f"receive failed: {e}")
            return
        if not data:
            self._refuse_candidate(c, None, "closed before it authenticated")
            return
        if c.codec is None:
            need = NONCE_LEN - len(c.theirs)
            c.theirs += data[:need]
            data = data[need:]
            if len(c.theirs) < NONCE_LEN:
                return
            c.codec = FrameCodec(self.cfg.auth_key, b"L", c.mine, c.theirs)
        try:
            c.buffered += c.codec.feed(data)
        except ProtocolError as e:
            self._refuse_candidate(c, None, f"refused a frame: {e}")
            return
        if c.buffered:
            self._promote(c, now)

    def _promote(self, c: Candidate, now: float) -> None:
        """An authenticated candidate replaces the live session (the peer reconnected:
        its end of the old connection is gone, even if ours has not noticed)."""
        self.candidates.remove(c)
        self.sel.unregister(c.sock)
        for other in list(self.candidates):  # older attempts of the same peer, or noise
            self._refuse_candidate(other, None, "superseded by an authenticated one")
        if self.peer_sock is not None:
            self._drop_peer("replaced by a new authenticated connection")
        assert c.codec is not None
        c.sock.setblocking(True)
        c.sock.settimeout(5.0)
        self._install(c.sock, c.codec)
        self._deliver(c.buffered, now)

    def _expire_candidates(self, now: float) -> None:
        for c in [c for c in self.candidates if now > c.deadline]:
            self._refuse_candidate(c, None, f"not authenticated within "
                                            f"{CANDIDATE_TIMEOUT_S:.0f} s")

    def _install(self, s: socket.socket, codec: FrameCodec) -> None:
        self.codec = codec
        self.peer_sock = s
        self.peer_error = ""
        self._heard = self._said = time.monotonic()
        self.sel.register(s, selectors.EVENT_READ, "peer")
        log.info("link %s: agreement channel to %s up", self.cfg.link.name, self.peer)

    def _drop_peer(self, why: str) -> None:
        if self.peer_sock is None:
            return
        log.warning("link %s: agreement channel to %s down: %s", self.cfg.link.name,
                    self.peer, why)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.peer_sock)
        with contextlib.suppress(OSError):
            self.peer_sock.close()
        self.peer_sock = None
        self.codec = None
        self.peer_error = why
        self._carry_out(self.machine.on_disconnect())

    def _on_peer(self, now: float) -> None:
        assert self.peer_sock is not None and self.codec is not None
        try:
            data = self.peer_sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            self._drop_peer(f"receive failed: {e}")
            return
        if not data:
            self._drop_peer("peer closed the connection")
            return
        try:
            msgs = self.codec.feed(data)
        except ProtocolError as e:
            self._drop_peer(f"refused a frame: {e}")
            return
        self._deliver(msgs, now)

    def _deliver(self, msgs: list[Message], now: float) -> None:
        """Authentic messages of the live session, to the source or the agreement."""
        if msgs:
            self._heard = now
        for m in msgs:
            if isinstance(m, KeyIds):  # for the source, not the agreement
                if self.notes is not None:
                    self.notes.on_peer_note(m)
                continue
            self._carry_out(self.machine.on_message(m, self.released(), now))
            if self.peer_sock is None:
                return

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict:
        c = self.machine.counters
        rings = {}
        for d, ring in self.rings.items():
            cur = ring.cursors()
            enc = (d == AB) == self.is_leader
            rings[DIRS[d]] = {"role": "enc" if enc else "dec", **asdict(cur),
                              "fill": cur.fill}
        return {
            "node": self.cfg.node, "link": self.cfg.link.name, "peer": self.peer,
            "role": "leader" if self.is_leader else "follower", "pid": os.getpid(),
            "updated": time.time(), "started": self.started,
            "source": {"up": self.source_up, "error": self.source_error,
                       "paused": self.source_up and not self.source_reading,
                       "description": self.cfg.source.description,
                       **({"stats": self.cfg.source.stats()}  # type: ignore[attr-defined]
                          if hasattr(self.cfg.source, "stats") else {})},
            "agreement": {"connected": self.peer_sock is not None,
                          "synced": self.machine.synced, "session": self.machine.sync,
                          "resyncs": c.resyncs, "error": self.peer_error,
                          "decisions_replayed": c.decisions_replayed,
                          "pending_blocks": len(self.machine.pending),
                          "refused_connections": self.refused_connections},
            "key": {"blocks_in": c.blocks_in, "bytes_in": c.bytes_in,
                    "bytes_stored_ab": c.bytes_stored[AB], "bytes_stored_ba": c.bytes_stored[BA],
                    "bytes_discarded": c.bytes_discarded,
                    "blocks_discarded": c.blocks_discarded,
                    "bytes_skipped_ab": c.bytes_skipped[AB],
                    "bytes_skipped_ba": c.bytes_skipped[BA],
                    "rate_bps": self.rate_bps},
            "rings": rings,
            "accounting": self.accounting(),
        }

    def accounting(self) -> dict:
        """Where this link end's key went (invariant 8): from the source into the rings,
        discarded or still undecided (this process's counters), and per direction from
        the ring's own words (see dataplane.ring.KeyAccount)."""
        c = self.machine.counters
        out: dict = {"source": {"in": c.bytes_in, "discarded": c.bytes_discarded,
                                "pending": self.machine.pending.nbytes,
                                "stored": {DIRS[d]: c.bytes_stored[d] for d in (AB, BA)}}}
        for d, ring in self.rings.items():
            a = ring.accounting()
            out[DIRS[d]] = {**asdict(a), "used_pad": a.used_pad, "used_mac": a.used_mac,
                            "balance": a.balance}
        return out

    def _publish(self, now: float) -> None:
        self.rate_bps = 8 * self._key_rate.update(self.machine.counters.bytes_in, now)
        self.cfg.status_path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.cfg.status_path, self.status())

    # ---- main loop ---------------------------------------------------------------------

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("link %s: key manager up at %s as %s", self.cfg.link.name, self.cfg.node,
                 "leader" if self.is_leader else "follower")
        try:
            while not self.stop:
                now = time.monotonic()
                self._try_source(now)
                self._pace_source()
                self._try_peer(now)
                for key, _ in self.sel.select(timeout=0.1):
                    now = time.monotonic()
                    if key.data == "source":
                        self._on_source(now)
                    elif key.data == "peer" and self.peer_sock is not None:
                        self._on_peer(now)
                    elif key.data == "listen":
                        self._accept(now)
                    elif isinstance(key.data, Candidate) and key.data in self.candidates:
                        self._on_candidate(key.data, now)
                    elif isinstance(key.data, Dial) and key.data is self.dial:
                        self._on_dial(key.data, now)
                now = time.monotonic()
                self._expire_candidates(now)
                if self.dial is not None and now > self.dial.deadline:
                    self._dial_failed(f"no answer within {DIAL_TIMEOUT_S:.0f} s")
                self._carry_out(self.machine.on_tick(self.released(), now))
                self._keep_alive(now)
                self._exchange_notes()
                if now - self._last_status >= STATUS_INTERVAL_S:
                    self._last_status = now
                    self._publish(now)
        except RingError as e:
            log.error("link %s: %s", self.cfg.link.name, e)
            raise
        finally:
            self.close()

    def _on_signal(self, *_: object) -> None:
        self.stop = True

    def close(self) -> None:
        self._drop_peer("key manager stopping")
        self._dial_failed("key manager stopping")
        for c in list(self.candidates):
            self._refuse_candidate(c, None, "key manager stopping")
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
        self.cfg.source.close()
        with contextlib.suppress(Exception):
            self._publish(time.monotonic())
        for r in self.rings.values():
            r.close()
