"""The rules of a node's global key stores, without I/O: what a take, a reservation, its
confirmation or cancellation, a delivery and a handing may do given a store's state, and
the records each leaves in the store.

A rule checks everything first and refuses with a typed error (``control.gkm.errors``)
and nothing changed; otherwise it returns the writes to make (:class:`Writes`, one
batch) and, where the store's order asks for it, updates the in-memory index of the store
(:class:`EncState`, :class:`DecState`). ``control.gkm.store`` reads and writes RocksDB and
nothing else. Records read from the store reach the rules through a :data:`Lookup`.

Records in a store's column family (``enc.<peer>``: blocks this node originated for
``peer``; ``dec.<peer>``: blocks it received from ``peer``):

    m<seq:8>     block metadata: size (u32), state (PENDING, USABLE, CONFLICT; DEC: USABLE)
    k<seq:8>     ENC: the block's seed (32 bytes): its bytes are grown from it
                 (control.gkm.seeds), so the origin never writes them
    b<seq:8>     DEC: block bytes; ENC: those of a block stored before seeds were
    n            ENC: next block number to generate (u64)
    c            ENC: carving cursor; DEC: reservation cursor (block u64, offset u32)
    Q            ENC: next reservation number (u64)
    q<rseq:8>    ENC: a numbered RESERVE message the peer has not acknowledged yet
    a<key id:16> ENC: a key reserved ahead of demand (control.gkm.ahead), not handed out
                 yet: its reservation's number (u64), the length of the names (u16),
                 the master SAE then the slave SAEs newline-separated, the key's bytes
    E            DEC: next reservation number to apply (u64)
    x<rseq:8>    DEC: a reservation refused here (skipped in its order): a resend of it
                 is answered REFUSED again, not DUPLICATE, which the origin would read
                 as applied (empty value)
    r<key id:16> DEC: a key reserved here: master SAE ("*" any), then the SAEs that may
                 fetch it once, newline-separated; one that has fetched it is kept,
                 marked (a NUL byte before its name), until all have and the entry goes;
                 a 0x01 byte before it all: not fetchable until the master's node
                 confirms that the master got the key (a later RESERVE, "=")
    h<key id:16><SAE>  DEC: a key handed to that SAE in an answer not yet known written
"""

from __future__ import annotations

import struct
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from enum import IntEnum

from control.core.config import SAE_ID_RE
from control.gkm.carving import (
    MAX_BLOCK,
    CarveError,
    Cursor,
    KeySlice,
    NotEnoughKey,
    carve,
    decode,
    id_text,
)
from control.gkm.errors import (
    BadRequest,
    DeliveringError,
    ForbiddenError,
    PendingError,
    ShortError,
    StoreError,
    UnknownError,
)
from control.gkm.seeds import Block
from control.gkm.wire import AckStatus, Reserve, encode_reserve, parse, receive_status
from dataplane.limits import MAX_API_READ_BYTES, MAX_API_REQUEST_BYTES, MAX_RELAY_BLOCKS

HANDED_KEEP_S = 60.0   # keys in an answer never confirmed written stay fetchable this long
UNCONFIRMED = b"\x01"  # a DEC reservation's prefix until the master's node confirms it
SERVED = b"\x00"       # before an SAE's name in a reservation record: it has had the key

BLOCK, META, QUEUED, RESERVED, HANDED = b"b", b"m", b"q", b"r", b"h"  # record tags
SEED = b"k"
AHEAD = b"a"
REFUSED_HERE = b"x"
NEXT_BLOCK = b"n"
CURSOR = b"c"
NEXT_RESERVE = b"Q"  # ENC: the number of the next reservation sent
NEXT_APPLIED = b"E"  # DEC: the number of the next reservation to apply

_META = struct.Struct(">IB")
_U64 = struct.Struct(">Q")
_CURSOR = struct.Struct(">QI")
_HANDING = struct.Struct(">QQdB")  # holder's process identity, its token, when, lost
_AHEAD = struct.Struct(">QH")  # reservation number, length of the names

Lookup = Callable[[bytes], bytes | None]
"""A record's value in the store (None: absent), as of before the writes being made."""


class BlockState(IntEnum):
    PENDING = 0   # ENC: stored here, not yet acknowledged by the destination
    USABLE = 1    # ENC: acknowledged; DEC: stored
    CONFLICT = 2  # ENC: the destination holds other bytes under this number: never used


