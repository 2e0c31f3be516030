"""Key source for QKD devices speaking ETSI GS QKD 014: the node is an SAE of its device.

Each link end talks to its own device (KME) over HTTPS with mutual TLS:

1. The leader (link end a) calls ``enc_keys`` at its device naming the follower's SAE ID:
   as many blocks' keys (``keys_per_call`` each, of ``key_size`` bits) as the agreement's
   window has room for and the device's ``max_key_per_request`` allows, at most 8 blocks;
   each ``keys_per_call`` keys, concatenated in the answer's order, are one block
   ``(epoch, seq)``.
2. It tells the follower which keys those were, one ``KeyIds((epoch, seq), key_IDs)`` per
   block, over the link's authenticated agreement channel (the key manager routes them).
3. The follower calls ``dec_keys`` at its own device with the IDs of the notes waiting
   (in order, as many as one call may carry) and delivers the same bytes under the same
   ``(epoch, seq)``. From there the agreement decides as for any source.

A call costs the device's round trip whatever its size: one call per block of 1 KiB held
a link to about 1 Mb/s here. Batching keeps the blocks as configured (the agreement's
unit, and what one lost note loses). A refused batch is asked for note by note, so a
"not found" names its note.

A block is delivered only whole, after the device's answer has arrived completely and its
key IDs and sizes are checked; a failure anywhere delivers nothing. Keys whose IDs never
reach the follower, or whose ``dec_keys`` answer is lost, are never used: the agreement's
timeout discards the leader's copy, and a device hands a key out once, so no key is used
twice. "Not enough key" (503) waits and asks again, doubling the wait; an unreachable or
refusing device makes the key manager reopen the source every second and run on stored
key meanwhile. The leader fetches only while the agreement is synced and few blocks are
undecided, so a follower whose device is down does not drain the leader's.

The requests and the answer checks are ``api.etsi``'s, the HTTPS client ``api.client``'s
(the same ones our own SAEs use). The Status check, the follower's queue of notes, the
repeated-ID check and the backoff here are I/O-free (tested directly); the calls are a
thin shell on :class:`FetchingSource`'s thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from api import etsi
from api.client import KmeClient, NoAnswer, TlsFilesError, tls_context
from api.etsi import BadAnswer, NotEnoughKey, Refused
from control.lkm.messages import KeyIds, Message
from control.lkm.source import Block, FetchingSource, SourceUnavailable
from dataplane.limits import NOTED_BLOCK_TIMEOUT_S

if TYPE_CHECKING:
    from control.core.config import Etsi014End, Etsi014Source, LinkSpec, Topology

log = logging.getLogger("qkdnet.keysource.etsi")
WINDOW_BLOCKS = 8          # blocks the leader lets be undecided before it asks for more
MAX_NOTES = 256            # notes the follower holds; older ones are dropped
RECENT_IDS = 1 << 16       # key IDs remembered to refuse a repeated one
MAX_BACKOFF_S = 2.0        # longest wait between asks when the device has no key
MAX_CALL_BYTES = 16 << 20  # key one batched call asks for at most (one block may be more)
GROW_AFTER = 8  # answers in a row, after a 503 for a batch, before asking for a block more


# ---- the I/O-free parts -----------------------------------------------------------------

def join_keys(keys: list[bytes]) -> bytearray:
    """One block: the keys one after the other."""
    out = bytearray(sum(len(k) for k in keys))
    pos = 0
    for k in keys:
        out[pos:pos + len(k)] = k
        pos += len(k)
    return out


def batch_blocks(wanted: int, keys_per_call: int, key_bytes: int,
                 max_per_request: int | None) -> int:
    """Blocks one call fetches: up to ``wanted`` (the config's ``blocks_per_call``, and
    the window's room), as many whole blocks as the device's ``max_key_per_request``
    holds (unknown: one) and MAX_CALL_BYTES (an answer of 16 MiB of key is some 22 MB
    of JSON). At least one.

    A call costs the device's round trip whatever its size, so one call per block of a
    few KiB held a link to a few Mb/s; the blocks stay as configured (the agreement's
    unit, and what is lost with a lost note)."""
    fits = max_per_request // keys_per_call if max_per_request else 1
    return max(1, min(wanted, fits, MAX_CALL_BYTES // (keys_per_call * key_bytes)))


def split_blocks(keys: list[bytes], keys_per_block: int) -> list[bytearray]:
    """The blocks of one answer: its keys in order, ``keys_per_block`` to a block."""
    return [join_keys(keys[i:i + keys_per_block])
            for i in range(0, len(keys), keys_per_block)]


@dataclass
class BatchSize:
    """How many blocks the leader asks its device for at once, at most ``limit``: a 503
    for a batch halves it (the device may have key for fewer), and it grows by a block
    an answer again only once GROW_AFTER answers have come since. Growing at every
    answer, a device that holds one block at a time answered every other call 503."""

    limit: int
    most: int = 0
    calm: int = 0  # answers still to come before it grows

    def __post_init__(self) -> None:
        self.most = self.most or self.limit

    def refused(self, count: int) -> None:
        """The device had too little key for ``count`` blocks (more than one)."""
        self.most = max(1, count // 2)
        self.calm = GROW_AFTER

    def answered(self) -> None:
        if self.calm:
            self.calm -= 1
        else:
            self.most = min(self.limit, self.most + 1)


class Refusal(Enum):
    """What the follower does when its device refuses a dec_keys call."""

    ONE_BY_ONE = "ask for each note's keys alone"  # a batch: which note is it?
    SKIP = "skip the note"      # its keys are gone: an earlier call may have taken them
    WAIT = "wait and ask again"  # the device may lag behind the leader's
    FAIL = "fail the source"    # the device refuses us: reopen and retry later


def on_refusal(batch: int, status: int, lost: bool) -> Refusal:
    """The follower's move on a refused dec_keys call for ``batch`` notes (``lost``: the
    head's keys may have been handed out by a call that got no answer). A "not found"
    (400) of one note is lag unless that note is ``lost``; of a batch it names no note."""
    if status != 400:
        return Refusal.FAIL
    if batch > 1:
        return Refusal.ONE_BY_ONE
    return Refusal.SKIP if lost else Refusal.WAIT


def device_max_per_request(doc: object) -> int | None:
    """The device's ``max_key_per_request`` from its Status answer (None: not given)."""
    v = doc.get("max_key_per_request") if isinstance(doc, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def check_status(doc: object, keys_per_call: int, key_size: int) -> list[str]:
    """What in our config a device's Status answer rules out (empty: nothing)."""
    if not isinstance(doc, dict):
        return ["the device's Status answer is not a JSON object"]
    problems = []

    def limit(name: str) -> int | None:
        v = doc.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    if (m := limit("max_key_per_request")) is not None and keys_per_call > m:
        problems.append(f"keys_per_call = {keys_per_call}, the device gives at most {m} "
                        f"keys per request")
    if (m := limit("max_key_size")) is not None and key_size > m:
        problems.append(f"key_size = {key_size} bits, the device's largest is {m}")
    if (m := limit("min_key_size")) is not None and key_size < m:
        problems.append(f"key_size = {key_size} bits, the device's smallest is {m}")
    return problems


@dataclass
class Backoff:
    """Waits that double while a condition lasts (``fail``) and start over (``reset``)."""

    first: float
    cap: float
    _next: float = 0.0

    def fail(self) -> float:
        wait = self._next or self.first
        self._next = min(self.cap, wait * 2)
        return wait

    def reset(self) -> None:
        self._next = 0.0

    @property
    def failing(self) -> bool:
        return self._next != 0.0


class RecentIds:
    """The last ``size`` key IDs seen: a device that repeats one is refused, so no key
    comes in twice (the bytes cannot be compared, the names can)."""

    def __init__(self, size: int = RECENT_IDS):
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def check(self, ids: list[str] | tuple[str, ...]) -> None:
        for k in ids:
            if k in self._ids:
                raise BadAnswer(f"key_ID {k} was seen before")

    def add(self, ids: list[str] | tuple[str, ...]) -> None:
        for k in ids:
            self._ids[k] = None
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)


@dataclass
class _Note:
    note: KeyIds
    received: float
    lost: bool = False  # a dec_keys call with these IDs got no answer: maybe consumed


class NoteQueue:
    """The follower's notes from the leader, fetched in order, each at most once.

    A note older than the agreement's timeout is dropped unfetched (the leader has
    discarded its copy); a note whose block is not after the last one of the same epoch
    is refused (a repeat). ``lost`` marks a note whose ``dec_keys`` call got no answer,
    so the device may have handed the keys out: a "not found" then drops it at once.
    """

    def __init__(self, max_age: float = NOTED_BLOCK_TIMEOUT_S, size: int = MAX_NOTES):
        self.max_age = max_age
        self.size = size
        self._q: deque[_Note] = deque()
        self._last: dict[int, int] = {}
        self.expired = 0
        self.refused = 0
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._q)

    def add(self, note: KeyIds, now: float) -> bool:
        epoch, seq = note.block
        if seq <= self._last.get(epoch, -1):
            self.refused += 1
            return False
        self._last[epoch] = seq
        self._q.append(_Note(note, now))
        while len(self._q) > self.size:
            self._q.popleft()
            self.overflow += 1
        return True

    def head(self, now: float) -> _Note | None:
        """The next note to fetch, after dropping the expired ones."""
        while self._q and now - self._q[0].received > self.max_age:
            self._q.popleft()
            self.expired += 1
        return self._q[0] if self._q else None

    def batch(self, now: float, most: int) -> list[_Note]:
        """The next notes to fetch in one call: the head (after dropping the expired
        ones) and the notes behind it, up to ``most``, stopping before any ``lost`` one:
        a note whose keys may be gone is asked for alone, so a "not found" names it."""
        head = self.head(now)
        if head is None:
            return []
        if head.lost:
            return [head]
        out = [head]
        for item in itertools.islice(self._q, 1, most):
            if item.lost:
                break
            out.append(item)
        return out

    def pop(self, note: _Note) -> None:
        if self._q and self._q[0] is note:
            self._q.popleft()


