"""The key stores' rules on plain data, no RocksDB: a refused request changes nothing, a
reservation from the master's node waits for its confirmation, one delivery per key and
SAE, and a handed key is handed again only to its own request or after a lost answer."""

from __future__ import annotations

import copy
import uuid

import pytest

from control.gkm import store_rules as rules
from control.gkm.carving import Cursor, KeySlice
from control.gkm.errors import (
    BadRequest,
    BusyError,
    DeliveringError,
    ForbiddenError,
    PendingError,
    ShortError,
    StoreError,
    UnknownError,
)
from control.gkm.store_rules import (
    HANDED_KEEP_S,
    BlockState,
    DecState,
    EncState,
    Writes,
)
from control.gkm.wire import parse

A, B = 1, 2  # the origin's and the destination's node ids


def commit(db: dict[bytes, bytes], writes: Writes) -> None:
    """What the store does with the rules' writes, on a dict."""
    for key, value in writes.ops:
        if value is None:
            db.pop(key, None)
        else:
            db[key] = value


def enc(*sizes: int, state: BlockState = BlockState.USABLE) -> EncState:
    st = EncState("B", B)
    for seq, size in enumerate(sizes):
        st.set(seq, size, state)
    st.next_seq = len(sizes)
    return st


def kid(seq: int, offset: int, size: int) -> str:
    return str(KeySlice(A, B, seq, offset, size).key_id)


def dec(*sizes: int) -> tuple[DecState, dict[bytes, bytes]]:
    st = DecState("A", A)
    for seq, size in enumerate(sizes):
        st.add_block(seq, size)
    return st, {}


def reserve(st: DecState, db: dict, ids: list[str], saes=("s1",), rseq=None,
            master="") -> None:
    r = rules.reservation(st, B, ids, tuple(saes), None, rseq, master, db.get)
    commit(db, st.reserve(r))


# ---- typed errors ------------------------------------------------------------------------

def test_each_refusal_type_carries_its_kind_for_the_wire():
    kinds = {ShortError: "short", UnknownError: "unknown", ForbiddenError: "forbidden",
             BadRequest: "bad", BusyError: "busy", PendingError: "pending",
             DeliveringError: "delivering"}
    for cls, kind in kinds.items():
        e = cls("why")
        assert isinstance(e, StoreError) and e.kind == kind and str(e) == "why"
    plain = StoreError("busy", "from the wire")  # a refusal read off a reply
    assert plain.kind == "busy" and str(plain) == "from the wire"


def test_the_key_api_maps_typed_refusals_by_kind():
    from api.kme import store_refusal

    assert store_refusal(ShortError("x").kind, "x", on_dec=False).status == 503
    assert store_refusal(BadRequest("x").kind, "x", on_dec=False).status == 400
    assert store_refusal(ForbiddenError("x").kind, "x", on_dec=True).status == 401
    assert store_refusal(UnknownError("x").kind, "x", on_dec=True).status == 400


# ---- takes (ENC) -------------------------------------------------------------------------

def test_a_take_of_more_than_usable_is_short_and_changes_nothing():
    st = enc(128, 128)
    before = copy.deepcopy(st)
    with pytest.raises(ShortError, match="256 B usable"):
        rules.take(st, A, 5, 64)
    assert st == before


def test_a_take_whose_keys_do_not_fit_the_blocks_rests_is_short_too():
    """Enough bytes in all, but a key never spans two blocks: carving finds too few."""
    st = enc(100, 100)
    before = copy.deepcopy(st)
    with pytest.raises(ShortError, match="2 of 3"):
        rules.take(st, A, 3, 60)
    assert st == before


def test_a_take_stops_at_a_pending_block():
    st = enc(64, 64, 64)
    st.set(1, 64, BlockState.PENDING)
    with pytest.raises(ShortError):
        rules.take(st, A, 2, 64)  # 128 B usable, but block 2 lies behind pending block 1
    assert len(rules.take(st, A, 1, 64).slices) == 1


def test_keys_larger_than_every_block_are_a_bad_request():
    with pytest.raises(BadRequest, match="do not fit"):
        rules.take(enc(64), A, 1, 65)
    with pytest.raises(BadRequest):
        rules.take(enc(64), A, 0, 8)


def test_a_take_moves_the_cursor_once_applied_and_deletes_used_up_blocks():
    st = enc(64, 64, 64)
    t = rules.take(st, A, 3, 32)
    assert st.cursor == Cursor(0, 0) and st.taken_keys == 0  # deciding changes nothing
    assert [(s.seq, s.offset) for s in t.slices] == [(0, 0), (0, 32), (1, 0)]
    assert t.gone == [0] and t.cursor == Cursor(1, 32) and t.rseq is None
    db: dict[bytes, bytes] = {rules.seq_key(rules.BLOCK, 0): b"x"}
    commit(db, t.writes)
    assert rules.read_cursor(db[rules.CURSOR]) == Cursor(1, 32)
    assert t.writes.deleted_blocks() == [0] and rules.seq_key(rules.BLOCK, 0) not in db
    st.apply_take(t)
    assert st.cursor == Cursor(1, 32) and 0 not in st.blocks and st.usable_bytes() == 96
    second = rules.take(st, A, 1, 32)
    assert {s.key_id for s in second.slices}.isdisjoint({s.key_id for s in t.slices})