# ---- record encodings ------------------------------------------------------------------

def seq_key(tag: bytes, seq: int) -> bytes:
    return tag + _U64.pack(seq)


def seq_of(raw: bytes) -> int:
    """The number in a record key, without its tag."""
    return _U64.unpack(raw)[0]


def pack_meta(size: int, state: BlockState) -> bytes:
    return _META.pack(size, state)


def unpack_meta(raw: bytes) -> tuple[int, BlockState]:
    size, state = _META.unpack(raw)
    return size, BlockState(state)


def pack_u64(n: int) -> bytes:
    return _U64.pack(n)


def read_u64(raw: bytes | None) -> int:
    """A counter record; 0 when absent."""
    return _U64.unpack(raw)[0] if raw else 0


def pack_cursor(cur: Cursor) -> bytes:
    return _CURSOR.pack(cur.seq, cur.offset)


def read_cursor(raw: bytes | None) -> Cursor:
    """A cursor record; the start when absent."""
    return Cursor(*_CURSOR.unpack(raw)) if raw else Cursor(0, 0)


def ahead_record(rseq: int, master: str, slaves: tuple[str, ...], data: bytes) -> bytes:
    """An ENC key reserved ahead of demand, as kept until it is handed out."""
    names = "\n".join((master, *slaves)).encode()
    return _AHEAD.pack(rseq, len(names)) + names + data


def read_ahead(raw: bytes) -> tuple[int, str, tuple[str, ...], bytes]:
    """(reservation number, master, slaves, key bytes) of an :func:`ahead_record`."""
    rseq, n = _AHEAD.unpack_from(raw)
    master, *slaves = raw[_AHEAD.size:_AHEAD.size + n].decode().split("\n")
    return rseq, master, tuple(slaves), bytes(raw[_AHEAD.size + n:])


KeyId = str | bytes
"""A key ID as an SAE spells it (any spelling of its UUID), or its 16 bytes as the relay
carries it (what the slave's node applies from the master's)."""


def key_id_bytes(kid: KeyId) -> bytes:
    """A key ID's 16 bytes: every spelling of one UUID names one record."""
    if isinstance(kid, bytes) and len(kid) == 16:
        return kid
    return uuid.UUID(str(kid)).bytes


def show(kid: KeyId) -> str:
    """A key ID for a message: its UUID's text."""
    if isinstance(kid, bytes):
        return id_text(kid) if len(kid) == 16 else kid.hex()
    return str(kid)


def reservation_key(kid: KeyId) -> bytes:
    return RESERVED + key_id_bytes(kid)


def reserved_block(raw: bytes) -> int:
    """The block of a reservation record's key (without its tag)."""
    return decode(raw).seq


def handed_key(kid: str, sae: str) -> bytes:
    return HANDED + key_id_bytes(kid) + sae.encode()


def reservation_record(master: str, saes: tuple[str, ...]) -> bytes:
    """A DEC key's reservation: its master SAE ("*": any), then each SAE that may fetch
    it (the slave and the additional slaves), each named once."""
    return b"\n".join(x.encode() for x in (master or "*", *dict.fromkeys(saes)))


def deliver_from_record(record: bytes, kid: str, sae: str, master: str | None
                        ) -> bytes | None:
    """The reservation after ``sae`` has fetched the key: every SAE it names gets the
    same key, once each (invariant 5), and the last one's fetch ends the reservation
    (None). UnknownError or ForbiddenError, nothing changed, if ``sae`` may not have it."""
    names = record.split(b"\n")
    me = sae.encode()
    if SERVED + me in names[1:]:
        raise UnknownError(f"key ID {kid} was already delivered to SAE {sae}")
    if me not in names[1:]:  # before the master: an SAE the key is not for learns
        raise ForbiddenError(f"key ID {kid} belongs to another SAE")  # nothing of it
    if master is not None and names[0] not in (b"*", master.encode()):
        raise UnknownError(f"key ID {kid} was not issued to master SAE {master}")
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