# ---- the shell: HTTPS to the device --------------------------------------------------------

class Device:
    """This end's device: its KME URL, the certificate files, and the client while open."""

    def __init__(self, end: Etsi014End, base_dir: Path, timeout: float):
        self.url = end.kme
        self.timeout = timeout
        self.files = {name: p if p.is_absolute() else (base_dir / p)
                      for name, p in (("cert", end.cert), ("key", end.key), ("ca", end.ca))}
        self.client: KmeClient | None = None

    def open(self) -> None:
        """Load the certificate files (nothing that blocks); connect on the first call."""
        f = self.files
        try:
            ctx = tls_context(f["ca"], f["cert"], f["key"])
        except TlsFilesError as e:
            raise SourceUnavailable(str(e)) from None
        self.close()
        self.client = KmeClient(self.url, ctx, self.timeout)

    @property
    def retried(self) -> bool:
        """The last call's first try got no answer (it may have reached the device)."""
        return self.client is not None and self.client.retried

    @property
    def reconnected(self) -> bool:
        """The last call went on a new connection: the device had closed the kept-alive
        one, seen before asking or by a first try that got no answer."""
        return self.client is not None and (self.client.retried or self.client.reopened)

    def call(self, call: etsi.Call) -> tuple[int, bytes]:
        """(status, body) of one request; SourceUnavailable when no whole answer came."""
        assert self.client is not None
        try:
            return self.client.call(call)
        except NoAnswer as e:
            raise SourceUnavailable(f"device {self.url}: {e}") from None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


