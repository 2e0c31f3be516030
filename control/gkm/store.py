"""A node's global key stores in RocksDB (rocksdict): per peer an ENC and a DEC store.

One database per node (``<state dir>/gkm``), one column family per store: ``enc.<peer>``
holds the blocks this node originated for ``peer``, ``dec.<peer>`` the blocks it received
from ``peer``. What each operation may do, and the records it writes (layout in
``control.gkm.store_rules``), the rules decide; this module opens the database, reads
records for them and makes their writes.

Every change is one write batch, so a crash leaves all of it or none. Writes that others
rely on are synced before anyone hears of them: a received block before it is
acknowledged (invariant 4), a take before its keys are returned (a taken key never comes
back), and a pending block before it is sent: its seed, not its bytes (see
``add_pending``).
Only the GKM process opens the database (RocksDB locks it); other processes take keys
through it (``control.gkm.client``). One lock serialises takers within the process.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rocksdict import AccessType, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from control.gkm import seeds
from control.gkm import store_rules as rules
from control.gkm.carving import Cursor, KeySlice, decode
from control.gkm.errors import BusyError, StoreError, StoreFailed
from control.gkm.store_rules import (
    AHEAD,
    BLOCK,
    HANDED,
    META,
    QUEUED,
    RESERVED,
    SEED,
    BlockState,
    DecState,
    EncState,
    Handing,
    Writes,
    seq_key,
)
from dataplane.limits import MAX_RELAY_BLOCKS

if TYPE_CHECKING:
    from control.gkm.wire import ReserveStatus

__all__ = ["BlockState", "KeyStore", "StoreError"]  # the manager's and the tests' names

BULK_WRITE = 1 << 20  # a batch of blocks this large is flushed rather than logged
CACHED_BLOCKS = 4     # blocks kept in memory for takes that cut many keys from one block


def _scan(cf, tag: bytes):
    """(key without the tag, value) of every entry whose key starts with ``tag``."""
    it = cf.iter()
    it.seek(tag)
    while it.valid() and it.key()[:len(tag)] == tag:
        yield it.key()[len(tag):], it.value()
        it.next()


def _held_by_another_process(e: Exception) -> bool:
    """Whether opening failed on RocksDB's lock file. rocksdict raises a bare Exception
    carrying RocksDB's status text, with no type, errno or status code to tell a lock
    apart, so this one check reads the text."""
    return "lock" in str(e).lower()


class KeyStore:
    def __init__(self, path: Path, node_id: int, enc_peers: dict[str, int],
                 dec_peers: dict[str, int], read_only: bool = False):
        """Open (creating if needed) the stores for the given peers (name -> node id);
        BusyError if another process holds the database."""
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
            if _held_by_another_process(e):
                raise BusyError(f"key store {self.path} is open in another process (the "
                                "node's global key manager)") from None
            raise
        self.synced = WriteOptions()
        self.synced.sync = True
        self.unsynced = WriteOptions()
        self.no_wal = WriteOptions()
        self.no_wal.disable_wal = True
        self._deferred = False  # inside group(): durable writes wait for one sync
        self._dirty = False
        self.failed: str | None = None  # why a write failed; then every write is refused
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
                    self._write(self.db.flush_wal, True)

    # ---- failing --------------------------------------------------------------------------

    def _write(self, fn: Callable[..., object], *args: object) -> None:
        """Every write to RocksDB goes through here. The rules change the in-memory index
        as they make their writes, so once a write fails that index may say what the
        disk does not (a reservation applied, a block forgotten): the store is then
        *failed* and refuses every later write and answer (StoreFailed) until the process
        is restarted and reads the disk again."""
        self.check_usable()
        try:
            fn(*args)
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"[:300]
            raise StoreFailed(f"key store {self.path}: a write failed ({self.failed})") \
                from e

    def check_usable(self) -> None:
        """StoreFailed once a write has failed."""
        if self.failed is not None:
            raise StoreFailed(f"key store {self.path}: a write failed earlier "
                              f"({self.failed}); restart to read the disk again")

    # ---- writing ----------------------------------------------------------------------------

    def _batch(self, kind: str, peer: str, writes: Writes) -> WriteBatch:
        """The rules' writes as one RocksDB batch; blocks it deletes leave the cache."""
        h = self._handle(kind, peer)
        wb = WriteBatch(raw_mode=True)
        for key, value in writes.ops:
            if value is None:
                wb.delete(key, h)
            else:
                wb.put(key, value, h)
        for seq in writes.deleted_blocks():
            self._evict(kind, peer, seq)
        return wb

    def _durable(self, kind: str, peer: str, writes: Writes) -> None:
        """Write, synced before return (inside group(): synced when the group ends)."""
        wb = self._batch(kind, peer, writes)
        if self._deferred:
            self._write(self.db.write, wb, self.unsynced)
            self._dirty = True
        else:
            self._write(self.db.write, wb, self.synced)

    def _unsynced(self, kind: str, peer: str, writes: Writes) -> None:
        """Write, not synced: for changes a crash may lose (see each caller)."""
        self._write(self.db.write, self._batch(kind, peer, writes), self.unsynced)

    def _write_blocks(self, peer: str, writes: Writes, nbytes: int) -> None:
        """Write a batch of received blocks, durably. Large batches skip the write-ahead
        log and flush the store's memtable to disk at once (synced), so each key byte is
        written to disk once, not twice (log, then table): the disk, not the CPU, bounds
        the relay rate. Small batches go through the log, synced, which is cheaper than a
        flush for a few KiB."""
        if nbytes >= BULK_WRITE:
            self._write(self.db.write, self._batch("dec", peer, writes), self.no_wal)
            self._write(self._cf("dec", peer).flush, True)
        else:
            self._durable("dec", peer, writes)

    # ---- reading ----------------------------------------------------------------------------

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

    def _lookup(self, kind: str, peer: str) -> rules.Lookup:
        return self._cf(kind, peer).get

    def _read_block(self, kind: str, peer: str, seq: int, size: int | None = None
                    ) -> bytes | None:
        """A block's bytes from the store: an ENC block's grown from its seed (a block
        stored before seeds were has its bytes); None if the store has neither. ``size``:
        the block's, if the index may not have it (else read there)."""
        cf = self._cf(kind, peer)
        if kind == "enc":
            seed = cf.get(seq_key(SEED, seq))
            if seed is not None:
                if size is None:
                    size = self.enc[peer].blocks[seq][0]
                return seeds.expand(seed, size)
        return cf.get(seq_key(BLOCK, seq))

    def _block(self, kind: str, peer: str, seq: int) -> bytes:
        """A block's bytes; the last few read are kept, so taking many small keys from one
        block reads (or grows) it once. Blocks never change once stored; deleted ones are
        evicted."""
        k = (kind, peer, seq)
        data = self._cache.get(k)
        if data is None:
            data = self._read_block(kind, peer, seq)
            if data is None:
                raise KeyError(f"block {seq} of {kind}.{peer} is not in the store")
            self._cache[k] = data
            if len(self._cache) > CACHED_BLOCKS:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(k)
        return data

    def _blocks(self, kind: str, peer: str, slices: list[KeySlice]) -> dict[int, bytes]:
        """The bytes of the blocks these slices lie in, each read once."""
        data: dict[int, bytes] = {}
        for s in slices:
            if s.seq not in data:
                data[s.seq] = self._block(kind, peer, s.seq)
        return data

    def _evict(self, kind: str, peer: str, seq: int) -> None:
        self._cache.pop((kind, peer, seq), None)

    def _metas(self, kind: str, peer: str):
        for key, value in _scan(self._cf(kind, peer), META):
            yield (rules.seq_of(key), *rules.unpack_meta(value))

    def _load_enc(self, peer: str, peer_id: int) -> EncState:
        st = EncState(peer, peer_id)
        cf = self._cf("enc", peer)
        for seq, size, bst in self._metas("enc", peer):
            st.set(seq, size, bst)
        st.next_seq = rules.read_u64(cf.get(rules.NEXT_BLOCK))
        st.cursor = rules.read_cursor(cf.get(rules.CURSOR))
        st.next_rseq = rules.read_u64(cf.get(rules.NEXT_RESERVE))
        st.unacked = {rules.seq_of(k): v for k, v in _scan(cf, QUEUED)}
        return st

    def _load_dec(self, peer: str, peer_id: int) -> DecState:
        st = DecState(peer, peer_id)
        cf = self._cf("dec", peer)
        st.cursor = rules.read_cursor(cf.get(rules.CURSOR))
        for seq, size, _ in self._metas("dec", peer):
            st.add_block(seq, size)
        st.next_rseq = rules.read_u64(cf.get(rules.NEXT_APPLIED))
        for key, _ in _scan(cf, RESERVED):
            st.add_outstanding(rules.reserved_block(key))
        st.handed = {HANDED + key: Handing.unpack(value) for key, value in _scan(cf, HANDED)}
        return st

    # ---- the origin's side ----------------------------------------------------------------

    def add_pending(self, peer: str, blocks: list[seeds.Block]) -> list[int]:
        """Store new blocks for ``peer`` as pending before they are sent, so a resend
        after a crash carries the same bytes: their seeds (32 bytes a block, synced; the
        bytes are grown from them again when needed), so the origin's disk never takes a
        block's bytes. A block number made again after a store lost its write would get
        other bytes, which the destination answers with CONFLICT if it held the first
        ones, and that block is never used."""
        with self.lock:
            assert not self._deferred, "inside group() the sync would come after the send"
            st = self.enc[peer]
            seqs, writes = rules.pending_blocks(st, blocks)
            self._durable("enc", peer, writes)
            st.add_pending(seqs, [len(b.data) for b in blocks])
            return seqs

    def pending(self, peer: str) -> list[int]:
        with self.lock:
            return sorted(s for s, (_, st) in self.enc[peer].blocks.items()
                          if st == BlockState.PENDING)

    def block(self, kind: str, peer: str, seq: int) -> bytes | None:
        with self.lock:
            if kind == "enc" and seq not in self.enc[peer].blocks:
                return None
            return self._read_block(kind, peer, seq)

    def mark(self, peer: str, seqs: list[int], state: BlockState) -> None:
        """Acknowledged (USABLE) or refused (CONFLICT) by the destination. Not synced: if
        lost in a crash the block is pending again, resent, and acknowledged again."""
        with self.lock:
            st = self.enc[peer]
            changed, writes = rules.marking(st, seqs, state)
            if changed:
                self._unsynced("enc", peer, writes)
                for seq, size in changed:
                    st.set(seq, size, state)

    def take_enc(self, peer: str, number: int, size: int) -> list[tuple[KeySlice, bytes]]:
        """Cut ``number`` keys of ``size`` bytes for ``peer``, atomically and durably;
        ShortError and nothing taken when there is not enough usable key."""
        return self._take(peer, number, size, ())[0]

    def take_enc_reserved(self, peer: str, number: int, size: int, saes: tuple[str, ...],
                          master: str = "") -> tuple[list[tuple[KeySlice, bytes]], int]:
        """As take_enc, and in the same synced batch a numbered reservation of the keys
        for ``saes``, taken by ``master`` (the RESERVE message for the peer, kept until it
        acknowledges)."""
        out, rseq = self._take(peer, number, size, saes, master)
        assert rseq is not None
        return out, rseq

    def _take(self, peer: str, number: int, size: int, saes: tuple[str, ...],
              master: str = "", ahead: bool = False
              ) -> tuple[list[tuple[KeySlice, bytes]], int | None]:
        """A take, durable; with ``ahead``, each key also kept as an ``a`` record in the
        same batch (:meth:`reserve_ahead`)."""
        with self.lock:
            st = rules.enc_store(self.enc, peer)
            t = rules.take(st, self.node_id, number, size, saes, master)
            data = self._blocks("enc", peer, t.slices)
            out = [(s, data[s.seq][s.offset:s.offset + s.size]) for s in t.slices]
            if ahead:
                assert t.rseq is not None
                for s, key in out:
                    t.writes.put(AHEAD + s.id_bytes,
                                 rules.ahead_record(t.rseq, master, saes, key))
            self._durable("enc", peer, t.writes)
            st.apply_take(t)
            return out, t.rseq

    def cancel_reservation(self, peer: str, rseq: int) -> int | None:
        """The taker of reservation ``rseq`` gave up before the slave's node confirmed:
        queue a numbered cancellation of the same keys (applied after it, in order), so
        they do not stay reserved for ever. Returns its number (None: nothing to do)."""
        with self.lock:
            key_ids = rules.reserved_keys(self.enc[peer], rseq)
            return None if key_ids is None else self.cancel_keys(peer, key_ids)

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
        with self.lock:
            done, groups = rules.confirmations(self.enc[peer], rseqs)
            return self._queue(peer, done, groups, confirm=True)

    def _queue(self, peer: str, acked: list[int], groups: list[list[bytes]],
               confirm: bool) -> list[int]:
        """In one synced batch: forget the acknowledged reservations ``acked`` and queue
        one numbered cancellation (or confirmation) per group of key IDs."""
        st = self.enc[peer]
        msgs, writes = rules.queued(st, self.node_id, acked, groups, confirm)
        self._durable("enc", peer, writes)
        st.apply_queued(acked, msgs)
        return list(msgs)

    def cancel_unanswered(self, peer: str, keep: Collection[int] = ()) -> list[int]:
        """At start: a reservation not yet acknowledged by ``peer`` has a taker that was
        never answered (takers hear only after the acknowledgement) and never will be,
        since the process that held it is gone. Cancel each that is not cancelled yet,
        except those numbered in ``keep`` (made ahead of demand: no taker waits on
        them); returns the cancellations' numbers."""
        with self.lock:
            return [self.cancel_keys(peer, key_ids)
                    for key_ids in rules.unanswered(self.enc[peer], keep)]

    # ---- keys reserved ahead of demand (control.gkm.ahead) ---------------------------------

    def reserve_ahead(self, peer: str, number: int, size: int, slaves: tuple[str, ...],
                      master: str) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Cut ``number`` keys as :meth:`take_enc_reserved` does, and keep them here (an
        ``a`` record each, in the same synced batch as the take and its reservation)
        until they are handed out or cancelled. Returns the reservation's number and the
        keys (ID, bytes) in carving order."""
        out, rseq = self._take(peer, number, size, slaves, master, ahead=True)
        assert rseq is not None
        return rseq, [(s.id_bytes, key) for s, key in out]

    def take_ahead(self, peer: str, key_ids: list[bytes]) -> int:
        """Hand out keys reserved ahead: in one synced batch, forget their records and
        queue the numbered confirmation that makes them fetchable at ``peer`` (the taker
        is answered only after this returns, as after :meth:`confirm_acked`). Returns
        the confirmation's number."""
        return self._drop_ahead(peer, key_ids, confirm=True)[0]

    def cancel_ahead(self, peer: str, key_ids: list[bytes]) -> list[int]:
        """Keys reserved ahead that nobody will get: forget them and, in the same synced
        batch, queue their numbered cancellation (applied at ``peer`` after their
        reservation, in order). Returns the cancellations' numbers."""
        return self._drop_ahead(peer, key_ids, confirm=False)

    def forget_ahead(self, peer: str, key_ids: list[bytes]) -> None:
        """Keys reserved ahead whose reservation ``peer`` refused: nothing is reserved
        there, so nothing to cancel; forget them (lost, never reused)."""
        self._drop_ahead(peer, key_ids, confirm=False, tell=False)

    def _drop_ahead(self, peer: str, key_ids: list[bytes], confirm: bool,
                    tell: bool = True) -> list[int]:
        """Forget keys held ahead and, with ``tell``, queue their numbered confirmation
        (or cancellation) in the same synced batch; the messages' numbers."""
        with self.lock:
            st = rules.enc_store(self.enc, peer)
            groups = [key_ids[at:at + MAX_RELAY_BLOCKS]
                      for at in range(0, len(key_ids), MAX_RELAY_BLOCKS)] if tell else []
            msgs, writes = rules.queued(st, self.node_id, [], groups, confirm)
            for kid in key_ids:
                writes.delete(AHEAD + kid)
            self._durable("enc", peer, writes)
            st.apply_queued([], msgs)
            return list(msgs)

    def ahead_records(self, peer: str) -> list[tuple[bytes, int, str, tuple[str, ...],
                                                     bytes]]:
        """Every key held ahead for ``peer``: (ID, reservation number, master, slaves,
        bytes), in carving order."""
        with self.lock:
            recs = [(bytes(k), *rules.read_ahead(v))
                    for k, v in _scan(self._cf("enc", peer), AHEAD)]
        def carving_order(r: tuple) -> tuple[int, int, int]:
            where = decode(uuid.UUID(bytes=r[0]))
            return r[1], where.seq, where.offset

        return sorted(recs, key=carving_order)

    def reservation_acked(self, peer: str, rseq: int) -> None:
        with self.lock:
            if self.enc[peer].unacked.pop(rseq, None) is not None:
                writes = Writes()
                writes.delete(seq_key(QUEUED, rseq))
                self._unsynced("enc", peer, writes)  # lost: resent, answered DUPLICATE

    # ---- the destination's side -----------------------------------------------------------

    def store_received(self, peer: str, blocks: list[tuple[int, bytes | memoryview]]
                       ) -> list[str]:
        """Store blocks from ``peer`` durably; per block 'stored', 'duplicate' (same bytes
        held already) or 'conflict' (other bytes held: kept, the new ones refused)."""
        with self.lock:
            st = self.dec[peer]
            cf = self._cf("dec", peer)
            results, new, writes = rules.received(
                st, blocks, lambda seq: cf.get(seq_key(BLOCK, seq)))
            if new:
                self._write_blocks(peer, writes, sum(len(b) for b in new.values()))
                for seq, data in new.items():
                    st.add_block(seq, len(data))
            return results

    def reserve(self, peer: str, key_ids: list[str], sae: str,
                carved_to: Cursor | None = None) -> None:
        """Let ``sae`` fetch these keys from ``peer`` once (see
        :func:`control.gkm.store_rules.reservation`). Repeating an identical reservation
        is a no-op (the origin may resend). ``carved_to`` is the origin's carving cursor:
        nothing before it will ever be reserved, so blocks wholly behind it are deleted as
        soon as their reserved keys are delivered."""
        with self.lock:
            self._reserve(rules.dec_store(self.dec, peer), peer, key_ids, (sae,), carved_to,
                          None, "")

    def apply_reservation(self, peer: str, msg) -> ReserveStatus:
        """A RESERVE from ``peer``, applied in its numbered order exactly once."""
        from control.gkm.wire import ReserveStatus

        with self.lock:
            self.check_usable()  # the index may be ahead of the disk: no answer from it
            st = rules.dec_store(self.dec, peer)
            if msg.rseq < st.next_rseq:  # a resend: answered as the first time
                refused = self._cf("dec", peer).get(seq_key(rules.REFUSED_HERE, msg.rseq))
                return ReserveStatus.DUPLICATE if refused is None else ReserveStatus.REFUSED
            if msg.rseq > st.next_rseq:
                return ReserveStatus.GAP
            ids: list[rules.KeyId] = [bytes(k) for k in msg.key_ids]
            if msg.confirm:
                self._durable("dec", peer, st.confirm(ids, msg.rseq,
                                                      self._lookup("dec", peer)))
                return ReserveStatus.APPLIED
            try:
                self._reserve(st, peer, ids, msg.saes, Cursor(*msg.carved_to), msg.rseq,
                              msg.master)
            except StoreError as e:  # skip it, or every later one would wait forever
                st.last_refused = f"reservation {msg.rseq}: {e}"
                self._durable("dec", peer, st.cancel([], msg.rseq, self._lookup("dec", peer),
                                                     refused=True))
                return ReserveStatus.REFUSED
            return ReserveStatus.APPLIED

    def _reserve(self, st: DecState, peer: str, key_ids: list[rules.KeyId],
                 saes: tuple[str, ...], carved_to: Cursor | None, rseq: int | None,
                 master: str) -> None:
        """A reservation for ``saes``, or with none a cancellation, made durable."""
        record = self._lookup("dec", peer)
        if not saes:
            writes = st.cancel(key_ids, rseq, record)
        else:
            writes = st.reserve(rules.reservation(st, self.node_id, key_ids, saes,
                                                  carved_to, rseq, master, record))
        self._durable("dec", peer, writes)

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
        answer is lost (``store_rules.may_hand_again``) or for HANDED_KEEP_S at most."""
        with self.lock:
            st = rules.dec_store(self.dec, peer)
            fetches = rules.delivery(st, self.node_id, key_ids, sae, master, holder, alive,
                                     self._lookup("dec", peer))
            data = self._blocks("dec", peer, [f.slice for f in fetches])
            out = [data[f.slice.seq][f.slice.offset:f.slice.offset + f.slice.size]
                   for f in fetches]
            if holder is not None:  # delivered once the holder confirms its answer
                self._durable("dec", peer, st.hand(key_ids, sae, holder, time.time()))
                return out
            self._durable("dec", peer, st.deliver(fetches))
            st.count(fetches)
            return out

    def answer_written(self, peer: str, key_ids: list[str], sae: str,
                       holder: tuple[int, int], written: bool) -> int:
        """The holder's word on its answer carrying these keys to ``sae``: written (the
        keys are delivered: each SAE's fetch ends, the last one's ends the key) or lost
        (they may be handed to ``sae`` again). Only the handing's own holder and request
        count; returns how many keys it settled. Not synced: a word lost in a crash
        leaves the handing to end after HANDED_KEEP_S, as delivered."""
        with self.lock:
            st = rules.dec_store(self.dec, peer)
            writes, settled = st.settle(key_ids, sae, holder, written,
                                        self._lookup("dec", peer))
            self._unsynced("dec", peer, writes)
            return settled

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
                expired = st.expire(now, alive, self._lookup("dec", peer))
                if expired is None:
                    continue
                writes, b, e = expired
                self._unsynced("dec", peer, writes)
                back += b
                ended += e
        return back, ended

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
            out = {}
            for seq, size, st in list(self._metas(kind, peer)):
                data = self._read_block(kind, peer, seq, size)  # None: a conflicting
                out[seq] = (st.name.lower(),                     # block's bytes went
                            "" if data is None else hashlib.sha256(data).hexdigest())
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