@dataclass
class Writes:
    """Changes to one store's column family, made in order as one write batch: a value
    puts its key, None deletes it."""

    ops: list[tuple[bytes, bytes | None]] = field(default_factory=list)

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((key, value))

    def delete(self, key: bytes) -> None:
        self.ops.append((key, None))

    def deleted_blocks(self) -> list[int]:
        """The numbers of the blocks whose bytes these writes delete."""
        return sorted({seq_of(k[1:]) for k, v in self.ops
                       if v is None and k[:1] in (BLOCK, SEED)})

    def drop_block(self, seq: int, meta: bool = True) -> None:
        """Delete a block's bytes or seed (whichever it has), and its metadata."""
        self.delete(seq_key(BLOCK, seq))
        self.delete(seq_key(SEED, seq))
        if meta:
            self.delete(seq_key(META, seq))


# ---- the origin's side (ENC) -----------------------------------------------------------

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

    # -- changes, applied once their writes are made

    def add_pending(self, seqs: list[int], sizes: list[int]) -> None:
        for seq, size in zip(seqs, sizes, strict=True):
            self.set(seq, size, BlockState.PENDING)
        self.next_seq += len(seqs)

    def apply_take(self, take: Take) -> None:
        for seq in take.gone:
            self.drop(seq)
        self.cursor = take.cursor
        self.taken_keys += len(take.slices)
        self.taken_bytes += sum(s.size for s in take.slices)
        if take.rseq is not None:
            assert take.message is not None
            self.unacked[take.rseq] = take.message
            self.next_rseq = take.rseq + 1

    def apply_queued(self, acked: list[int], msgs: dict[int, bytes]) -> None:
        for r in acked:
            self.unacked.pop(r, None)
        self.unacked.update(msgs)
        self.next_rseq += len(msgs)


def enc_store(stores: dict[str, EncState], peer: str) -> EncState:
    st = stores.get(peer)
    if st is None:
        raise UnknownError(f"no global key is kept for node {peer!r}")
    return st


def pending_blocks(st: EncState, blocks: list[Block]) -> tuple[list[int], Writes]:
    """New blocks for the peer, numbered on from the store's next number, as pending:
    their seeds, not their bytes."""
    w = Writes()
    seqs = []
    for b in blocks:
        seq = st.next_seq + len(seqs)
        w.put(seq_key(SEED, seq), b.seed)
        w.put(seq_key(META, seq), pack_meta(len(b.data), BlockState.PENDING))
        seqs.append(seq)
    w.put(NEXT_BLOCK, pack_u64(st.next_seq + len(seqs)))
    return seqs, w


def marking(st: EncState, seqs: list[int], state: BlockState
            ) -> tuple[list[tuple[int, int]], Writes]:
    """The destination's word on blocks: only a pending block changes (to USABLE or
    CONFLICT; a conflicting block's seed or bytes go now, they are never used). Returns the
    (block, size) changed and the writes."""
    w = Writes()
    changed = []
    for seq in seqs:
        cur = st.blocks.get(seq)
        if cur is not None and cur[1] == BlockState.PENDING:
            w.put(seq_key(META, seq), pack_meta(cur[0], state))
            if state == BlockState.CONFLICT:
                w.drop_block(seq, meta=False)
            changed.append((seq, cur[0]))
    return changed, w


@dataclass(frozen=True)
class Take:
    """A take decided: the keys' slices, where the carving cursor moves, the blocks it
    uses up (deleted), and for a reserved take the numbered RESERVE for the peer."""

    slices: list[KeySlice]
    cursor: Cursor
    gone: list[int]
    rseq: int | None
    message: bytes | None
    writes: Writes