class _EtsiSource(FetchingSource):
    """What both ends share: the device, its Status check, counters, the backoff."""

    # Every fetch that returns nothing has waited already: for its wake event (the
    # agreement's window, a note), or the backoff. A second wait after it held each block
    # of the pipeline back by 50 ms: 0.9 Mb/s at 1 KiB calls, whatever the device's speed.
    idle_s = 0.0
    # How long the agreement waits for the other end's copy of a block (link_end).
    block_timeout_s = NOTED_BLOCK_TIMEOUT_S

    def __init__(self, link: str, cfg: Etsi014Source, own: Etsi014End, peer_sae: str,
                 base_dir: Path, role: str):
        super().__init__(f"ETSI 014 device {own.kme} as SAE {own.sae_id} ({role})")
        self.link = link
        self.cfg = cfg
        self.peer_sae = peer_sae
        self.key_bytes = cfg.key_size // 8
        self.device = Device(own, base_dir, cfg.timeout_s)
        self.backoff = Backoff(cfg.poll_interval_ms / 1000,
                               max(MAX_BACKOFF_S, cfg.poll_interval_ms / 1000))
        self.recent = RecentIds()
        self._checked = False
        self.max_per_request: int | None = None  # the device's, from its Status
        self._lock = threading.Lock()
        self._wake_fetch = threading.Event()
        # reconnects: calls answered on a new connection after the device had closed the
        # kept-alive one (it restarted, or timed the connection out while idle)
        self.counters = {"calls": 0, "blocks": 0, "bytes": 0, "no_key": 0,
                         "bad_answers": 0, "device_errors": 0, "reconnects": 0}

    # FetchingSource hooks
    def connect(self) -> None:
        self.device.open()  # certificate files only: nothing that blocks the caller
        self._checked = False
        self.max_per_request = None

    def disconnect(self) -> None:
        self.device.close()

    def close(self) -> None:
        self._wake_fetch.set()
        super().close()

    # the key manager's hooks (a source that has no notes need not define these)
    def outgoing(self) -> list[Message]:
        return []

    def on_peer_note(self, msg: Message) -> None:
        log.warning("link %s: unexpected %s from the peer, ignored", self.link,
                    type(msg).__name__)

    def on_agreement(self, synced: bool, undecided: int) -> None:
        pass

    def stats(self) -> dict:
        base = super().stats()  # under _cond, which comes before _lock (on_agreement)
        with self._lock:
            return {**base, **self.counters}

    # helpers
    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _ready(self) -> None:
        """Before the first call on a connection: the device's Status (its limits)."""
        if not self._checked:
            try:
                self._check_status()
            except SourceUnavailable:
                self._count("device_errors")
                raise

    def _request(self, call: etsi.Call) -> tuple[int, bytes]:
        self._ready()
        try:
            self._count("calls")
            answer = self.device.call(call)
            if self.device.reconnected:
                self._count("reconnects")
            return answer
        except SourceUnavailable:
            self._count("device_errors")
            raise

    def _check_status(self) -> None:
        """Once per connection: the device answers, and its limits allow our config."""
        status, body = self.device.call(etsi.status_call(self.peer_sae))
        if status == 401:
            raise SourceUnavailable(f"device {self.device.url} refused our certificate: "
                                    f"{etsi.error_text(body)}")
        if status == 200:
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            problems = check_status(doc, self.cfg.keys_per_call, self.cfg.key_size)
            self.max_per_request = device_max_per_request(doc)
            if problems:
                raise SourceUnavailable(f"device {self.device.url}: " + "; ".join(problems))
        self._checked = True

    def _wait_for_key(self, e: NotEnoughKey) -> list[Block]:
        self._count("no_key")
        if not self.backoff.failing:
            log.info("link %s: device %s has no key now (%s); asking again with backoff",
                     self.link, self.device.url, e)
        self._stopping.wait(self.backoff.fail())
        return []

    def _got_key(self) -> None:
        if self.backoff.failing:
            log.info("link %s: device %s has key again", self.link, self.device.url)
        self.backoff.reset()


