"""The destination's decisions (control/gkm/destination.py), driven without sockets: a
real KeyStore in a tmp dir (or a fake where the store must fail), arrived messages built
with control.gkm.wire, and the proof each connection gave."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import pytest

from control.gkm import seeds
from control.gkm.destination import (
    MAX_HELD,
    MAX_HELD_KEYS,
    MAX_HELD_KEYS_PER_SAE,
    MAX_HELD_LARGE_KEYS,
    MAX_HELD_PER_SAE,
    Arrived,
    Inbox,
    Node,
    may_hold,
)
from control.gkm.errors import StoreFailed
from control.gkm.store import BlockState, KeyStore
from control.gkm.store_rules import RESERVED
from control.gkm.wire import (
    Ack,
    AckStatus,
    Blocks,
    Reserve,
    Reserved,
    ReserveStatus,
    parse,
    parse_batch,
)
from dataplane.limits import MAX_RELAY_BLOCKS

A, B, C = 1, 2, 3
NODES = {A: Node("A", "10.0.0.1"), B: Node("B", "10.0.0.2"), C: Node("C", "10.0.0.3")}
FROM_A = ("A", "10.0.0.1")
AHEAD = 8


def inbox(store, origins=("A",)) -> Inbox:
    return Inbox(B, "B", NODES, set(origins), AHEAD, store)


def dest(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "b", B, {}, {"A": A})


def blocks(*seqs: int, data: bytes | None = None, origin: int = A,
           destination: int = B) -> Blocks:
    return Blocks(origin, destination, tuple((s, data or os.urandom(64)) for s in seqs))


def acks(out) -> list[list[tuple[int, AckStatus]]]:
    """Each answer's (seq, status) list, in order."""
    got = []
    for ident, *frames in out.answers:
        msg = parse(frames)
        assert isinstance(msg, Ack) and msg.destination == B
        got.append((ident, list(msg.results)))
    return got


def test_new_blocks_are_stored_and_acknowledged_stored(tmp_path):
    store = dest(tmp_path)
    box = inbox(store)
    msg = blocks(0, 1)
    out = box.receive([Arrived(b"id", [msg], FROM_A)])
    assert acks(out) == [(b"id", [(0, AckStatus.STORED), (1, AckStatus.STORED)])]
    assert out.refusals == []
    assert store.block("dec", "A", 1) == msg.blocks[1][1]
    assert (box.received_blocks, box.received_bytes) == (2, 128)
    store.close()


def test_a_resend_is_duplicate_and_other_bytes_are_a_conflict(tmp_path):
    store = dest(tmp_path)
    box = inbox(store)
    first = blocks(0, 1)
    box.receive([Arrived(b"id", [first], FROM_A)])
    again = Blocks(A, B, (first.blocks[0], (1, os.urandom(64))))
    out = box.receive([Arrived(b"id", [again], FROM_A)])
    assert acks(out) == [(b"id", [(0, AckStatus.DUPLICATE), (1, AckStatus.CONFLICT)])]
    assert store.block("dec", "A", 1) == first.blocks[1][1]  # the first bytes kept
    assert box.received_blocks == 2  # neither counts again
    store.close()


def test_blocks_from_a_node_other_than_the_one_proven_are_refused_unanswered(tmp_path):
    store = dest(tmp_path)
    box = inbox(store, origins=("A", "C"))
    out = box.receive([Arrived(b"c", [blocks(0)], ("C", "10.0.0.1")),      # C claims A
                       Arrived(b"x", [blocks(0)], ("A", "10.9.9.9")),      # wrong address
                       Arrived(b"y", [blocks(0)], (None, None)),          # no proof
                       Arrived(b"z", [blocks(0, origin=9)], FROM_A)])    # unknown node
    assert out.answers == []
    assert out.refusals == [
        "a message claiming origin id 1 came from node C at 10.0.0.1",
        "a message claiming origin id 1 came from node A at 10.9.9.9",
        "a message claiming origin id 1 came from node None at None",
        "a message claiming origin id 9 came from node A at 10.0.0.1"]
    assert store.block("dec", "A", 0) is None
    store.close()