def take(st: EncState, node_id: int, number: int, size: int, saes: tuple[str, ...] = (),
         master: str = "") -> Take:
    """Cut ``number`` keys of ``size`` bytes in carving order, all or none: BadRequest
    for keys no block can hold, ShortError when there is not enough usable key. With
    ``saes``, a numbered reservation of the keys for them, taken by ``master``."""
    if number < 1 or size < 1:
        raise BadRequest("number and size must be positive")
    if st.blocks and size > st.max_block:
        raise BadRequest(f"keys of {size} B do not fit the global key blocks "
                         f"of {st.max_block} B (gkm.block_size)")
    if number * size > st.usable_bytes():
        raise ShortError(f"not enough key: {number} keys of {size} B asked, "
                         f"{st.usable_bytes()} B usable")
    try:
        slices, cur = carve(st.cursor, st.carvable(number, size), number, size,
                            origin=node_id, destination=st.peer_id)
    except NotEnoughKey as e:
        raise ShortError(str(e)) from None
    except CarveError as e:
        raise BadRequest(str(e)) from None
    if cur.seq in st.blocks and cur.offset >= st.blocks[cur.seq][0]:
        cur = Cursor(cur.seq + 1, 0)  # the last block is used up too
    w = Writes()
    w.put(CURSOR, pack_cursor(cur))
    gone = [s for s in range(st.cursor.seq, cur.seq)
            if st.blocks.get(s, (0, None))[1] in (BlockState.USABLE, BlockState.CONFLICT)]
    for seq in gone:
        w.drop_block(seq)
    rseq = msg = None
    if saes:
        rseq = st.next_rseq
        msg = encode_reserve(Reserve(node_id, st.peer_id, rseq, (cur.seq, cur.offset),
                                     tuple(saes), tuple(s.id_bytes for s in slices),
                                     master))[0]
        w.put(seq_key(QUEUED, rseq), msg)
        w.put(NEXT_RESERVE, pack_u64(rseq + 1))
    return Take(slices, cur, gone, rseq, msg, w)


def queued(st: EncState, node_id: int, acked: list[int], groups: list[list[bytes]],
           confirm: bool) -> tuple[dict[int, bytes], Writes]:
    """Forget the acknowledged reservations ``acked`` and queue one numbered cancellation
    (or confirmation) per group of key IDs; returns the new messages by number."""
    w = Writes()
    for r in acked:
        w.delete(seq_key(QUEUED, r))
    msgs = {}
    for new, key_ids in enumerate(groups, start=st.next_rseq):
        msgs[new] = encode_reserve(Reserve(node_id, st.peer_id, new,
                                           (st.cursor.seq, st.cursor.offset), (),
                                           tuple(key_ids), confirm=confirm))[0]
        w.put(seq_key(QUEUED, new), msgs[new])
    if msgs:
        w.put(NEXT_RESERVE, pack_u64(max(msgs) + 1))
    return msgs, w


def reserved_keys(st: EncState, rseq: int) -> list[bytes] | None:
    """The key IDs of unacknowledged reservation ``rseq``; None if it is not waiting."""
    raw = st.unacked.get(rseq)
    return None if raw is None else list(parse([raw]).key_ids)


def confirmations(st: EncState, rseqs: list[int]) -> tuple[list[int], list[list[bytes]]]:
    """The reservations of ``rseqs`` still waiting, and their key IDs in groups of at most
    one message each, to confirm."""
    done = [r for r in rseqs if r in st.unacked]
    ids = [k for r in done for k in parse([st.unacked[r]]).key_ids]
    return done, [ids[at:at + MAX_RELAY_BLOCKS] for at in range(0, len(ids), MAX_RELAY_BLOCKS)]


def unanswered(st: EncState, keep: Collection[int] = ()) -> list[list[bytes]]:
    """The key IDs of each reservation the peer has not acknowledged and no queued
    cancellation covers yet, in order: their takers were never answered. Those numbered
    in ``keep`` (made ahead of demand, with no taker) are not counted."""
    msgs = {r: parse([raw]) for r, raw in st.unacked.items() if r not in keep}
    cancelled = {k for m in msgs.values() if not m.saes and not m.confirm for k in m.key_ids}
    return [list(m.key_ids) for _, m in sorted(msgs.items())
            if m.saes and not set(m.key_ids) <= cancelled]


# ---- the destination's side (DEC) ------------------------------------------------------

@dataclass(frozen=True)
class Fetch:
    """One key of a delivery: its reservation record's key, its slice, and the record
    after this fetch (None: the last SAE named has it, the key is used up)."""

    rid: bytes
    slice: KeySlice
    left: bytes | None