class EtsiLeaderSource(_EtsiSource):
    """Link end a: enc_keys at its device for the follower's SAE, up to
    ``blocks_per_call`` blocks a call."""

    def __init__(self, link: str, cfg: Etsi014Source, base_dir: Path):
        super().__init__(link, cfg, cfg.a, cfg.b.sae_id, base_dir, "leader")
        self.epoch = secrets.randbits(63)  # new per process: block ids never repeat
        self.seq = 0
        self._may_fetch = self._synced = False
        self._room = 0  # blocks the window has room for
        self._asked = 0  # blocks of a call in progress or not yet queued: in no count
        self._size = BatchSize(cfg.blocks_per_call)
        self._notes: deque[tuple[float, KeyIds]] = deque()
        self.counters.update({"asked_fewer": 0})  # 503s for a batch, each halving the next

    def connect(self) -> None:
        super().connect()
        self._asked = 0  # a new run: nothing of the last one is on its way

    def queued(self, n: int) -> None:
        with self._lock:
            self._asked -= n

    def on_agreement(self, synced: bool, undecided: int) -> None:
        with self._cond, self._lock:  # one look at both: queueing moves blocks between them
            self._synced = synced
            self._room = WINDOW_BLOCKS - undecided - len(self._queue) - self._asked
            may = synced and self._room > 0
            changed, self._may_fetch = may != self._may_fetch, may
        if changed and may:
            self._wake_fetch.set()

    def outgoing(self) -> list[Message]:
        """The notes to send now; those the agreement has given up on are dropped."""
        now = time.monotonic()
        with self._lock:
            out = [n for t, n in self._notes if now - t <= self.block_timeout_s]
            self._notes.clear()
        return out  # type: ignore[return-value]

    def fetch(self) -> list[Block]:
        if not self._may_fetch:
            self._wake_fetch.wait(0.2)
            self._wake_fetch.clear()
            return []
        self._ready()
        n = self.cfg.keys_per_call
        with self._lock:
            count = batch_blocks(min(self._room, self._size.most), n, self.key_bytes,
                                 self.max_per_request)
            self._room -= count
            self._asked += count  # until queued (on_agreement counts them from there)
            self._may_fetch = self._synced and self._room > 0
        blocks: list[Block] = []
        try:
            blocks = self._fetch(count)
        finally:
            if not blocks:  # none on its way: the window has room for them again
                with self._lock:
                    self._asked -= count
                    self._room += count
                    self._may_fetch = self._synced and self._room > 0
        return blocks

    def _fetch(self, count: int) -> list[Block]:
        """One enc_keys call for ``count`` blocks."""
        n = self.cfg.keys_per_call
        status, body = self._request(etsi.enc_keys_call(self.peer_sae, count * n,
                                                        self.cfg.key_size))
        try:
            keys = etsi.parse_enc_keys(status, body, count * n, self.key_bytes)
            ids = [k for k, _ in keys]
            self.recent.check(ids)
        except NotEnoughKey as e:
            if count > 1:  # it may have key for fewer: ask for fewer at once
                self._size.refused(count)
                self._count("asked_fewer")
                return []
            return self._wait_for_key(e)
        except Refused as e:
            raise SourceUnavailable(f"device {self.device.url} refused enc_keys for "
                                    f"{self.peer_sae}: {e}") from None
        except BadAnswer as e:
            self._count("bad_answers")
            raise SourceUnavailable(f"device {self.device.url} answered enc_keys wrongly "
                                    f"({e}); those keys are not used") from None
        self._got_key()
        self._size.answered()
        self.recent.add(ids)
        out: list[Block] = []
        now = time.monotonic()
        with self._lock:
            for i, data in enumerate(split_blocks([k for _, k in keys], n)):
                block = (self.epoch, self.seq)
                self.seq += 1
                self._notes.append((now, KeyIds(block, tuple(ids[i * n:(i + 1) * n]))))
                self.counters["blocks"] += 1
                self.counters["bytes"] += len(data)
                out.append((block, data))
        return out