def test_blocks_of_a_pair_not_kept_here_are_answered_refused(tmp_path):
    store = dest(tmp_path)
    box = inbox(store)
    out = box.receive([
        Arrived(b"1", [blocks(0, destination=C)], FROM_A),  # for another node
        Arrived(b"2", [blocks(0, origin=C)], ("C", "10.0.0.3"))])  # C sends none here
    assert acks(out) == [(b"1", [(0, AckStatus.REFUSED)]), (b"2", [(0, AckStatus.REFUSED)])]
    assert out.refusals == ["blocks from A for node id 3: not a pair this node keeps",
                            "blocks from C for node id 2: not a pair this node keeps"]
    assert store.block("dec", "A", 0) is None
    store.close()


def test_blocks_too_far_ahead_are_refused(tmp_path):
    store = dest(tmp_path)
    box = inbox(store)
    out = box.receive([Arrived(b"id", [blocks(AHEAD + 1)], FROM_A)])
    assert acks(out) == [(b"id", [(AHEAD + 1, AckStatus.REFUSED)])]
    assert out.refusals == [f"blocks from A numbered up to {AHEAD + 1}: more than {AHEAD} "
                            f"past the highest held; refused"]
    out = box.receive([Arrived(b"id", [blocks(AHEAD)], FROM_A)])  # just within reach
    assert acks(out) == [(b"id", [(AHEAD, AckStatus.STORED)])]
    store.close()


def test_an_acknowledgement_at_the_relay_port_is_refused(tmp_path):
    store = dest(tmp_path)
    out = inbox(store).receive([Arrived(b"id", [Ack(A, B, ((0, AckStatus.STORED),))],
                                        FROM_A)])
    assert out.answers == [] and out.refusals == [
        "an acknowledgement arrived at the relay port"]
    store.close()


class FailingStore:
    """A store whose disk is full: nothing is kept. Records the group commit."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.dec = {"A": self}
        self.last_refused = ""

    @contextlib.contextmanager
    def group(self):
        self.events.append("group")
        yield
        self.events.append("sync")

    def beyond_reach(self, seq: int, ahead: int) -> bool:
        return False

    def store_received(self, peer, blocks):
        self.events.append(f"store {peer} {[s for s, _ in blocks]}")
        raise OSError("no space left on device")

    def apply_reservation(self, peer, msg):
        raise OSError("no space left on device")


def test_what_the_store_could_not_keep_gets_no_answer():
    store = FailingStore()
    box = inbox(store)
    reserve = [Reserve(A, B, 0, (0, 0), ("sae-1",), (os.urandom(16),))]
    out = box.receive([Arrived(b"1", [blocks(0)], FROM_A),
                       Arrived(b"2", [blocks(1, 2)], FROM_A),
                       Arrived(b"3", reserve, FROM_A)])
    assert out.answers == [] and box.received_blocks == 0
    # Both messages' blocks went to the store in one call, inside one group commit.
    assert store.events == ["group", "store A [0, 1, 2]", "sync"]


def _origin_reserves(tmp_path, n: int) -> tuple[KeyStore, KeyStore, list[bytes]]:
    """An origin's queued RESERVE frames for keys both ends hold (real KeyStores)."""
    o = KeyStore(tmp_path / "a", A, {"B": B}, {})
    d = dest(tmp_path)
    blocks = seeds.new_blocks(2, 256)
    seqs = o.add_pending("B", blocks)
    o.mark("B", seqs, BlockState.USABLE)
    d.store_received("A", list(zip(seqs, [b.data for b in blocks], strict=True)))
    for i in range(n):
        o.take_enc_reserved("B", 1, 32, (f"sae-{i}",))
    return o, d, [o.enc["B"].unacked[r] for r in sorted(o.enc["B"].unacked)]


def reserved(out) -> list[list[tuple[int, ReserveStatus]]]:
    got = []
    for _, *frames in out.answers:
        msgs = parse_batch(frames)
        assert all(isinstance(m, Reserved) and (m.origin, m.destination) == (A, B)
                   for m in msgs)
        got.append([(m.rseq, m.status) for m in msgs])
    return got