def test_a_reserved_take_queues_its_numbered_reservation():
    st = enc(128)
    t = rules.take(st, A, 2, 32, ("s1", "s2"), master="m")
    msg = parse([t.message])
    assert t.rseq == 0 and msg.saes == ("s1", "s2") and msg.master == "m"
    assert msg.key_ids == tuple(s.key_id.bytes for s in t.slices)
    st.apply_take(t)
    assert st.unacked == {0: t.message} and st.next_rseq == 1
    assert rules.reserved_keys(st, 0) == list(msg.key_ids)
    assert rules.unanswered(st) == [list(msg.key_ids)]
    msgs, _ = rules.queued(st, A, [], [list(msg.key_ids)], confirm=False)  # cancelled
    st.apply_queued([], msgs)
    assert rules.unanswered(st) == []  # a cancellation queued already covers it


def test_the_destinations_word_changes_only_pending_blocks():
    st = enc(64, 64, state=BlockState.PENDING)
    st.set(1, 64, BlockState.USABLE)
    changed, w = rules.marking(st, [0, 1, 7], BlockState.CONFLICT)
    assert changed == [(0, 64)] and w.deleted_blocks() == [0]


# ---- reservations and deliveries (DEC) ---------------------------------------------------

def test_a_reservation_from_the_masters_node_is_not_deliverable_until_confirmed():
    st, db = dec(256)
    ids = [kid(0, 0, 32), kid(0, 32, 32)]
    reserve(st, db, ids, rseq=0)
    with pytest.raises(PendingError, match="and 1 more"):
        rules.delivery(st, B, ids, "s1", None, None, lambda _: True, db.get)
    commit(db, st.confirm(ids, 1, db.get))
    assert st.next_rseq == 2
    fetches = rules.delivery(st, B, ids, "s1", None, None, lambda _: True, db.get)
    assert [f.left for f in fetches] == [None, None]


def test_one_delivery_per_key_and_sae():
    st, db = dec(256)
    k = kid(0, 0, 32)
    reserve(st, db, [k], saes=("s1", "s2"))
    with pytest.raises(ForbiddenError):
        rules.delivery(st, B, [k], "s3", None, None, lambda _: True, db.get)
    first = rules.delivery(st, B, [k], "s1", None, None, lambda _: True, db.get)
    commit(db, st.deliver(first))
    with pytest.raises(UnknownError, match="already delivered to SAE s1"):
        rules.delivery(st, B, [k], "s1", None, None, lambda _: True, db.get)
    last = rules.delivery(st, B, [k], "s2", None, None, lambda _: True, db.get)
    assert last[0].left is None  # the last SAE named: the key is used up
    commit(db, st.deliver(last))
    assert rules.reservation_key(k) not in db and st.reserved == 0
    with pytest.raises(UnknownError, match="unknown or already delivered"):
        rules.delivery(st, B, [k], "s2", None, None, lambda _: True, db.get)


def test_a_refused_delivery_refuses_every_key_and_changes_nothing():
    st, db = dec(256)
    good, other = kid(0, 0, 32), kid(0, 32, 32)
    reserve(st, db, [good], master="m")
    reserve(st, db, [other], saes=("s9",))
    before, records = copy.deepcopy(st), dict(db)
    with pytest.raises(ForbiddenError):
        rules.delivery(st, B, [good, other], "s1", None, None, lambda _: True, db.get)
    with pytest.raises(BadRequest, match="named twice"):
        rules.delivery(st, B, [good, good.upper()], "s1", None, None, lambda _: True,
                       db.get)
    with pytest.raises(UnknownError, match="not issued to master SAE x"):
        rules.delivery(st, B, [good], "s1", "x", None, lambda _: True, db.get)
    # An SAE the key is not for hears "another SAE" whichever master it names: trying
    # master names tells it nothing of who took the key.
    for master in ("x", "m", None):
        with pytest.raises(ForbiddenError, match="belongs to another SAE"):
            rules.delivery(st, B, [good], "s7", master, None, lambda _: True, db.get)
    assert st == before and db == records


def test_key_ids_as_the_relay_carries_them_name_the_same_records_as_their_text():
    st, db = dec(256)
    ids = [kid(0, 0, 32), kid(0, 32, 32)]
    raw = [uuid.UUID(k).bytes for k in ids]
    reserve(st, db, raw, rseq=0)  # applied from the master's node: 16 bytes each
    reserve(st, db, ids, rseq=0)  # the same reservation, the keys by their text: no-op
    assert st.reserved == 2
    commit(db, st.confirm(raw, 1, db.get))
    fetches = rules.delivery(st, B, ids, "s1", None, None, lambda _: True, db.get)
    assert [f.slice.offset for f in fetches] == [0, 32]
    with pytest.raises(UnknownError, match=f"key ID {kid(3, 0, 32)}: no such key"):
        rules.reservation(st, B, [uuid.UUID(kid(3, 0, 32)).bytes], ("s1",), None, 2, "",
                          db.get)


