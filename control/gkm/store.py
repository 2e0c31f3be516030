"""A node's global key stores in RocksDB (rocksdict): per peer an ENC and a DEC store.

One database per node (``<state dir>/gkm``), one column family per store: ``enc.<peer>``
holds the blocks this node originated for ``peer``, ``dec.<peer>`` the blocks it received
from ``peer``. Keys inside a column family:

    m<seq:8>     block metadata: size (u32), state (PENDING, USABLE, CONFLICT; DEC: STORED)
    b<seq:8>     block bytes
    n            ENC: next block number to generate (u64)
    c            ENC: carving cursor (block u64, offset u32)
    r<key id:16> DEC: a key reserved here: master SAE ("*" any), then the SAEs that may
                 fetch it once, newline-separated; one that has fetched it is kept,
                 marked (a NUL byte before its name), until all have and the entry goes;
                 a 0x01 byte before it all: not fetchable until the master's node
                 confirms that the master got the key (a later RESERVE, "=")

Every change is one write batch, so a crash leaves all of it or none. Writes that others
rely on are synced before anyone hears of them: a received block before it is
acknowledged (invariant 4), a take before its keys are returned (a taken key never comes
back). A pending block is written before it is sent, not synced (see ``add_pending``).
Only the GKM process opens the database (RocksDB locks it); other processes take keys
through it (``control.gkm.client``). One lock serialises takers within the process.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

from rocksdict import AccessType, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from control.gkm.carving import MAX_BLOCK, CarveError, Cursor, KeySlice, carve, decode
from control.gkm.errors import StoreError

if TYPE_CHECKING:
    from control.gkm.wire import ReserveStatus

BULK_WRITE = 1 << 20  # a batch of blocks this large is flushed rather than logged
CACHED_BLOCKS = 4     # blocks kept in memory for takes that cut many keys from one block
_META = struct.Struct(">IB")
_U64 = struct.Struct(">Q")
_CURSOR = struct.Struct(">QI")
UNCONFIRMED = b"\x01"  # a DEC reservation's prefix until the master's node confirms it
HANDED_KEEP_S = 60.0   # keys in an answer never confirmed written stay fetchable this long
_HANDING = struct.Struct(">QQdB")  # holder's process identity, its token, when, lost


class BlockState(IntEnum):
    PENDING = 0   # ENC: stored here, not yet acknowledged by the destination
    USABLE = 1    # ENC: acknowledged; DEC: stored
    CONFLICT = 2  # ENC: the destination holds other bytes under this number: never used


def _seq_key(tag: bytes, seq: int) -> bytes:
    return tag + _U64.pack(seq)


def _scan(cf, tag: bytes):
    """(key without the tag, value) of every entry whose key starts with ``tag``."""
    it = cf.iter()
    it.seek(tag)
    while it.valid() and it.key()[:len(tag)] == tag:
        yield it.key()[len(tag):], it.value()
        it.next()


def _read_u64(cf, key: bytes) -> int:
    raw = cf.get(key)
    return _U64.unpack(raw)[0] if raw else 0


def _read_cursor(cf) -> Cursor:
    raw = cf.get(b"c")
    return Cursor(*_CURSOR.unpack(raw)) if raw else Cursor(0, 0)


def _uuid_bytes(kid: str) -> bytes:
    """A key ID's 16 bytes: every spelling of one UUID names one reservation."""
    return uuid.UUID(str(kid)).bytes


SERVED = b"\x00"  # before an SAE's name in a reservation record: it has had the key


def reservation_record(master: str, saes: tuple[str, ...]) -> bytes:
    """A DEC key's reservation: its master SAE ("*": any), then each SAE that may fetch
    it (the slave and the additional slaves), each named once."""
    return b"\n".join(x.encode() for x in (master or "*", *dict.fromkeys(saes)))


def deliver_from_record(record: bytes, kid: str, sae: str, master: str | None
                        ) -> bytes | None:
    """The reservation after ``sae`` has fetched the key: every SAE it names gets the
    same key, once each (invariant 5), and the last one's fetch ends the reservation
    (None). StoreError, with nothing changed, if ``sae`` may not have it."""
    names = record.split(b"\n")
    if master is not None and names[0] not in (b"*", master.encode()):
        raise StoreError("unknown", f"key ID {kid} was not issued to master SAE {master}")
    me = sae.encode()
    if SERVED + me in names[1:]:
        raise StoreError("unknown", f"key ID {kid} was already delivered to SAE {sae}")
    if me not in names[1:]:
        raise StoreError("forbidden", f"key ID {kid} belongs to another SAE")
    rest = [SERVED + n if n == me else n for n in names[1:]]
    if all(n.startswith(SERVED) for n in rest):
        return None
    return b"\n".join([names[0], *rest])


@dataclass(frozen=True)
class Handing:
    """A DEC key handed to one SAE in an answer that is not yet known to be written: the
    key API worker writing it (``holder``, a process identity) confirms it once the
    answer is on the connection, or reports it ``lost``."""
    holder: int
    token: int  # the holder's number for the request
    at: float   # wall clock, so that it survives a restart of the key manager
    lost: bool = False

    def pack(self) -> bytes:
        return _HANDING.pack(self.holder, self.token, self.at, self.lost)

    @classmethod
    def unpack(cls, raw: bytes) -> Handing:
        holder, token, at, lost = _HANDING.unpack(raw)
        return cls(holder, token, at, bool(lost))


def may_hand_again(prev: Handing, holder: int, token: int, holder_alive: bool) -> bool:
    """Whether a key handed to an SAE in an unconfirmed answer may be handed to it again:
    when the same request is asked again (its holder resends it to a restarted key
    manager), or when that answer is lost (reported so, or its holder died). Not while a
    live holder may still be writing it: that would be a second delivery."""
    return (prev.holder, prev.token) == (holder, token) or prev.lost or not holder_alive