@dataclass(frozen=True)
class Reservation:
    """A reservation decided: its record, the keys newly reserved and the new cursor."""

    record: bytes
    new: list[tuple[bytes, KeySlice]]
    cursor: Cursor
    rseq: int | None


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
    behind: set[int] = field(default_factory=set)  # stored blocks before cursor.seq
    freeable: set[int] = field(default_factory=set)  # ... of them, those with no key left

    @property
    def reserved(self) -> int:
        return sum(self.outstanding.values())

    def stored_bytes(self) -> int:
        return self.stored_total

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

    # -- changes: each updates the index now and returns the writes that record it

    def free_done(self, w: Writes) -> None:
        """Add the deletion of used-up blocks to ``w`` (a lost write only leaves blocks to
        delete later)."""
        for seq in self.done():
            w.delete(seq_key(BLOCK, seq))
            w.delete(seq_key(META, seq))
            self.forget(seq)
            self.freed_blocks += 1

    def reserve(self, r: Reservation) -> Writes:
        w = Writes()
        for rid, _ in r.new:
            w.put(rid, r.record)
        w.put(CURSOR, pack_cursor(r.cursor))
        if r.rseq is not None:
            w.put(NEXT_APPLIED, pack_u64(r.rseq + 1))
        for _, s in r.new:
            self.add_outstanding(s.seq)
        self.move_cursor(r.cursor)
        if r.rseq is not None:
            self.next_rseq = r.rseq + 1
        self.free_done(w)
        return w

    def cancel(self, key_ids: list[KeyId], rseq: int | None, record: Lookup,
               refused: bool = False) -> Writes:
        """Drop the reservations of keys whose taker never got them (not delivered); a
        key not reserved stays so. ``refused``: reservation ``rseq`` is skipped as
        refused, and remembered so."""
        w = Writes()
        if refused and rseq is not None:
            w.put(seq_key(REFUSED_HERE, rseq), b"")
        for kid in key_ids:
            rid = reservation_key(kid)
            if record(rid) is not None:
                w.delete(rid)
                self.drop_outstanding(decode(kid).seq)
        if rseq is not None:
            w.put(NEXT_APPLIED, pack_u64(rseq + 1))
            self.next_rseq = rseq + 1
        self.free_done(w)
        return w

    def confirm(self, key_ids: list[KeyId], rseq: int, record: Lookup) -> Writes:
        """The master's node answered the taker of these keys: its SAEs may fetch them.
        A key no longer reserved (cancelled, or never) stays so."""
        w = Writes()
        for kid in key_ids:
            rid = reservation_key(kid)
            owner = record(rid)
            if owner is not None and owner.startswith(UNCONFIRMED):
                w.put(rid, owner[len(UNCONFIRMED):])
        w.put(NEXT_APPLIED, pack_u64(rseq + 1))
        self.next_rseq = rseq + 1
        return w

    def hand(self, key_ids: list[str], sae: str, holder: tuple[int, int],
             now: float | None = None) -> Writes:
        """Hand the keys to ``sae`` in an answer ``holder`` is about to write: they count
        as delivered once it confirms the answer written."""
        now = time.time() if now is None else now
        w = Writes()
        for kid in key_ids:
            hk = handed_key(kid, sae)
            self.handed[hk] = Handing(holder[0], holder[1], now)
            w.put(hk, self.handed[hk].pack())
        return w

    def deliver(self, fetches: list[Fetch]) -> Writes:
        """Record the fetches in the keys' reservations, in one batch: one delivery per
        key and SAE; the last SAE's ends the key. Count them (:meth:`count`) once
        written."""
        w = Writes()
        for f in fetches:
            if f.left is None:
                w.delete(f.rid)
            else:
                w.put(f.rid, f.left)
        for f in fetches:
            if f.left is None:
                self.drop_outstanding(f.slice.seq)
        self.free_done(w)
        return w

    def count(self, fetches: list[Fetch]) -> None:
        self.delivered_keys += len(fetches)
        self.delivered_bytes += sum(f.slice.size for f in fetches)

    def settle(self, key_ids: list[str], sae: str, holder: tuple[int, int], written: bool,
               record: Lookup) -> tuple[Writes, int]:
        """The holder's word on its answer carrying these keys to ``sae``: written (each
        becomes a delivery) or lost (each may be handed to ``sae`` again). Only the
        handing's own holder and request count; returns the writes and how many keys it
        settled."""
        w = Writes()
        done, lost = [], 0
        for kid in key_ids:
            try:
                hk = handed_key(kid, sae)
            except (ValueError, TypeError):
                continue
            prev = self.handed.get(hk)
            if prev is None or (prev.holder, prev.token) != tuple(holder):
                continue
            if written:
                done.append(hk)
            else:
                self.handed[hk] = Handing(prev.holder, prev.token, prev.at, lost=True)
                w.put(hk, self.handed[hk].pack())
                lost += 1
        self.end_handings(w, done, record)
        return w, len(done) + lost

    def expire(self, now: float, alive: Callable[[int], bool], record: Lookup
               ) -> tuple[Writes, int, int] | None:
        """End the handings older than HANDED_KEEP_S: one whose answer is known lost
        (reported so, or its holder died) gives its key back to its reservation; one whose
        live holder never said a word ends as a delivery. None if none is that old, else
        the writes, (given back, ended as deliveries)."""
        old = [(hk, x) for hk, x in self.handed.items() if now - x.at > HANDED_KEEP_S]
        if not old:
            return None
        w = Writes()
        done = []
        for hk, x in old:
            if x.lost or not alive(x.holder):
                del self.handed[hk]
                w.delete(hk)
            else:
                done.append(hk)
        self.end_handings(w, done, record)
        self.answers_expired += len(done)
        self.answers_given_back += len(old) - len(done)
        return w, len(old) - len(done), len(done)

    def end_handings(self, w: Writes, done: list[bytes], record: Lookup) -> None:
        """Count handings (their h-keys) as deliveries: the SAE's fetch is recorded in the
        key's reservation (the last SAE's ends the key), the handing removed."""
        records: dict[bytes, bytes | None] = {}
        for hk in done:
            kid = str(uuid.UUID(bytes=hk[1:17]))
            self.handed.pop(hk, None)
            w.delete(hk)
            rid = RESERVED + hk[1:17]
            owner = records[rid] if rid in records else record(rid)
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
                w.delete(rid)
                self.drop_outstanding(s.seq)
            else:
                w.put(rid, left)
            self.delivered_keys += 1
            self.delivered_bytes += s.size
        self.free_done(w)