def test_a_key_behind_the_reservation_cursor_is_never_reserved_again():
    st, db = dec(256)
    k = kid(0, 0, 32)
    reserve(st, db, [k])
    reserve(st, db, [k])  # the same reservation again: nothing new
    assert st.reserved == 1
    with pytest.raises(UnknownError, match="already reserved or delivered"):
        rules.reservation(st, B, [k], ("s2",), None, None, "", db.get)
    with pytest.raises(UnknownError, match="overlaps"):
        rules.reservation(st, B, [kid(0, 16, 32)], ("s1",), None, None, "", db.get)
    with pytest.raises(BadRequest, match="beyond the end of the blocks"):
        rules.reservation(st, B, [], ("s1",), Cursor(5, 0), None, "", db.get)
    with pytest.raises(UnknownError, match="no such key stored"):
        rules.reservation(st, B, [kid(3, 0, 32)], ("s1",), None, None, "", db.get)


def test_a_cancellation_frees_the_block_its_keys_held():
    st, db = dec(64, 64)
    k = kid(0, 0, 64)
    reserve(st, db, [k])
    commit(db, st.reserve(rules.reservation(st, B, [], ("s1",), Cursor(1, 0), None, "",
                                            db.get)))
    assert st.done() == []  # block 0 behind the cursor, its key still reserved
    w = st.cancel([k], 0, db.get)
    assert w.deleted_blocks() == [0] and 0 not in st.blocks and st.next_rseq == 1


# ---- handings ----------------------------------------------------------------------------

def handed(holder=(7, 3)) -> tuple[DecState, dict, str]:
    st, db = dec(256)
    k = kid(0, 0, 32)
    reserve(st, db, [k])
    rules.delivery(st, B, [k], "s1", None, holder, lambda _: True, db.get)
    commit(db, st.hand([k], "s1", holder, now=1000.0))
    return st, db, k


@pytest.mark.parametrize(("holder", "alive", "lost", "again"), [
    ((7, 3), True, False, True),    # the same request asked again
    ((7, 4), True, False, False),   # another request while the answer may be written
    ((8, 3), True, False, False),   # another worker
    ((8, 1), False, False, True),   # the holder died: its answer is lost
    ((8, 1), True, True, True),     # the holder reported its answer lost
])
def test_a_handed_key_is_handed_again_only_to_its_request_or_after_a_lost_answer(
        holder, alive, lost, again):
    st, db, k = handed()
    if lost:
        commit(db, st.settle([k], "s1", (7, 3), False, db.get)[0])
    ask = lambda: rules.delivery(st, B, [k], "s1", None, holder,  # noqa: E731
                                 lambda _: alive, db.get)
    if again:
        assert len(ask()) == 1
    else:
        with pytest.raises(DeliveringError, match="being delivered"):
            ask()
    with pytest.raises(DeliveringError):  # a final delivery never jumps a handing
        rules.delivery(st, B, [k], "s1", None, None, lambda _: False, db.get)


def test_a_written_answer_ends_its_handing_as_the_delivery():
    st, db, k = handed()
    w, settled = st.settle([k], "s1", (8, 3), True, db.get)  # not its holder
    assert settled == 0 and not w.ops
    w, settled = st.settle([k, "not-a-uuid"], "s1", (7, 3), True, db.get)
    commit(db, w)
    assert settled == 1 and not st.handed and st.delivered_keys == 1
    assert rules.reservation_key(k) not in db  # its only SAE had it: the key is gone
    with pytest.raises(UnknownError):
        rules.delivery(st, B, [k], "s1", None, (7, 3), lambda _: True, db.get)


def test_old_handings_end_given_back_if_lost_else_as_deliveries():
    st, db, k = handed()
    assert st.expire(1000.0 + HANDED_KEEP_S, lambda _: True, db.get) is None  # not yet
    w, back, ended = st.expire(1001.0 + HANDED_KEEP_S, lambda _: False, db.get)
    commit(db, w)
    assert (back, ended) == (1, 0) and rules.reservation_key(k) in db  # fetchable again
    commit(db, st.hand([k], "s1", (7, 4), now=2000.0))
    w, back, ended = st.expire(2001.0 + HANDED_KEEP_S, lambda _: True, db.get)
    commit(db, w)
    assert (back, ended) == (0, 1) and rules.reservation_key(k) not in db
    assert (st.answers_given_back, st.answers_expired) == (1, 1)


def test_received_blocks_stored_once_and_conflicts_kept_out():
    st, _ = dec(64)
    held = {0: b"a" * 64}
    results, new, w = rules.received(st, [(0, b"a" * 64), (0, b"b" * 64), (1, b"c" * 8),
                                          (1, b"c" * 8)], held.get)
    assert [r.name for r in results] == ["DUPLICATE", "CONFLICT", "STORED", "DUPLICATE"]
    assert new == {1: b"c" * 8} and len(w.ops) == 2