class EtsiFollowerSource(_EtsiSource):
    """Link end b: dec_keys at its device for each note the leader sends, in order."""

    def __init__(self, link: str, cfg: Etsi014Source, base_dir: Path):
        super().__init__(link, cfg, cfg.b, cfg.a.sae_id, base_dir, "follower")
        self.notes = NoteQueue()
        self._single = False  # a batch was refused: ask for one note's keys at a time
        self.counters.update({"notes_skipped": 0})

    def on_peer_note(self, msg: Message) -> None:
        if not isinstance(msg, KeyIds):
            return super().on_peer_note(msg)
        if len(msg.key_ids) != self.cfg.keys_per_call:
            log.warning("link %s: a note names %d keys, keys_per_call is %d: ignored "
                        "(do both ends have the same config?)", self.link, len(msg.key_ids),
                        self.cfg.keys_per_call)
            return
        with self._lock:
            self.notes.add(msg, time.monotonic())
        self._wake_fetch.set()

    def stats(self) -> dict:
        base = super().stats()  # under _cond, which comes before _lock (on_agreement)
        with self._lock:
            return {**base, **self.counters, "notes_waiting": len(self.notes),
                    "notes_expired": self.notes.expired, "notes_refused": self.notes.refused,
                    "notes_overflow": self.notes.overflow}

    def _skip(self, item: _Note, why: str) -> list[Block]:
        log.warning("link %s: block %s skipped: %s", self.link, item.note.block, why)
        with self._lock:
            self.notes.pop(item)
            self.counters["notes_skipped"] += 1
        return []

    def fetch(self) -> list[Block]:
        with self._lock:
            items = self.notes.batch(time.monotonic(), self.cfg.blocks_per_call)
        if not items:
            self._wake_fetch.wait(0.2)
            self._wake_fetch.clear()
            return []
        self._ready()  # the device's limit, from its Status
        n = self.cfg.keys_per_call
        items = items[:batch_blocks(1 if self._single else len(items), n, self.key_bytes,
                                    self.max_per_request)]
        for i, item in enumerate(items):  # a repeated key ID ends the batch before its note
            try:
                self.recent.check(item.note.key_ids)
            except BadAnswer as e:
                if i == 0:
                    return self._skip(item, f"the leader named a key again ({e})")
                items = items[:i]
                break
        ids = [k for item in items for k in item.note.key_ids]
        try:
            status, body = self._request(etsi.dec_keys_call(self.peer_sae, ids))
        except SourceUnavailable:
            for item in items:
                item.lost = True  # the notes stay: the keys may still be at the device
            raise
        for item in items:
            item.lost |= self.device.retried  # its first try may have reached the device
        try:
            keys = etsi.parse_dec_keys(status, body, ids, self.key_bytes)
        except NotEnoughKey as e:
            return self._wait_for_key(e)
        except Refused as e:
            move = on_refusal(len(items), e.status, items[0].lost)
            if move == Refusal.ONE_BY_ONE:
                self._single = True
            elif move == Refusal.SKIP:
                return self._skip(items[0], f"its keys are gone from the device ({e})")
            elif move == Refusal.WAIT:  # until the note expires
                self._stopping.wait(self.backoff.fail())
            else:
                raise SourceUnavailable(f"device {self.device.url} refused dec_keys from "
                                        f"{self.peer_sae}: {e}") from None
            return []
        except BadAnswer as e:
            self._count("bad_answers")
            if len(items) > 1:  # the device may have handed the keys out: each alone next
                for item in items:
                    item.lost = True
                self._single = True
            else:
                self._skip(items[0], f"the device answered dec_keys wrongly ({e})")
            raise SourceUnavailable(f"device {self.device.url} answered dec_keys wrongly "
                                    f"({e}); those keys are not used") from None
        self._got_key()
        self._single = False
        self.recent.add(ids)
        out: list[Block] = []
        with self._lock:
            for item, data in zip(items, split_blocks(keys, n), strict=True):
                self.notes.pop(item)
                self.counters["blocks"] += 1
                self.counters["bytes"] += len(data)
                out.append((item.note.block, data))
        return out


def make_etsi_source(topo: Topology, node: str, link: LinkSpec) -> _EtsiSource:
    """The ETSI 014 source of ``node``'s end of ``link`` (relative paths: from the
    topology file)."""
    cfg: Etsi014Source = link.source  # type: ignore[assignment]
    base = topo.path.parent
    if node == link.a:
        return EtsiLeaderSource(link.name, cfg, base)
    return EtsiFollowerSource(link.name, cfg, base)