class FailingWrites:
    """A store's database whose next write fails as a full disk's would (rocksdict raises
    a bare Exception with RocksDB's status text); everything else is the real one."""

    def __init__(self, db):
        self.db, self.fail = db, 1

    def write(self, *args):
        if self.fail:
            self.fail -= 1
            raise Exception("IO error: No space left on device")
        return self.db.write(*args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_reservation_whose_write_failed_is_never_answered_from_memory(tmp_path):
    o, d, frames = _origin_reserves(tmp_path, 2)
    box = inbox(d)
    d.db = FailingWrites(d.db)
    # The rules move the index (next reservation number, outstanding keys) as they make
    # their writes: the write fails after the index said "applied".
    out = box.receive([Arrived(b"id", parse_batch(frames[:1]), FROM_A)])
    assert reserved(out) == [] and d.failed  # no answer: the origin resends
    # The resend must not be answered DUPLICATE from that index (the master would get keys
    # the slave's node never recorded), nor may the next reservation be applied on it.
    out = box.receive([Arrived(b"id", parse_batch(frames), FROM_A)])
    assert reserved(out) == []
    with pytest.raises(StoreFailed, match="a write failed earlier"):
        d.store_received("A", [(9, os.urandom(64))])
    # The key manager stops on it (test_gkm: run); its restart reads the disk, which never
    # had the reservation: the resend is applied, both in order, both recorded.
    d.db = d.db.db
    d.close()
    d = dest(tmp_path)
    assert d.dec["A"].next_rseq == 0
    out = inbox(d).receive([Arrived(b"id", parse_batch(frames), FROM_A)])
    assert reserved(out) == [[(0, ReserveStatus.APPLIED), (1, ReserveStatus.APPLIED)]]
    for m in parse_batch(frames):
        assert d._cf("dec", "A").get(RESERVED + bytes(m.key_ids[0])) is not None


def test_a_reservation_naming_what_is_not_an_sae_id_is_refused_and_the_next_applied(
        tmp_path):
    o, d, frames = _origin_reserves(tmp_path, 2)
    first, second = parse_batch(frames)
    box = inbox(d)
    for bad in ("\x01x", "\x00s", "a\nb", "="):  # the record's markers and separators
        for msg in (replace(first, master=bad), replace(first, saes=("sae-0", bad))):
            out = box.receive([Arrived(b"id", [msg], FROM_A)])
            assert reserved(out) == [[(0, ReserveStatus.REFUSED)]]  # skipped, not stalled
    assert "not an SAE ID" in d.dec["A"].last_refused
    out = box.receive([Arrived(b"id", [second], FROM_A)])
    assert reserved(out) == [[(1, ReserveStatus.APPLIED)]]


def test_a_group_commit_whose_sync_failed_leaves_the_store_failed(tmp_path):
    d = dest(tmp_path)

    class FailingSync(FailingWrites):
        def flush_wal(self, *args):
            raise Exception("IO error: fsync failed")

    d.db = FailingSync(d.db)
    d.db.fail = 0
    with pytest.raises(StoreFailed, match="fsync failed"), d.group():
        d.store_received("A", [(0, os.urandom(64))])  # small: logged, synced at the end
    assert d.failed
    with pytest.raises(StoreFailed):
        d.take_dec("A", [], "sae-1")
    d.db = d.db.db


def test_reservations_are_applied_in_order_and_a_gap_is_answered_gap(tmp_path):
    o, d, frames = _origin_reserves(tmp_path, 3)
    box = inbox(d)
    # 0 and 2 arrive, 1 is lost: 2 waits for it (GAP), and is applied after it.
    out = box.receive([Arrived(b"id", parse_batch([frames[0], frames[2]]), FROM_A)])
    assert reserved(out) == [[(0, ReserveStatus.APPLIED), (2, ReserveStatus.GAP)]]
    assert not out.settled  # reservations, not confirmations
    out = box.receive([Arrived(b"id", parse_batch(frames), FROM_A)])
    assert reserved(out) == [[(0, ReserveStatus.DUPLICATE), (1, ReserveStatus.APPLIED),
                              (2, ReserveStatus.APPLIED)]]
    # A confirmation applied may decide held dec requests.
    (c,) = o.confirm_acked("B", [0])
    confirmation = parse([o.enc["B"].unacked[c]])
    out = box.receive([Arrived(b"id", [confirmation], FROM_A)])
    assert reserved(out) == [[(c, ReserveStatus.APPLIED)]]
    # ... those naming its keys, and only those are looked at again
    assert out.settled == {bytes(k) for k in confirmation.key_ids} and len(out.settled) == 1
    o.close()
    d.close()


def test_reservations_from_an_unproven_or_foreign_sender(tmp_path):
    o, d, frames = _origin_reserves(tmp_path, 1)
    box = inbox(d, origins=("C",))  # A sends no key here
    out = box.receive([Arrived(b"x", parse_batch(frames), ("C", "10.0.0.3")),
                       Arrived(b"y", parse_batch(frames), FROM_A)])
    assert out.refusals == ["a message claiming origin id 1 came from node C at 10.0.0.3"]
    assert reserved(out) == [[(0, ReserveStatus.REFUSED)]]
    assert out.answers[0][0] == b"y"
    assert d.dec["A"].next_rseq == 0  # nothing applied
    o.close()
    d.close()


def _keys(n: int, start: int = 0) -> frozenset[bytes]:
    return frozenset(i.to_bytes(16, "big") for i in range(start, start + n))


def test_one_sae_holds_at_most_its_share_of_the_requests_waiting_for_confirmation():
    one = _keys(1)
    assert may_hold([], "s1", one)
    mine = [("s1", _keys(1, i + 1)) for i in range(MAX_HELD_PER_SAE - 1)]
    assert may_hold(mine, "s1", one)
    at_share = [*mine, ("s1", _keys(1, 10_000))]
    assert not may_hold(at_share, "s1", one)  # s1 at its share
    assert may_hold(at_share, "s2", one)      # ... the others still wait
    others = [(f"s{i % 7 + 2}", _keys(1, 20_000 + i)) for i in range(MAX_HELD - MAX_HELD_PER_SAE)]
    assert not may_hold([*at_share, *others], "s9", one)  # all of them: nobody
    assert may_hold([*mine, *others], "s9", one)


def test_what_waits_is_bounded_by_the_key_ids_it_names_and_an_sae_waits_for_a_key_once():
    big = _keys(MAX_RELAY_BLOCKS)  # one request as large as the key API may allow
    assert may_hold([], "s1", big)  # an SAE's one request waits, whatever its size
    assert not may_hold([("s1", big)], "s1", _keys(1, 1 << 20))  # not a second one then
    share = _keys(MAX_HELD_KEYS_PER_SAE)
    assert may_hold([("s1", _keys(1, 1 << 20))], "s1", _keys(MAX_HELD_KEYS_PER_SAE - 1))
    assert not may_hold([("s1", _keys(1, 1 << 20))], "s1", share)  # past its share
    # The same keys asked again by the same SAE do not wait twice: repeating one large
    # request is what made every re-check of the held requests cost seconds.
    assert not may_hold([("s1", _keys(4))], "s1", _keys(1, 3))
    assert may_hold([("s1", _keys(4))], "s2", _keys(1, 3))  # another slave of those keys
    full = [("s0", big), *((f"s{i}", _keys(MAX_HELD_KEYS_PER_SAE, i << 20))
                           for i in range(1, 5))]
    assert sum(len(k) for _, k in full) == MAX_HELD_KEYS
    assert not may_hold(full, "s9", one := _keys(1, 1 << 30))  # all key IDs taken
    assert may_hold(full[:-1], "s9", one)


def test_large_first_requests_waiting_leave_the_others_room():
    held = [("s1", _keys(MAX_RELAY_BLOCKS))]  # at the largest max_key_per_request
    # A second SAE's request as large does not wait: two of them took every key ID that
    # may wait, and every other slave's request for keys not yet confirmed got 503.
    assert not may_hold(held, "s2", _keys(MAX_RELAY_BLOCKS, 1 << 20))
    assert not may_hold(held, "s2", _keys(MAX_HELD_KEYS_PER_SAE + 1, 1 << 20))
    assert may_hold(held, "s2", _keys(MAX_HELD_KEYS_PER_SAE, 1 << 20))  # its share: waits
    # Nor do several smaller large ones: half the key IDs in all.
    half = MAX_HELD_LARGE_KEYS // 2
    two = [(f"s{i}", _keys(half, i << 20)) for i in (1, 2)]
    assert not may_hold(two[:1], "s3", _keys(half + 1, 3 << 20))
    assert may_hold(two[:1], "s3", _keys(half, 3 << 20))
    assert not may_hold(two, "s3", _keys(MAX_HELD_KEYS_PER_SAE + 1, 3 << 20))
    # What stays is for requests within their SAE's share, from any number of SAEs.
    rest = [(f"s{i}", _keys(MAX_HELD_KEYS_PER_SAE, i << 21)) for i in range(3, 6)]
    assert may_hold([*two, *rest], "s9", _keys(MAX_HELD_KEYS_PER_SAE, 1 << 30))