def _handed_key(kid: str, sae: str) -> bytes:
    return b"h" + _uuid_bytes(kid) + sae.encode()


@dataclass
class EncState:
    """In-memory index of one ENC store, rebuilt from the database at open; running
    totals, so status and takes cost no scan of the blocks."""

    peer: str
    peer_id: int
    blocks: dict[int, tuple[int, BlockState]] = field(default_factory=dict)
    next_seq: int = 0
    cursor: Cursor = Cursor(0, 0)
    usable_total: int = 0
    pending_total: int = 0
    conflicts: int = 0
    max_block: int = 0  # the largest block ever held: no key can be larger
    taken_bytes: int = 0
    taken_keys: int = 0
    next_rseq: int = 0
    unacked: dict[int, bytes] = field(default_factory=dict)  # rseq -> RESERVE message

    def set(self, seq: int, size: int, state: BlockState) -> None:
        self.max_block = max(self.max_block, size)
        old = self.blocks.get(seq)
        if old is not None:
            self._count(old[0], old[1], -1)
        self.blocks[seq] = (size, state)
        self._count(size, state, 1)

    def drop(self, seq: int) -> None:
        size, state = self.blocks.pop(seq)
        self._count(size, state, -1)

    def _count(self, size: int, state: BlockState, sign: int) -> None:
        if state == BlockState.USABLE:
            self.usable_total += sign * size
        elif state == BlockState.PENDING:
            self.pending_total += sign * size
        else:
            self.conflicts += sign

    def carvable(self, number: int, size: int) -> dict[int, int]:
        """Usable blocks from the cursor on, enough for ``number`` keys of ``size`` if
        there are, stopping at the first pending one: carving never jumps a block that may
        still become usable (acknowledgements arrive in order almost always)."""
        out: dict[int, int] = {}
        fits = 0
        seq, offset = self.cursor.seq, self.cursor.offset
        while fits < number and seq < self.next_seq:
            block = self.blocks.get(seq)
            if block is not None:
                bsize, st = block
                if st == BlockState.PENDING:
                    break
                if st == BlockState.USABLE:
                    out[seq] = bsize
                    fits += max(0, bsize - offset) // size
            seq, offset = seq + 1, 0
        return out

    def usable_bytes(self) -> int:
        cur = self.blocks.get(self.cursor.seq)
        used = self.cursor.offset if cur and cur[1] == BlockState.USABLE else 0
        return self.usable_total - used

    def pending_bytes(self) -> int:
        return self.pending_total


@dataclass
class DecState:
    """In-memory index of one DEC store. ``cursor`` is where the next reservation may
    start: reservations follow the origin's carving order, so nothing behind it can be
    reserved (again); ``outstanding`` counts reserved, undelivered keys per block."""

    peer: str
    peer_id: int
    blocks: dict[int, int] = field(default_factory=dict)  # seq -> size
    cursor: Cursor = Cursor(0, 0)
    outstanding: dict[int, int] = field(default_factory=dict)
    next_rseq: int = 0
    stored_total: int = 0
    delivered_bytes: int = 0
    delivered_keys: int = 0
    freed_blocks: int = 0
    top: int = -1  # the highest block number held since the store was opened
    last_refused: str = ""  # why the last reservation was refused, for status
    handed: dict[bytes, Handing] = field(default_factory=dict)  # h-key -> unconfirmed
    answers_expired: int = 0  # handings never confirmed, ended after HANDED_KEEP_S
    answers_given_back: int = 0  # ... lost ones, their keys back to their reservations

    @property
    def reserved(self) -> int:
        return sum(self.outstanding.values())

    def stored_bytes(self) -> int:
        return self.stored_total

    behind: set[int] = field(default_factory=set)  # stored blocks before cursor.seq
    freeable: set[int] = field(default_factory=set)  # ... of them, those with no key left

    def move_cursor(self, cur: Cursor) -> None:
        """Advance the reservation cursor, noting the blocks it passed (each block once
        over the store's life, however the cursor moves). The cost is the smaller of the
        numbers passed and the blocks held, so no jump makes it spin."""
        lo, hi = self.cursor.seq, cur.seq
        if hi - lo <= len(self.blocks):
            passed = [s for s in range(lo, hi) if s in self.blocks]
        else:
            passed = [s for s in self.blocks if lo <= s < hi]
        self.behind.update(passed)
        self.freeable.update(s for s in passed if not self.outstanding.get(s))
        self.cursor = cur

    def reach(self) -> tuple[int, int]:
        """The furthest the origin's carving cursor can honestly be: the origin carves
        only blocks this node acknowledged, so at most the end of the highest block held
        (or this node's own cursor, if the blocks behind it are gone)."""
        return max((self.cursor.seq, self.cursor.offset), (self.top + 1, 0))

    def beyond_reach(self, seq: int, ahead: int) -> bool:
        """Whether a block numbered ``seq`` is further ahead of what this node holds
        than an origin's window of blocks in flight can be (``ahead`` blocks)."""
        return seq > max(self.top, self.cursor.seq) + ahead

    def add_block(self, seq: int, size: int) -> None:
        self.blocks[seq] = size
        self.stored_total += size
        self.top = max(self.top, seq)
        if seq < self.cursor.seq:
            self.behind.add(seq)
            if not self.outstanding.get(seq):
                self.freeable.add(seq)

    def add_outstanding(self, seq: int) -> None:
        """One more reserved, undelivered key in block ``seq``."""
        self.outstanding[seq] = self.outstanding.get(seq, 0) + 1
        self.freeable.discard(seq)

    def drop_outstanding(self, seq: int) -> None:
        """A key of block ``seq`` delivered or its reservation cancelled."""
        left = max(0, self.outstanding.get(seq, 1) - 1)
        self.outstanding[seq] = left
        if not left and seq in self.behind:
            self.freeable.add(seq)

    def done(self) -> list[int]:
        """Blocks wholly behind the cursor with no key left to deliver: to delete. Kept
        up to date as keys are reserved and delivered, so finding them costs nothing per
        reservation however many reserved, undelivered blocks wait behind the cursor."""
        return list(self.freeable)

    def forget(self, seq: int) -> None:
        """Block ``seq`` deleted."""
        self.stored_total -= self.blocks.pop(seq)
        self.behind.discard(seq)
        self.freeable.discard(seq)
        self.outstanding.pop(seq, None)