def dec_store(stores: dict[str, DecState], peer: str) -> DecState:
    st = stores.get(peer)
    if st is None:
        raise UnknownError(f"no global key is kept from node {peer!r}")
    return st


def received(st: DecState, blocks: list[tuple[int, bytes | memoryview]],
             held: Callable[[int], bytes | None]
             ) -> tuple[list[AckStatus], dict[int, bytes], Writes]:
    """Blocks from the peer: per block STORED, DUPLICATE (same bytes held already) or
    CONFLICT (other bytes held: kept, the new ones refused); the new blocks and their
    writes. ``held`` reads a held block's bytes."""
    w = Writes()
    results, new = [], {}
    for seq, data in blocks:
        have = new.get(seq)  # the same block twice in this batch (a resend)
        if have is None and seq in st.blocks:
            have = held(seq)
        status = receive_status(have, data)
        if status == AckStatus.STORED:
            new[seq] = bytes(data)
            w.put(seq_key(BLOCK, seq), new[seq])
            w.put(seq_key(META, seq), pack_meta(len(data), BlockState.USABLE))
        results.append(status)
    return results, new, w


def check_key(st: DecState, node_id: int, kid: KeyId) -> KeySlice:
    """The slice a key ID names, if it is a key from the peer to this node held here;
    UnknownError otherwise."""
    try:
        s = decode(kid)
    except CarveError as e:
        raise UnknownError(f"key ID {show(kid)}: {e}") from None
    if s.origin != st.peer_id or s.destination != node_id:
        raise UnknownError(f"key ID {show(kid)} is not a key from {st.peer} to here")
    size = st.blocks.get(s.seq)
    if size is None or s.offset + s.size > size:
        raise UnknownError(f"key ID {show(kid)}: no such key stored here")
    return s


def reservation(st: DecState, node_id: int, key_ids: list[KeyId], saes: tuple[str, ...],
                carved_to: Cursor | None, rseq: int | None, master: str,
                record: Lookup) -> Reservation:
    """Let ``saes`` fetch these keys once each. Reservations follow the origin's carving
    order: each key must start at or after the end of the last one reserved, so a key
    delivered (or reserved) once is never reserved again and no two reserved keys share a
    byte (UnknownError); repeating an identical reservation changes nothing. A numbered
    one (``rseq``, from the master's node) is fetchable once that node confirms it.
    ``carved_to``, the origin's carving cursor, moves the cursor on; BadRequest if it lies
    beyond the blocks held here."""
    named = (*saes, *([master] if master else []))
    if any(not SAE_ID_RE.fullmatch(x) for x in named):  # the record separates names with
        raise BadRequest("a reservation names something that is not an SAE ID")  # bytes
    if carved_to is not None and ((carved_to.seq, carved_to.offset) > st.reach()
                                  or carved_to.offset > MAX_BLOCK):
        raise BadRequest(f"carved to block {carved_to.seq} at {carved_to.offset}: beyond "
                         f"the end of the blocks held here (block {st.top})")
    owner = reservation_record(master, saes)
    if rseq is not None:  # from the master's node: fetchable once it confirms
        owner = UNCONFIRMED + owner
    cur = st.cursor
    new: list[tuple[bytes, KeySlice]] = []
    for kid in key_ids:
        s = check_key(st, node_id, kid)
        rid = reservation_key(kid)
        if (s.seq, s.offset) < (cur.seq, cur.offset):
            if record(rid) in (owner, owner.removeprefix(UNCONFIRMED)):
                continue  # the same reservation again
            raise UnknownError(f"key ID {show(kid)} is already reserved or delivered, "
                               "or overlaps a key that is")
        new.append((rid, s))
        cur = Cursor(s.seq, s.offset + s.size)
    if carved_to is not None and (carved_to.seq, carved_to.offset) > (cur.seq, cur.offset):
        cur = carved_to
    return Reservation(owner, new, cur, rseq)


def delivery(st: DecState, node_id: int, key_ids: list[str], sae: str, master: str | None,
             holder: tuple[int, int] | None, alive: Callable[[int], bool],
             record: Lookup) -> list[Fetch]:
    """What ``sae`` may fetch of these keys, all or none: each key once to each SAE it
    was reserved for, and, when ``master`` is given, only if that master SAE took it.
    Refused with BadRequest (a key named twice), UnknownError, ForbiddenError,
    PendingError (reservation not yet confirmed) or DeliveringError (handed to ``sae``
    in an answer still being written, which only its own request, or a lost answer, may
    hand again: :func:`may_hand_again`)."""
    decoded = [check_key(st, node_id, kid) for kid in key_ids]
    if len(set(decoded)) != len(decoded):
        raise BadRequest("a key ID is named twice")
    total = sum(s.size for s in decoded)
    if total > MAX_API_REQUEST_BYTES:  # as for enc_keys: a slave naming the keys of many
        raise BadRequest(  # takes at once would have up to a GiB read, joined and encoded
            f"the keys named are {total} bytes, above the {MAX_API_REQUEST_BYTES >> 20} "
            f"MiB one answer may carry: ask for them in parts")
    seqs = {s.seq for s in decoded}
    read = sum(st.blocks[seq] for seq in seqs)
    if read > MAX_API_READ_BYTES:  # the store reads whole blocks: keys one to a block (8
        raise BadRequest(  # bytes each, the rest of each block another SAE's) had a GiB
            # read per request, again after every answer its reader cut short
            f"the keys named lie in {len(seqs)} blocks of {read} bytes here, above the "
            f"{MAX_API_READ_BYTES >> 20} MiB one request may have read: ask for them in "
            f"parts")
    fetches, unconfirmed, in_flight = [], [], []
    for kid, s in zip(key_ids, decoded, strict=True):
        rid = reservation_key(kid)
        owner = record(rid)
        if owner is None:
            raise UnknownError(f"key ID {kid} is unknown or already delivered")
        left = deliver_from_record(owner.removeprefix(UNCONFIRMED), kid, sae, master)
        if owner.startswith(UNCONFIRMED):
            unconfirmed.append(kid)
        prev = st.handed.get(handed_key(kid, sae))
        if prev is not None and (holder is None or not may_hand_again(
                prev, *holder, alive(prev.holder))):
            in_flight.append(kid)
        fetches.append(Fetch(rid, s, left))
    if unconfirmed:
        more = f" and {len(unconfirmed) - 1} more" if len(unconfirmed) > 1 else ""
        raise PendingError(f"key ID {unconfirmed[0]}{more}: not yet confirmed by the "
                           "master's key manager")
    if in_flight:
        more = f" and {len(in_flight) - 1} more" if len(in_flight) > 1 else ""
        raise DeliveringError(f"key ID {in_flight[0]}{more}: an answer to SAE {sae} "
                              "carrying it is being delivered on another connection; "
                              "nothing was taken")
    return fetches