class KeyStore:
    def __init__(self, path: Path, node_id: int, enc_peers: dict[str, int],
                 dec_peers: dict[str, int], read_only: bool = False):
        """Open (creating if needed) the stores for the given peers (name -> node id)."""
        self.path = Path(path)
        self.node_id = node_id
        self.lock = threading.RLock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opts = _options()
        cfs = {f"enc.{p}": _options() for p in enc_peers}
        cfs.update({f"dec.{p}": _options() for p in dec_peers})
        if self.path.exists():
            for name in Rdict.list_cf(str(self.path), opts):
                if name != "default":
                    cfs.setdefault(name, _options())
        try:
            if read_only:
                self.db = Rdict(str(self.path), opts, column_families=cfs,
                                access_type=AccessType.read_only())
            else:
                self.db = Rdict(str(self.path), opts, column_families=cfs)
        except Exception as e:
            if "lock" in str(e).lower():
                raise StoreError("busy", f"key store {self.path} is open in another "
                                         "process (the node's global key manager)") from None
            raise
        self.synced = WriteOptions()
        self.synced.sync = True
        self.unsynced = WriteOptions()
        self.no_wal = WriteOptions()
        self.no_wal.disable_wal = True
        self._deferred = False  # inside group(): durable writes wait for one sync
        self._dirty = False
        self._cache: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._cfs: dict[str, Rdict] = {}
        self.enc = {p: self._load_enc(p, i) for p, i in enc_peers.items()}
        self.dec = {p: self._load_dec(p, i) for p, i in dec_peers.items()}

    def close(self) -> None:
        with self.lock:
            self._cache.clear()
            self._cfs.clear()
            self.db.close()

    @contextmanager
    def group(self) -> Iterator[None]:
        """Group commit: writes that must be durable before anyone hears of them are
        logged unsynced inside the block and synced once, together, when it ends. The
        caller answers nobody before the block has ended; a crash inside it loses only
        changes that nobody has heard of (a take never answered: key wasted, not reused)."""
        with self.lock:
            outer = self._deferred
            self._deferred = True
            try:
                yield
            finally:
                self._deferred = outer
                if not outer and self._dirty:
                    self._dirty = False
                    self.db.flush_wal(True)

    def _durable(self, wb: WriteBatch) -> None:
        if self._deferred:
            self.db.write(wb, self.unsynced)
            self._dirty = True
        else:
            self.db.write(wb, self.synced)

    def _block(self, kind: str, peer: str, seq: int) -> bytes:
        """A block's bytes; the last few read are kept, so taking many small keys from one
        block reads it once. Blocks never change once stored; deleted ones are evicted."""
        k = (kind, peer, seq)
        data = self._cache.get(k)
        if data is None:
            data = self._cf(kind, peer)[_seq_key(b"b", seq)]
            self._cache[k] = data
            if len(self._cache) > CACHED_BLOCKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(k)
        return data

    def _evict(self, kind: str, peer: str, seq: int) -> None:
        self._cache.pop((kind, peer, seq), None)

    # ---- loading --------------------------------------------------------------------------

    def _cf(self, kind: str, peer: str):
        """The column family's Rdict view, kept for the store's life: rocksdict flushes
        the memtable when such a view is dropped, which made every small write a flush
        (one new table file and a wait each)."""
        name = f"{kind}.{peer}"
        cf = self._cfs.get(name)
        if cf is None:
            cf = self._cfs[name] = self.db.get_column_family(name)
        return cf

    def _handle(self, kind: str, peer: str):
        return self.db.get_column_family_handle(f"{kind}.{peer}")

    def _metas(self, kind: str, peer: str):
        for key, value in _scan(self._cf(kind, peer), b"m"):
            size, st = _META.unpack(value)
            yield _U64.unpack(key)[0], size, BlockState(st)

    def _load_enc(self, peer: str, peer_id: int) -> EncState:
        st = EncState(peer, peer_id)
        cf = self._cf("enc", peer)
        for seq, size, bst in self._metas("enc", peer):
            st.set(seq, size, bst)
        st.next_seq = _read_u64(cf, b"n")
        st.cursor = _read_cursor(cf)
        st.next_rseq = _read_u64(cf, b"Q")
        st.unacked = {_U64.unpack(k)[0]: v for k, v in _scan(cf, b"q")}
        return st

    def _load_dec(self, peer: str, peer_id: int) -> DecState:
        st = DecState(peer, peer_id)
        cf = self._cf("dec", peer)
        st.cursor = _read_cursor(cf)
        for seq, size, _ in self._metas("dec", peer):
            st.add_block(seq, size)
        st.next_rseq = _read_u64(cf, b"E")
        for key, _ in _scan(cf, b"r"):
            st.add_outstanding(decode(uuid.UUID(bytes=key)).seq)
        st.handed = {b"h" + key: Handing.unpack(value) for key, value in _scan(cf, b"h")}
        return st

    # ---- the origin's side ----------------------------------------------------------------

    def add_pending(self, peer: str, blocks: list[bytes]) -> list[int]:
        """Store new blocks for ``peer`` as pending before they are sent, so a resend
        after a crash carries the same bytes. Small batches are not synced: a kill -9 keeps the
        write (it is in the kernel's page cache); a power cut may lose it, and then the
        block number is made again with other bytes, which the destination answers with
        CONFLICT if it held the first ones, and that block is never used."""
        with self.lock:
            st = self.enc[peer]
            h = self._handle("enc", peer)
            wb = WriteBatch(raw_mode=True)
            seqs = []
            for data in blocks:
                seq = st.next_seq + len(seqs)
                wb.put(_seq_key(b"b", seq), data, h)
                wb.put(_seq_key(b"m", seq), _META.pack(len(data), BlockState.PENDING), h)
                seqs.append(seq)
            wb.put(b"n", _U64.pack(st.next_seq + len(seqs)), h)
            self._write_blocks(wb, "enc", peer, sum(len(b) for b in blocks), sync=False)
            for seq, data in zip(seqs, blocks, strict=True):
                st.set(seq, len(data), BlockState.PENDING)
            st.next_seq += len(seqs)
            return seqs

    def _write_blocks(self, wb: WriteBatch, kind: str, peer: str, nbytes: int,
                      sync: bool) -> None:
        """Write a batch of blocks. Large batches skip the write-ahead log and flush the
        store's memtable to disk at once (synced), so each key byte is written to disk
        once, not twice (log, then table): the disk, not the CPU, bounds the relay rate.
        Small batches go through the log (synced when ``sync``), which is cheaper than a
        flush for a few KiB. Either way the write is durable on return when ``sync``."""
        if nbytes >= BULK_WRITE:
            self.db.write(wb, self.no_wal)
            self._cf(kind, peer).flush(True)
        else:
            if sync:
                self._durable(wb)
            else:
                self.db.write(wb, self.unsynced)

    def pending(self, peer: str) -> list[int]:
        with self.lock:
            return sorted(s for s, (_, st) in self.enc[peer].blocks.items()
                          if st == BlockState.PENDING)

    def block(self, kind: str, peer: str, seq: int) -> bytes | None:
        with self.lock:
            return self._cf(kind, peer).get(_seq_key(b"b", seq))

    def mark(self, peer: str, seqs: list[int], state: BlockState) -> None:
        """Acknowledged (USABLE) or refused (CONFLICT) by the destination. Not synced: if
        lost in a crash the block is pending again, resent, and acknowledged again."""
        with self.lock:
            st = self.enc[peer]
            h = self._handle("enc", peer)
            wb = WriteBatch(raw_mode=True)
            changed = []
            for seq in seqs:
                cur = st.blocks.get(seq)
                if cur is not None and cur[1] == BlockState.PENDING:
                    wb.put(_seq_key(b"m", seq), _META.pack(cur[0], state), h)
                    if state == BlockState.CONFLICT:  # never used: its bytes go now
                        wb.delete(_seq_key(b"b", seq), h)
                    changed.append((seq, cur[0]))
            if changed:
                self.db.write(wb, self.unsynced)
                for seq, size in changed:
                    st.set(seq, size, state)

    def take_enc(self, peer: str, number: int, size: int) -> list[tuple[KeySlice, bytes]]:
        """Cut ``number`` keys of ``size`` bytes for ``peer``, atomically and durably;
        StoreError("short") and nothing taken when there is not enough usable key."""
        return self._take(peer, number, size, ())[0]

    def take_enc_reserved(self, peer: str, number: int, size: int, saes: tuple[str, ...],
                          master: str = "") -> tuple[list[tuple[KeySlice, bytes]], int]:
        """As take_enc, and in the same synced batch a numbered reservation of the keys
        for ``saes``, taken by ``master`` (the RESERVE message for the peer, kept until it
        acknowledges)."""
        out, rseq = self._take(peer, number, size, saes, master)
        assert rseq is not None
        return out, rseq

    def cancel_reservation(self, peer: str, rseq: int) -> int | None:
        """The taker of reservation ``rseq`` gave up before the slave's node confirmed:
        queue a numbered cancellation of the same keys (applied after it, in order), so
        they do not stay reserved for ever. Returns its number (None: nothing to do)."""
        from control.gkm.wire import parse

        with self.lock:
            raw = self.enc[peer].unacked.get(rseq)
            if raw is None:
                return None
            return self.cancel_keys(peer, list(parse([raw]).key_ids))

    def cancel_keys(self, peer: str, key_ids: list[bytes]) -> int:
        """Queue a numbered cancellation (a RESERVE naming no SAE) of these keys'
        reservations at ``peer``, applied there after every reservation queued before it:
        for keys whose taker never got them. Durable before it returns; its number."""
        with self.lock:
            return self._queue(peer, [], [key_ids], confirm=False)[0]

    def confirm_acked(self, peer: str, rseqs: list[int]) -> list[int]:
        """``peer`` applied reservations ``rseqs`` and their takers are about to be
        answered: forget them and, in the same synced batch, queue numbered
        confirmations of their keys, which make them fetchable at ``peer`` (a taker is
        answered only after this returns, so a crash cannot lose a confirmation whose
        taker got its keys). Returns the confirmations' numbers."""
        from control.gkm.wire import parse
        from dataplane.limits import MAX_RELAY_BLOCKS

        with self.lock:
            st = self.enc[peer]
            done = [r for r in rseqs if r in st.unacked]
            ids = [k for r in done for k in parse([st.unacked[r]]).key_ids]
            return self._queue(peer, done, [ids[at:at + MAX_RELAY_BLOCKS]
                                            for at in range(0, len(ids), MAX_RELAY_BLOCKS)],
                               confirm=True)

    def _queue(self, peer: str, acked: list[int], groups: list[list[bytes]],
               confirm: bool) -> list[int]:
        """In one synced batch: forget the acknowledged reservations ``acked`` and queue
        one numbered cancellation (or confirmation) per group of key IDs."""
        from control.gkm.wire import Reserve, encode_reserve

        st = self.enc[peer]
        h = self._handle("enc", peer)
        wb = WriteBatch(raw_mode=True)
        for r in acked:
            wb.delete(_seq_key(b"q", r), h)
        msgs = {}
        for new, key_ids in enumerate(groups, start=st.next_rseq):
            msgs[new] = encode_reserve(Reserve(self.node_id, st.peer_id, new,
                                               (st.cursor.seq, st.cursor.offset), (),
                                               tuple(key_ids), confirm=confirm))[0]
            wb.put(_seq_key(b"q", new), msgs[new], h)
        if msgs:
            wb.put(b"Q", _U64.pack(max(msgs) + 1), h)
        self._durable(wb)
        for r in acked:
            st.unacked.pop(r, None)
        st.unacked.update(msgs)
        st.next_rseq += len(msgs)
        return list(msgs)

    def cancel_unanswered(self, peer: str) -> list[int]:
        """At start: a reservation not yet acknowledged by ``peer`` has a taker that was
        never answered (takers hear only after the acknowledgement) and never will be,
        since the process that held it is gone. Cancel each that is not cancelled yet;
        returns the cancellations' numbers."""
        from control.gkm.wire import parse

        with self.lock:
            msgs = {r: parse([raw]) for r, raw in self.enc[peer].unacked.items()}
            cancelled = {k for m in msgs.values() if not m.saes and not m.confirm
                         for k in m.key_ids}
            return [self.cancel_keys(peer, list(m.key_ids)) for _, m in sorted(msgs.items())
                    if m.saes and not set(m.key_ids) <= cancelled]

    def reservation_acked(self, peer: str, rseq: int) -> None:
        with self.lock:
            st = self.enc[peer]
            if st.unacked.pop(rseq, None) is not None:
                wb = WriteBatch(raw_mode=True)
                wb.delete(_seq_key(b"q", rseq), self._handle("enc", peer))
                self.db.write(wb, self.unsynced)  # lost: resent, answered DUPLICATE

    def _take(self, peer: str, number: int, size: int, saes: tuple[str, ...],
              master: str = "") -> tuple[list[tuple[KeySlice, bytes]], int | None]:
        with self.lock:
            st = self.enc.get(peer)
            if st is None:
                raise StoreError("unknown", f"no global key is kept for node {peer!r}")
            if number < 1 or size < 1:
                raise StoreError("bad", "number and size must be positive")
            if st.blocks and size > st.max_block:
                raise StoreError("bad", f"keys of {size} B do not fit the global key blocks "
                                        f"of {st.max_block} B (gkm.block_size)")
            if number * size > st.usable_bytes():
                raise StoreError("short", f"not enough key: {number} keys of {size} B asked, "
                                          f"{st.usable_bytes()} B usable")
            try:
                slices, cur = carve(st.cursor, st.carvable(number, size), number, size,
                                    origin=self.node_id, destination=st.peer_id)
            except CarveError as e:
                raise StoreError("short" if "not enough" in str(e) else "bad", str(e)) \
                    from None
            h = self._handle("enc", peer)
            data: dict[int, bytes] = {}
            out = []
            for s in slices:
                if s.seq not in data:
                    data[s.seq] = self._block("enc", peer, s.seq)
                out.append((s, data[s.seq][s.offset:s.offset + s.size]))
            if cur.seq in st.blocks and cur.offset >= st.blocks[cur.seq][0]:
                cur = Cursor(cur.seq + 1, 0)  # the last block is used up too
            wb = WriteBatch(raw_mode=True)
            wb.put(b"c", _CURSOR.pack(cur.seq, cur.offset), h)
            gone = [s for s in range(st.cursor.seq, cur.seq)
                    if st.blocks.get(s, (0, None))[1] in (BlockState.USABLE,
                                                          BlockState.CONFLICT)]
            for seq in gone:
                wb.delete(_seq_key(b"b", seq), h)
                wb.delete(_seq_key(b"m", seq), h)
            rseq = None
            if saes:
                from control.gkm.wire import Reserve, encode_reserve

                rseq = st.next_rseq
                msg = encode_reserve(Reserve(self.node_id, st.peer_id, rseq,
                                             (cur.seq, cur.offset), tuple(saes),
                                             tuple(s.key_id.bytes for s, _ in out),
                                             master))[0]
                wb.put(_seq_key(b"q", rseq), msg, h)
                wb.put(b"Q", _U64.pack(rseq + 1), h)
            self._durable(wb)
            for seq in gone:
                st.drop(seq)
                self._evict("enc", peer, seq)
            st.cursor = cur
            st.taken_keys += number
            st.taken_bytes += number * size
            if rseq is not None:
                st.unacked[rseq] = msg
                st.next_rseq = rseq + 1
            return out, rseq

    # ---- the destination's side -----------------------------------------------------------

    def store_received(self, peer: str, blocks: list[tuple[int, bytes | memoryview]]
                       ) -> list[str]:
        """Store blocks from ``peer`` durably; per block 'stored', 'duplicate' (same bytes
        held already) or 'conflict' (other bytes held: kept, the new ones refused)."""
        from control.gkm.wire import AckStatus, receive_status

        with self.lock:
            st = self.dec[peer]
            h = self._handle("dec", peer)
            cf = self._cf("dec", peer)
            wb = WriteBatch(raw_mode=True)
            results, new = [], {}
            for seq, data in blocks:
                if seq in new:  # the same block twice in this batch (a resend)
                    held = new[seq]
                else:
                    held = cf.get(_seq_key(b"b", seq)) if seq in st.blocks else None
                status = receive_status(held, data)
                if status == AckStatus.STORED:
                    new[seq] = bytes(data)
                    wb.put(_seq_key(b"b", seq), new[seq], h)
                    wb.put(_seq_key(b"m", seq), _META.pack(len(data), BlockState.USABLE), h)
                results.append(status)
            if new:
                self._write_blocks(wb, "dec", peer, sum(len(b) for b in new.values()),
                                   sync=True)
                for seq, data in new.items():
                    st.add_block(seq, len(data))
            return results

    def reserve(self, peer: str, key_ids: list[str], sae: str,
                carved_to: Cursor | None = None) -> None:
        """Let ``sae`` fetch these keys from ``peer`` once. Reservations follow the
        origin's carving order: each key must start at or after the end of the last one
        reserved, so a key delivered (or reserved) once can never be reserved again, and
        no two reserved keys share a byte. Repeating an identical reservation is a no-op
        (the origin may resend). ``carved_to`` is the origin's carving cursor: nothing
        before it will ever be reserved, so blocks wholly behind it are deleted as soon as
        their reserved keys are delivered."""
        with self.lock:
            self._reserve(self._dec_state(peer), peer, key_ids, (sae,), carved_to, None, "")

    def apply_reservation(self, peer: str, msg) -> ReserveStatus:
        """A RESERVE from ``peer``, applied in its numbered order exactly once."""
        from control.gkm.wire import ReserveStatus

        with self.lock:
            st = self._dec_state(peer)
            if msg.rseq < st.next_rseq:
                return ReserveStatus.DUPLICATE
            if msg.rseq > st.next_rseq:
                return ReserveStatus.GAP
            ids = [str(uuid.UUID(bytes=bytes(k))) for k in msg.key_ids]
            if msg.confirm:
                self._confirm(st, peer, ids, msg.rseq)
                return ReserveStatus.APPLIED
            try:
                self._reserve(st, peer, ids, msg.saes, Cursor(*msg.carved_to), msg.rseq,
                              msg.master)
            except StoreError as e:  # skip it, or every later one would wait forever
                st.last_refused = f"reservation {msg.rseq}: {e}"
                self._reserve(st, peer, [], (), None, msg.rseq, "")
                return ReserveStatus.REFUSED
            return ReserveStatus.APPLIED

    def _reserve(self, st: DecState, peer: str, key_ids: list[str], saes: tuple[str, ...],
                 carved_to: Cursor | None, rseq: int | None, master: str) -> None:
        cf = self._cf("dec", peer)
        h = self._handle("dec", peer)
        if not saes:
            self._cancel(st, cf, h, key_ids, rseq)
            return
        if carved_to is not None and ((carved_to.seq, carved_to.offset) > st.reach()
                                      or carved_to.offset > MAX_BLOCK):
            raise StoreError("bad", f"carved to block {carved_to.seq} at "
                                    f"{carved_to.offset}: beyond the end of the blocks "
                                    f"held here (block {st.top})")
        owner = reservation_record(master, saes)
        if rseq is not None:  # from the master's node: fetchable once it confirms
            owner = UNCONFIRMED + owner
        cur = st.cursor
        new: list[tuple[bytes, KeySlice]] = []
        for kid in key_ids:
            s = self._dec_slice(st, kid)
            rid = b"r" + _uuid_bytes(kid)
            if (s.seq, s.offset) < (cur.seq, cur.offset):
                if cf.get(rid) in (owner, owner.removeprefix(UNCONFIRMED)):
                    continue  # the same reservation again
                raise StoreError("unknown", f"key ID {kid} is already reserved or "
                                            "delivered, or overlaps a key that is")
            new.append((rid, s))
            cur = Cursor(s.seq, s.offset + s.size)
        if carved_to is not None and (carved_to.seq, carved_to.offset) > (cur.seq,
                                                                           cur.offset):
            cur = carved_to
        wb = WriteBatch(raw_mode=True)
        for rid, _ in new:
            wb.put(rid, owner, h)
        wb.put(b"c", _CURSOR.pack(cur.seq, cur.offset), h)
        if rseq is not None:
            wb.put(b"E", _U64.pack(rseq + 1), h)
        for s in (s for _, s in new):
            st.add_outstanding(s.seq)
        st.move_cursor(cur)
        if rseq is not None:
            st.next_rseq = rseq + 1
        self._free_done(st, wb, h)
        self._durable(wb)

    def _cancel(self, st: DecState, cf, h, key_ids: list[str], rseq: int | None) -> None:
        """Drop the reservations of keys whose taker never got them (not delivered)."""
        wb = WriteBatch(raw_mode=True)
        for kid in key_ids:
            rid = b"r" + _uuid_bytes(kid)
            if cf.get(rid) is not None:
                wb.delete(rid, h)
                st.drop_outstanding(decode(kid).seq)
        if rseq is not None:
            wb.put(b"E", _U64.pack(rseq + 1), h)
            st.next_rseq = rseq + 1
        self._free_done(st, wb, h)
        self._durable(wb)

    def _confirm(self, st: DecState, peer: str, key_ids: list[str], rseq: int) -> None:
        """The master's node answered the taker of these keys: its SAEs may fetch them.
        A key no longer reserved (cancelled, or never) stays so."""
        cf = self._cf("dec", peer)
        h = self._handle("dec", peer)
        wb = WriteBatch(raw_mode=True)
        for kid in key_ids:
            rid = b"r" + _uuid_bytes(kid)
            owner = cf.get(rid)
            if owner is not None and owner.startswith(UNCONFIRMED):
                wb.put(rid, owner[len(UNCONFIRMED):], h)
        wb.put(b"E", _U64.pack(rseq + 1), h)
        st.next_rseq = rseq + 1
        self._durable(wb)

    def _dec_state(self, peer: str) -> DecState:
        st = self.dec.get(peer)
        if st is None:
            raise StoreError("unknown", f"no global key is kept from node {peer!r}")
        return st

    def _free_done(self, st: DecState, wb: WriteBatch, h) -> None:
        """Add the deletion of used-up DEC blocks to ``wb`` (memory updated now: the
        caller writes ``wb`` next, and a lost write only leaves blocks to delete later)."""
        for seq in st.done():
            wb.delete(_seq_key(b"b", seq), h)
            wb.delete(_seq_key(b"m", seq), h)
            st.forget(seq)
            st.freed_blocks += 1
            self._evict("dec", st.peer, seq)

    def _dec_slice(self, st: DecState, kid: str) -> KeySlice:
        try:
            s = decode(kid)
        except CarveError as e:
            raise StoreError("unknown", f"key ID {kid}: {e}") from None
        if s.origin != st.peer_id or s.destination != self.node_id:
            raise StoreError("unknown", f"key ID {kid} is not a key from {st.peer} to here")
        size = st.blocks.get(s.seq)
        if size is None or s.offset + s.size > size:
            raise StoreError("unknown", f"key ID {kid}: no such key stored here")
        return s

    def take_dec(self, peer: str, key_ids: list[str], sae: str, master: str | None = None,
                 holder: tuple[int, int] | None = None,
                 alive: Callable[[int], bool] = lambda _: True) -> list[bytes]:
        """The keys' bytes, each delivered once to each SAE it was reserved for (the slave
        and any additional slaves: the same bytes to each), to no one else, and, when
        ``master`` is given, only if that master SAE took it; refused whole (nothing
        delivered) if any key is not deliverable.

        Without ``holder`` the delivery is final here. With it (the key API worker's
        process identity and its number for the request) the keys are *handed*: they
        count as delivered once the holder confirms its answer written
        (:meth:`answer_written`), and may be handed to the same SAE again while that
        answer is lost (see :func:`may_hand_again`) or for HANDED_KEEP_S at most."""
        with self.lock:
            st = self._dec_state(peer)
            cf = self._cf("dec", peer)
            h = self._handle("dec", peer)
            decoded = [self._dec_slice(st, kid) for kid in key_ids]
            if len(set(decoded)) != len(decoded):
                raise StoreError("bad", "a key ID is named twice")
            slices, unconfirmed, in_flight = [], [], []
            for kid, s in zip(key_ids, decoded, strict=True):
                rid = b"r" + _uuid_bytes(kid)
                owner = cf.get(rid)
                if owner is None:
                    raise StoreError("unknown", f"key ID {kid} is unknown or already "
                                                "delivered")
                pending = owner.startswith(UNCONFIRMED)
                left = deliver_from_record(owner.removeprefix(UNCONFIRMED), kid, sae, master)
                if pending:
                    unconfirmed.append(kid)
                prev = st.handed.get(_handed_key(kid, sae))
                if prev is not None and (holder is None or not may_hand_again(
                        prev, *holder, alive(prev.holder))):
                    in_flight.append(kid)
                slices.append((rid, s, left))
            if unconfirmed:
                more = f" and {len(unconfirmed) - 1} more" if len(unconfirmed) > 1 else ""
                raise StoreError("pending", f"key ID {unconfirmed[0]}{more}: not yet "
                                 f"confirmed by the master's key manager")
            if in_flight:
                more = f" and {len(in_flight) - 1} more" if len(in_flight) > 1 else ""
                raise StoreError("delivering", f"key ID {in_flight[0]}{more}: an answer to "
                                 f"SAE {sae} carrying it is being delivered on another "
                                 f"connection; nothing was taken")
            wb = WriteBatch(raw_mode=True)
            out = []
            data: dict[int, bytes] = {}
            for _, s, _ in slices:
                if s.seq not in data:
                    data[s.seq] = self._block("dec", peer, s.seq)
                out.append(data[s.seq][s.offset:s.offset + s.size])
            if holder is not None:  # delivered once the holder confirms its answer
                now = time.time()
                for kid in key_ids:
                    hk = _handed_key(kid, sae)
                    st.handed[hk] = Handing(holder[0], holder[1], now)
                    wb.put(hk, st.handed[hk].pack(), h)
                self._durable(wb)
                return out
            for rid, _, left in slices:
                if left is None:  # the last SAE named: the key is used up here
                    wb.delete(rid, h)
                else:  # in the same synced batch: one delivery per key and SAE
                    wb.put(rid, left, h)
            for _, s, left in slices:
                if left is None:
                    st.drop_outstanding(s.seq)
            self._free_done(st, wb, h)
            self._durable(wb)
            st.delivered_keys += len(slices)
            st.delivered_bytes += sum(s.size for _, s, _ in slices)
            return out

    def answer_written(self, peer: str, key_ids: list[str], sae: str,
                       holder: tuple[int, int], written: bool) -> int:
        """The holder's word on its answer carrying these keys to ``sae``: written (the
        keys are delivered: each SAE's fetch ends, the last one's ends the key) or lost
        (they may be handed to ``sae`` again). Only the handing's own holder and request
        count; returns how many keys it settled. Not synced: a word lost in a crash
        leaves the handing to end after HANDED_KEEP_S, as delivered."""
        with self.lock:
            st = self._dec_state(peer)
            h = self._handle("dec", peer)
            wb = WriteBatch(raw_mode=True)
            done, lost = [], 0
            for kid in key_ids:
                try:
                    hk = _handed_key(kid, sae)
                except (ValueError, TypeError):
                    continue
                prev = st.handed.get(hk)
                if prev is None or (prev.holder, prev.token) != tuple(holder):
                    continue
                if written:
                    done.append((kid, hk))
                else:
                    st.handed[hk] = Handing(prev.holder, prev.token, prev.at, lost=True)
                    wb.put(hk, st.handed[hk].pack(), h)
                    lost += 1
            self._end_handings(st, peer, wb, done)
            self.db.write(wb, self.unsynced)
            return len(done) + lost

    def expire_handed(self, now: float | None = None,
                      alive: Callable[[int], bool] = lambda _: True) -> tuple[int, int]:
        """End the handings older than HANDED_KEEP_S: one whose answer is known lost
        (reported so, or its holder died) gives its key back to its reservation (the SAE
        may still fetch it, as a key never fetched); one whose live holder never said a
        word (its word lost with a restart of this process) ends as a delivery. Returns
        (given back, ended as deliveries)."""
        now = time.time() if now is None else now
        back = ended = 0
        with self.lock:
            for peer, st in self.dec.items():
                old = [(hk, x) for hk, x in st.handed.items() if now - x.at > HANDED_KEEP_S]
                if not old:
                    continue
                h = self._handle("dec", peer)
                wb = WriteBatch(raw_mode=True)
                done = []
                for hk, x in old:
                    if x.lost or not alive(x.holder):
                        del st.handed[hk]
                        wb.delete(hk, h)
                        back += 1
                    else:
                        done.append((str(uuid.UUID(bytes=hk[1:17])), hk))
                self._end_handings(st, peer, wb, done)
                self.db.write(wb, self.unsynced)
                st.answers_expired += len(done)
                st.answers_given_back += len(old) - len(done)
                ended += len(done)
        return back, ended

    def _end_handings(self, st: DecState, peer: str, wb: WriteBatch,
                      done: list[tuple[str, bytes]]) -> None:
        """Count handings as deliveries: the SAE's fetch is recorded in the key's
        reservation (the last SAE's ends the key), the handing removed."""
        cf = self._cf("dec", peer)
        h = self._handle("dec", peer)
        records: dict[bytes, bytes | None] = {}
        for kid, hk in done:
            st.handed.pop(hk, None)
            wb.delete(hk, h)
            rid = b"r" + hk[1:17]
            owner = records[rid] if rid in records else cf.get(rid)
            if owner is None:
                continue  # cancelled meanwhile
            try:
                left = deliver_from_record(owner.removeprefix(UNCONFIRMED), kid,
                                           hk[17:].decode(), None)
            except StoreError:
                continue
            records[rid] = left
            s = decode(kid)
            if left is None:
                wb.delete(rid, h)
                st.drop_outstanding(s.seq)
            else:
                wb.put(rid, left, h)
            st.delivered_keys += 1
            st.delivered_bytes += s.size
        self._free_done(st, wb, h)

    # ---- inspection -----------------------------------------------------------------------

    def summary(self) -> dict:
        with self.lock:
            enc = {p: {"usable": s.usable_bytes(), "pending": s.pending_bytes(),
                       "blocks": len(s.blocks), "next_block": s.next_seq,
                       "cursor": [s.cursor.seq, s.cursor.offset],
                       "taken_keys": s.taken_keys, "taken_bytes": s.taken_bytes,
                       "conflicts": s.conflicts,
                       "unacked_reservations": len(s.unacked)}
                   for p, s in self.enc.items()}
            dec = {p: {"stored": s.stored_bytes(), "blocks": len(s.blocks),
                       "reserved_keys": s.reserved, "delivered_keys": s.delivered_keys,
                       "delivered_bytes": s.delivered_bytes,
                       "reserve_cursor": [s.cursor.seq, s.cursor.offset],
                       "reservations_applied": s.next_rseq,
                       "freed_blocks": s.freed_blocks, "last_refused": s.last_refused,
                       "handed_unconfirmed": len(s.handed),
                       "answers_expired": s.answers_expired,
                       "answers_given_back": s.answers_given_back}
                   for p, s in self.dec.items()}
            return {"enc": enc, "dec": dec, "db": self.background()}

    def background(self) -> dict:
        """RocksDB's background work (flushes, compactions) across the stores: deleted key
        is rewritten away by compactions, which compete with takes for the CPU."""
        out = {"running_compactions": 0, "running_flushes": 0, "pending_compaction_bytes": 0}
        props = {"running_compactions": "rocksdb.num-running-compactions",
                 "running_flushes": "rocksdb.num-running-flushes",
                 "pending_compaction_bytes": "rocksdb.estimate-pending-compaction-bytes"}
        cfs = [self._cf("enc", p) for p in self.enc] + [self._cf("dec", p) for p in self.dec]
        for cf in cfs:
            for name, prop in props.items():
                v = cf.property_int_value(prop) or 0
                out[name] = out[name] + v if name == "pending_compaction_bytes" else \
                    max(out[name], v)  # the running counts are per database
        return out

    def digests(self, kind: str, peer: str) -> dict[int, tuple[str, str]]:
        """Block number -> (state, sha256 of its bytes): for checks and tests, no key."""
        with self.lock:
            cf = self._cf(kind, peer)
            out = {}
            for seq, _, st in list(self._metas(kind, peer)):
                out[seq] = (st.name.lower(),
                            hashlib.sha256(cf[_seq_key(b"b", seq)]).hexdigest())
            return out


def _options() -> Options:
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    o.create_missing_column_families(True)
    # Key material does not compress. Blob files would spare compaction some copies of
    # large values but cost a quarter more CPU per write here; blocks are deleted soon
    # after use, so plain tables are kept.
    o.set_compression_type(DBCompressionType.none())
    o.set_write_buffer_size(64 << 20)
    # Large batches are flushed as they come (see _write_blocks): let level 0 hold more
    # of those small tables before compacting, which halves the bytes written per key
    # byte during a fill (measured: 2.7x -> 2x the stored bytes).
    o.set_level_zero_file_num_compaction_trigger(16)
    o.set_level_zero_slowdown_writes_trigger(32)
    o.set_level_zero_stop_writes_trigger(48)
    return o
