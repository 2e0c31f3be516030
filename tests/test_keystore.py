"""The global key stores on a real RocksDB: states of a block, atomic takes, one delivery,
and what survives a kill -9."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.gkm import seeds
from control.gkm.carving import KeySlice, decode
from control.gkm.errors import StoreError
from control.gkm.store import KeyStore
from control.gkm.store_rules import (
    BLOCK,
    HANDED_KEEP_S,
    META,
    NEXT_BLOCK,
    SEED,
    BlockState,
    Handing,
    Writes,
    deliver_from_record,
    may_hand_again,
    pack_meta,
    pack_u64,
    reservation_record,
    seq_key,
)

A, B = 1, 2


def origin(tmp_path, name="a") -> KeyStore:
    return KeyStore(tmp_path / name, A, {"B": B}, {"B": B})


def dest(tmp_path, name="b") -> KeyStore:
    return KeyStore(tmp_path / name, B, {"A": A}, {"A": A})


def fill(store: KeyStore, blocks: list[seeds.Block], usable: bool = True) -> list[int]:
    seqs = store.add_pending("B", blocks)
    if usable:
        store.mark("B", seqs, BlockState.USABLE)
    return seqs


def test_pending_key_is_never_handed_out(tmp_path):
    s = origin(tmp_path)
    blocks = seeds.new_blocks(3, 64)
    seqs = fill(s, blocks, usable=False)
    assert seqs == [0, 1, 2]
    with pytest.raises(StoreError, match="not enough key") as e:
        s.take_enc("B", 1, 32)
    assert e.value.kind == "short"
    s.mark("B", [0], BlockState.USABLE)
    (sl, key), = s.take_enc("B", 1, 64)
    assert (sl.seq, sl.offset, key) == (0, 0, blocks[0].data)
    with pytest.raises(StoreError):  # block 1 still pending: carving waits for it
        s.take_enc("B", 1, 32)
    assert s.summary()["enc"]["B"]["pending"] == 128


def test_keys_are_slices_of_the_blocks_named_by_their_ids(tmp_path):
    s = origin(tmp_path)
    blocks = seeds.new_blocks(4, 100)
    fill(s, blocks)
    keys = s.take_enc("B", 5, 48) + s.take_enc("B", 2, 32)
    for sl, key in keys:
        d = decode(sl.key_id)
        assert (d.origin, d.destination) == (A, B)
        assert key == blocks[d.seq].data[d.offset:d.offset + d.size]
    assert [(k.seq, k.offset) for k, _ in keys] == [(0, 0), (0, 48), (1, 0), (1, 48),
                                                    (2, 0), (2, 48), (3, 0)]


def _records(store: KeyStore, peer: str = "B") -> dict[bytes, bytes]:
    """Every record of the ENC store for ``peer``, as on disk."""
    return dict(store._cf("enc", peer).items())


def test_the_origin_stores_a_blocks_seed_not_its_bytes_and_grows_them_again(tmp_path):
    s = origin(tmp_path)
    blocks = seeds.new_blocks(3, 4096)
    seqs = fill(s, blocks, usable=False)
    held = _records(s)
    assert {v for k, v in held.items() if k[:1] == SEED} == {b.seed for b in blocks}
    assert sum(map(len, held.values())) < 1024  # not 3 x 4 KiB
    assert not any(b.data[:16] in v for b in blocks for v in held.values())
    s.close()
    s = origin(tmp_path)  # after a restart: what a resend of the pending blocks carries
    assert [s.block("enc", "B", q) for q in seqs] == [b.data for b in blocks]
    s.mark("B", seqs, BlockState.USABLE)
    keys = s.take_enc("B", 6, 2048)
    assert b"".join(k for _, k in keys) == b"".join(b.data for b in blocks)
    assert not any(k[:1] in (SEED, BLOCK) for k in _records(s))  # used: the seeds went


def test_a_store_written_before_seeds_still_gives_its_blocks_bytes(tmp_path):
    s = origin(tmp_path)
    data = os.urandom(128)
    w = Writes()  # the records an origin wrote before it stored seeds
    w.put(seq_key(BLOCK, 0), data)
    w.put(seq_key(META, 0), pack_meta(128, BlockState.USABLE))
    w.put(NEXT_BLOCK, pack_u64(1))
    s._durable("enc", "B", w)
    s.close()
    s = origin(tmp_path)
    assert s.block("enc", "B", 0) == data
    fill(s, seeds.new_blocks(1, 64))  # numbered on after it
    keys = s.take_enc("B", 3, 64)
    assert [k for _, k in keys[:2]] == [data[:64], data[64:]]
    assert [k.seq for k, _ in keys] == [0, 0, 1]
    assert not any(k[:1] in (SEED, BLOCK) for k in _records(s))


def test_a_refused_take_changes_nothing(tmp_path):
    s = origin(tmp_path)
    fill(s, seeds.new_blocks(2, 64))
    before = s.summary()
    with pytest.raises(StoreError, match="3 keys of 64 B asked, 128 B usable"):
        s.take_enc("B", 3, 64)  # two blocks of 64: the third key is missing
    with pytest.raises(StoreError, match="2 of 3"):
        s.take_enc("B", 3, 40)  # 120 B fit in 128 B, but a key never spans two blocks
    with pytest.raises(StoreError, match="do not fit the global key blocks of 64 B") as e:
        s.take_enc("B", 1, 65)
    assert e.value.kind == "bad"
    assert s.summary() == before
    assert len(s.take_enc("B", 2, 64)) == 2
    with pytest.raises(StoreError, match="no global key is kept for node 'Z'"):
        s.take_enc("Z", 1, 32)


def test_used_blocks_leave_the_store_and_the_cursor_survives_reopening(tmp_path):
    s = origin(tmp_path)
    fill(s, seeds.new_blocks(4, 64))
    first = s.take_enc("B", 3, 32)  # block 0 used up, block 1 half
    assert s.summary()["enc"]["B"]["blocks"] == 3
    assert s.summary()["enc"]["B"]["usable"] == 4 * 64 - 96
    s.close()
    s = origin(tmp_path)
    again = s.take_enc("B", 5, 32)
    assert {k.key_id for k, _ in first}.isdisjoint({k.key_id for k, _ in again})
    assert s.summary()["enc"]["B"]["usable"] == 0


def test_concurrent_threads_never_receive_the_same_key(tmp_path):
    s = origin(tmp_path)
    fill(s, seeds.new_blocks(64, 4096))
    got: list[list] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def taker(i: int) -> None:
        start.wait(10)
        # Each thread a fixed share, then all of them until the store is empty: a fast
        # thread cannot empty it alone before the others have started.
        for _ in range(40):
            got[i].extend(s.take_enc("B", 1 + i % 3, 32 * (1 + i)))
        start.wait(10)
        while True:
            try:
                got[i].extend(s.take_enc("B", 1 + i % 3, 32 * (1 + i)))
            except StoreError:
                return

    threads = [threading.Thread(target=taker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    keys = [k for g in got for k, _ in g]
    assert all(len(g) > 0 for g in got)
    assert len({k.key_id for k in keys}) == len(keys)
    _assert_no_shared_byte(keys)


def _assert_no_shared_byte(keys) -> None:
    spans = sorted((k.seq, k.offset, k.offset + k.size) for k in keys)
    for (s1, _, e1), (s2, b2, _) in zip(spans, spans[1:], strict=False):
        assert s1 != s2 or e1 <= b2, "two keys share bytes"


def _take_forever(path, conn) -> None:
    s = KeyStore(path, A, {"B": B}, {"B": B})
    while True:
        for sl, _ in s.take_enc("B", 1, 32):
            conn.send(str(sl.key_id))


def test_a_killed_taker_never_gets_its_keys_back(tmp_path):
    """Keys are returned only after the take is durable: after a kill -9 at a random
    moment, the reopened store never hands out a key the dead process received."""
    s = origin(tmp_path)
    fill(s, seeds.new_blocks(16, 4096))
    s.close()
    ctx = mp.get_context("spawn")  # a fork would inherit RocksDB's threads
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_take_forever, args=(tmp_path / "a", child))
    p.start()
    seen = []
    while len(seen) < 300:
        seen.append(parent.recv())
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    while parent.poll():
        seen.append(parent.recv())
    s = origin(tmp_path)
    rest = []
    for batch in (64, 1):
        while True:
            try:
                rest.extend(str(k.key_id) for k, _ in s.take_enc("B", batch, 32))
            except StoreError:
                break
    assert set(seen).isdisjoint(rest)
    assert len(seen) + len(rest) <= 16 * 4096 // 32
    assert len(rest) > 0


def test_destination_stores_idempotently_and_keeps_the_first_bytes(tmp_path):
    d = dest(tmp_path)
    assert d.store_received("A", [(0, b"x" * 32), (1, b"y" * 32)]) == [0, 0]
    # A resent block: DUPLICATE; other bytes under a held number: CONFLICT, not stored.
    assert d.store_received("A", [(1, b"y" * 32), (0, b"z" * 32)]) == [1, 2]
    d.close()
    d = dest(tmp_path)
    assert d.block("dec", "A", 0) == b"x" * 32
    assert d.summary()["dec"]["A"]["stored"] == 64


def _store_and_die(path, conn) -> None:
    d = KeyStore(path, B, {"A": A}, {"A": A})
    seq = 0
    while True:
        d.store_received("A", [(seq, bytes([seq % 251 + 1]) * 4096)])
        conn.send(seq)  # the ACK would go out now
        seq += 1


def test_every_acknowledged_block_survives_a_kill(tmp_path):
    ctx = mp.get_context("spawn")  # a fork would inherit RocksDB's threads
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_store_and_die, args=(tmp_path / "b", child))
    p.start()
    acked = [parent.recv() for _ in range(200)]
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    d = dest(tmp_path)
    for seq in acked:
        assert d.block("dec", "A", seq) == bytes([seq % 251 + 1]) * 4096


def test_dec_keys_beyond_what_one_answer_may_carry_are_refused_whole(tmp_path, monkeypatch):
    from control.gkm import store_rules

    o, d = origin(tmp_path), dest(tmp_path)
    blocks = seeds.new_blocks(1, 256)
    d.store_received("A", list(zip(fill(o, blocks), [b.data for b in blocks], strict=True)))
    keys = o.take_enc("B", 3, 64)
    ids = [str(k.key_id) for k, _ in keys]
    d.reserve("A", ids, "sae-2")
    monkeypatch.setattr(store_rules, "MAX_API_REQUEST_BYTES", 150)  # 64 MiB, scaled down
    with pytest.raises(StoreError, match="192 bytes, above the .* ask for them in parts") as e:
        d.take_dec("A", ids, "sae-2")
    assert e.value.kind == "bad"
    assert d.take_dec("A", ids[:2], "sae-2") == [k for _, k in keys[:2]]  # nothing was taken
    assert d.take_dec("A", ids[2:], "sae-2") == [keys[2][1]]


def test_dec_keys_spread_over_more_blocks_than_one_request_may_read_are_refused_whole(
        tmp_path, monkeypatch):
    """The store reads whole blocks: a small key in each of many blocks (the rest of each
    another SAE's) had up to a GiB read for one request, again after every answer its
    reader cut short. What the keys' blocks hold is bounded as the keys are."""
    from control.gkm import store_rules

    o, d = origin(tmp_path), dest(tmp_path)
    blocks = seeds.new_blocks(3, 256)
    d.store_received("A", list(zip(fill(o, blocks), [b.data for b in blocks], strict=True)))
    small = []
    for _ in range(3):  # per block: an 8-byte key for one SAE, the rest for another
        (k, data), = o.take_enc("B", 1, 8)
        small.append((str(k.key_id), data))
        d.reserve("A", [str(k.key_id)], "sae-2")
        d.reserve("A", [str(k.key_id) for k, _ in o.take_enc("B", 1, 248)], "sae-3")
    ids = [kid for kid, _ in small]
    monkeypatch.setattr(store_rules, "MAX_API_READ_BYTES", 600)  # 128 MiB, scaled down
    with pytest.raises(StoreError, match="lie in 3 blocks of 768 bytes.* ask for them in "
                                         "parts") as e:
        d.take_dec("A", ids, "sae-2")  # 24 bytes of key, 768 read
    assert e.value.kind == "bad"
    assert d.take_dec("A", ids[:2], "sae-2") == [k for _, k in small[:2]]  # nothing taken
    assert d.take_dec("A", ids[2:], "sae-2") == [small[2][1]]


def test_dec_keys_go_once_and_only_to_the_reserved_sae(tmp_path):
    o, d = origin(tmp_path), dest(tmp_path)
    blocks = seeds.new_blocks(2, 256)
    seqs = fill(o, blocks)
    d.store_received("A", list(zip(seqs, [b.data for b in blocks], strict=True)))
    keys = o.take_enc("B", 4, 64)
    ids = [str(k.key_id) for k, _ in keys]
    d.reserve("A", ids[:3], "sae-2")
    with pytest.raises(StoreError, match="another SAE") as e:
        d.take_dec("A", ids[:1], "sae-9")
    assert e.value.kind == "forbidden"
    with pytest.raises(StoreError, match="unknown or already delivered"):
        d.take_dec("A", ids[:1] + ids[3:], "sae-2")  # one not reserved: refused whole
    assert d.take_dec("A", ids[:2], "sae-2") == [k for _, k in keys[:2]]
    with pytest.raises(StoreError, match="already delivered"):
        d.take_dec("A", ids[1:3], "sae-2")
    assert d.take_dec("A", ids[2:3], "sae-2") == [keys[2][1]]
    with pytest.raises(StoreError, match="named twice"):
        d.take_dec("A", [ids[3], ids[3]], "sae-2")
    with pytest.raises(StoreError, match="not a UUID"):
        d.reserve("A", ["nonsense"], "sae-2")
    with pytest.raises(StoreError, match="no such key stored"):
        d.reserve("A", [str(KeySlice(A, B, 99, 0, 64).key_id)], "sae-2")  # never stored
    with pytest.raises(StoreError, match="not a key from A to here"):
        d.reserve("A", [str(KeySlice(B, A, 0, 0, 64).key_id)], "sae-2")
    assert d.summary()["dec"]["A"]["delivered_keys"] == 3


def test_the_database_is_locked_to_one_process(tmp_path):
    held = origin(tmp_path)
    ctx = mp.get_context("spawn")  # a fork would inherit RocksDB's threads
    q = ctx.Queue()
    p = ctx.Process(target=_open_second, args=(tmp_path, q))
    p.start()
    p.join(60)
    got = q.get(timeout=5)
    assert got.startswith("busy: ") and "open in another process" in got
    held.close()


def _open_second(tmp_path, q) -> None:
    try:
        origin(tmp_path)
        q.put("opened")
    except StoreError as e:
        q.put(f"{e.kind}: {e}")


def _pair_with_keys(tmp_path, nblocks: int = 3, size: int = 256):
    o, d = origin(tmp_path), dest(tmp_path)
    blocks = seeds.new_blocks(nblocks, size)
    seqs = fill(o, blocks)
    d.store_received("A", list(zip(seqs, [b.data for b in blocks], strict=True)))
    return o, d


def _apply_confirmed(o, d, r: int) -> None:
    """Reservation ``r`` applied at the slave's node, then its confirmation (its taker
    was answered): what the key managers do over the relay."""
    from control.gkm.wire import parse

    assert d.apply_reservation("A", parse([o.enc["B"].unacked[r]])).name == "APPLIED"
    for c in o.confirm_acked("B", [r]):
        assert d.apply_reservation("A", parse([o.enc["B"].unacked[c]])).name == "APPLIED"


def test_a_delivered_or_reserved_key_can_never_be_reserved_again(tmp_path):
    o, d = _pair_with_keys(tmp_path)
    keys = o.take_enc("B", 4, 64)
    ids = [str(k.key_id) for k, _ in keys]
    d.reserve("A", ids[:2], "sae-2")
    d.reserve("A", ids[:2], "sae-2")  # the origin resent it: a no-op
    assert d.summary()["dec"]["A"]["reserved_keys"] == 2
    with pytest.raises(StoreError, match="already reserved or delivered"):
        d.reserve("A", ids[1:2], "sae-9")  # no stealing a reservation
    assert d.take_dec("A", ids[:1], "sae-2") == [keys[0][1]]
    with pytest.raises(StoreError, match="already reserved or delivered"):
        d.reserve("A", ids[:1], "sae-9")  # delivered: behind the cursor for good
    # A key the origin never carved that overlaps reserved ones: refused.
    overlap = str(KeySlice(A, B, 0, 32, 64).key_id)
    with pytest.raises(StoreError, match="overlaps"):
        d.reserve("A", [overlap], "sae-2")
    with pytest.raises(StoreError, match="already reserved or delivered"):
        d.reserve("A", [ids[3], ids[2]], "sae-2")  # out of carving order
    d.reserve("A", ids[2:], "sae-2")
    assert d.take_dec("A", ids[1:], "sae-2") == [k for _, k in keys[1:]]


def test_every_spelling_of_a_key_id_names_the_same_key(tmp_path):
    o, d = _pair_with_keys(tmp_path)
    (k, key), = o.take_enc("B", 1, 64)
    kid = str(k.key_id)
    d.reserve("A", [kid], "sae-2")
    spellings = [kid.upper(), "urn:uuid:" + kid, "{" + kid + "}", kid.replace("-", "")]
    with pytest.raises(StoreError, match="named twice"):
        d.take_dec("A", [kid, *spellings], "sae-2")
    assert d.take_dec("A", [spellings[1]], "sae-2") == [key]
    for other in [kid, *spellings]:
        with pytest.raises(StoreError, match="already delivered"):
            d.take_dec("A", [other], "sae-2")


def test_used_up_dec_blocks_are_deleted_and_stay_deleted(tmp_path):
    o, d = _pair_with_keys(tmp_path, nblocks=4, size=128)
    keys = o.take_enc("B", 5, 64)  # blocks 0, 1 used up; block 2 half
    ids = [str(k.key_id) for k, _ in keys]
    cursor = o.enc["B"].cursor
    d.reserve("A", ids, "sae-2", carved_to=cursor)
    assert d.summary()["dec"]["A"]["blocks"] == 4  # keys still to deliver in 0 and 1
    d.take_dec("A", ids[:2], "sae-2")  # block 0 delivered whole: freed
    assert sorted(d.dec["A"].blocks) == [1, 2, 3]
    assert d.block("dec", "A", 0) is None
    d.take_dec("A", ids[2:], "sae-2")
    assert sorted(d.dec["A"].blocks) == [2, 3]  # 2 is still being carved
    assert d.summary()["dec"]["A"]["stored"] == 2 * 128
    # Skipped key (carved at the origin, never reserved) does not pin a block: the origin's
    # cursor moving past it frees it.
    o.take_enc("B", 2, 64)  # the rest of block 2, the first key of block 3
    d.reserve("A", [], "sae-2", carved_to=o.enc["B"].cursor)
    assert sorted(d.dec["A"].blocks) == [3]
    d.close()
    d = dest(tmp_path)
    assert sorted(d.dec["A"].blocks) == [3] and d.dec["A"].cursor == o.enc["B"].cursor
    # A late resend of a freed block, stored again behind the cursor, goes at the next
    # reservation too.
    assert d.store_received("A", [(1, bytes(128))])[0].name == "STORED"
    d.reserve("A", [], "sae-2", carved_to=o.enc["B"].cursor)
    assert sorted(d.dec["A"].blocks) == [3]


def test_a_conflicting_block_loses_its_bytes_and_is_skipped(tmp_path):
    s = origin(tmp_path)
    seqs = fill(s, seeds.new_blocks(3, 64), usable=False)
    s.mark("B", [seqs[0], seqs[2]], BlockState.USABLE)
    s.mark("B", [seqs[1]], BlockState.CONFLICT)
    assert s.block("enc", "B", seqs[1]) is None
    keys = s.take_enc("B", 2, 64)
    assert [k.seq for k, _ in keys] == [0, 2]
    assert s.summary()["enc"]["B"]["blocks"] == 0


def test_reservations_travel_numbered_and_apply_once_in_order(tmp_path):
    from control.gkm.wire import ReserveStatus, parse

    o, d = _pair_with_keys(tmp_path, nblocks=4, size=128)
    k1, r1 = o.take_enc_reserved("B", 2, 64, ("sae-2",))
    k2, r2 = o.take_enc_reserved("B", 1, 64, ("sae-2", "sae-3"))
    assert (r1, r2) == (0, 1) and sorted(o.enc["B"].unacked) == [0, 1]
    m1, m2 = (parse([o.enc["B"].unacked[r]]) for r in (r1, r2))
    assert m2.carved_to == (1, 64) and m2.saes == ("sae-2", "sae-3")
    assert d.apply_reservation("A", m2) == ReserveStatus.GAP  # m1 not there yet
    assert d.apply_reservation("A", m1) == ReserveStatus.APPLIED
    assert d.apply_reservation("A", m1) == ReserveStatus.DUPLICATE
    assert d.apply_reservation("A", m2) == ReserveStatus.APPLIED
    # Reserved is not fetchable: the taker may yet be refused. Its taker is answered once
    # the confirmation is queued (here: for r1 only), and the confirmation makes it so.
    with pytest.raises(StoreError, match="not yet confirmed") as e:
        d.take_dec("A", [str(k1[0][0].key_id)], "sae-2")
    assert e.value.kind == "pending"
    del e  # (its traceback holds the store open)
    with pytest.raises(StoreError, match="belongs to another SAE"):
        d.take_dec("A", [str(k1[0][0].key_id)], "sae-9")  # ... and says so only to its SAEs
    (c1,) = o.confirm_acked("B", [r1])
    assert c1 == 2 and sorted(o.enc["B"].unacked) == [1, 2]
    m3 = parse([o.enc["B"].unacked[c1]])
    assert m3.confirm and m3.key_ids == m1.key_ids
    assert d.apply_reservation("A", m3) == ReserveStatus.APPLIED
    assert d.take_dec("A", [str(k1[0][0].key_id)], "sae-2") == [k1[0][1]]
    with pytest.raises(StoreError, match="not yet confirmed"):
        d.take_dec("A", [str(k2[0][0].key_id)], "sae-3")
    # A restart keeps the confirmation queued (its taker may have been answered) and
    # resends what is left; the slave's node keeps what it applied.
    o.close()
    o = origin(tmp_path)
    assert sorted(o.enc["B"].unacked) == [1, 2] and o.enc["B"].next_rseq == 3
    assert o.cancel_unanswered("B") == [3]  # r2's taker is gone; the confirmation stays
    assert parse([o.enc["B"].unacked[3]]).key_ids == m2.key_ids
    d.close()
    d = dest(tmp_path)
    assert d.dec["A"].next_rseq == 3
    assert d.take_dec("A", [str(k1[1][0].key_id)], "sae-2") == [k1[1][1]]
    (c2,) = o.confirm_acked("B", [r2])  # (as if r2 were answered in time after all)
    assert d.apply_reservation("A", parse([o.enc["B"].unacked[c2]])) == ReserveStatus.GAP
    assert d.apply_reservation("A", parse([o.enc["B"].unacked[3]])) == ReserveStatus.APPLIED
    # ... a confirmation after the cancellation brings nothing back.
    assert d.apply_reservation("A", parse([o.enc["B"].unacked[c2]])) == \
        ReserveStatus.APPLIED
    with pytest.raises(StoreError, match="unknown or already delivered"):
        d.take_dec("A", [str(k2[0][0].key_id)], "sae-2")


def test_a_reservation_whose_taker_gave_up_is_cancelled_in_order(tmp_path):
    from control.gkm.wire import ReserveStatus, parse

    o, d = _pair_with_keys(tmp_path, nblocks=2, size=64)
    keys, r0 = o.take_enc_reserved("B", 1, 64, ("sae-2",))  # block 0 whole
    r1 = o.cancel_reservation("B", r0)
    assert r1 == r0 + 1 and o.cancel_reservation("B", 99) is None
    m0, m1 = (parse([o.enc["B"].unacked[r]]) for r in (r0, r1))
    assert m1.saes == () and m1.key_ids == m0.key_ids
    assert d.apply_reservation("A", m0) == ReserveStatus.APPLIED
    assert d.summary()["dec"]["A"]["reserved_keys"] == 1
    assert d.apply_reservation("A", m1) == ReserveStatus.APPLIED
    assert d.summary()["dec"]["A"]["reserved_keys"] == 0
    assert 0 not in d.dec["A"].blocks  # nothing left to deliver in block 0: freed
    with pytest.raises(StoreError, match="no such key stored"):
        d.take_dec("A", [str(keys[0][0].key_id)], "sae-2")


def test_a_key_goes_only_to_the_slave_naming_the_master_that_took_it(tmp_path):

    o, d = _pair_with_keys(tmp_path, nblocks=2, size=128)
    keys, r = o.take_enc_reserved("B", 2, 64, ("sae-2",), "sae-m")
    _apply_confirmed(o, d, r)
    kid = str(keys[0][0].key_id)
    with pytest.raises(StoreError, match="not issued to master SAE sae-x") as e:
        d.take_dec("A", [kid], "sae-2", master="sae-x")
    assert e.value.kind == "unknown"
    assert d.take_dec("A", [kid], "sae-2", master="sae-m") == [keys[0][1]]
    # No master named (an operator's take): any master's key, still once.
    assert d.take_dec("A", [str(keys[1][0].key_id)], "sae-2") == [keys[1][1]]


def test_a_group_of_takes_is_durable_together_and_visible_inside(tmp_path):
    s = origin(tmp_path)
    fill(s, seeds.new_blocks(2, 256))
    taken = []
    with s.group():
        for _ in range(4):
            taken += s.take_enc("B", 1, 32)
        assert s._dirty  # written, not yet synced
        with s.group():  # nested: the outer one syncs
            taken += s.take_enc("B", 1, 32)
        assert s._dirty
    assert not s._dirty
    assert len({k.key_id for k, _ in taken}) == 5
    cursor = s.enc["B"].cursor
    s.close()
    s = origin(tmp_path)
    assert s.enc["B"].cursor == cursor  # every take of the group survived
    assert s.take_enc("B", 1, 32)[0][0].key_id not in {k.key_id for k, _ in taken}


def test_dec_blocks_behind_the_cursor_are_freed_exactly_when_their_last_key_goes():
    """The index of freeable blocks (kept up to date, not found by scanning every block
    behind the cursor at each reservation)."""
    from control.gkm.carving import Cursor
    from control.gkm.store_rules import DecState

    st = DecState("A", 1)
    for seq in range(5):
        st.add_block(seq, 128)
    for seq in (0, 1, 1, 3):
        st.add_outstanding(seq)
    st.move_cursor(Cursor(4, 0))
    assert sorted(st.done()) == [2]  # behind, nothing reserved in it
    st.drop_outstanding(1)
    assert sorted(st.done()) == [2]  # one key of block 1 still to deliver
    st.drop_outstanding(1)
    assert sorted(st.done()) == [1, 2]
    for seq in st.done():
        st.forget(seq)
    st.drop_outstanding(0)
    st.drop_outstanding(3)
    assert sorted(st.done()) == [0, 3] and st.stored_total == 3 * 128
    st.add_outstanding(4)
    st.drop_outstanding(4)
    assert 4 not in st.done()  # not behind the cursor yet: it may still be carved
    st.add_block(2, 128)  # a late resend of a freed block, behind the cursor
    assert 2 in st.done()


# ---- one key, several SAEs (ETSI 014 additional_slave_SAE_IDs) --------------------------------

@given(named=st.lists(st.sampled_from(["s1", "s2", "s3", "s4"]), min_size=1, max_size=6),
       fetches=st.lists(st.sampled_from(["s1", "s2", "s3", "s4", "s5"]), max_size=20),
       master=st.sampled_from(["", "m"]))
def test_every_named_sae_gets_the_key_once_and_no_one_else(named, fetches, master):
    """The reservation record alone (no I/O): whatever the order of fetches, each SAE it
    names gets the key exactly once (a name given twice, once), any other SAE never, and
    the record ends with the last of them."""
    record: bytes | None = reservation_record(master, tuple(named))
    got = []
    for sae in fetches:
        if record is None:
            break  # the key is gone: the store says "unknown or already delivered"
        try:
            record = deliver_from_record(record, "k", sae, "m" if master else None)
            got.append(sae)
        except StoreError as e:
            assert (e.kind == "forbidden") == (sae not in named), (sae, e)
            assert (e.kind == "unknown") == (sae in got)
    assert len(got) == len(set(got)) and set(got) <= set(named)
    assert (record is None) == (set(got) == set(named))
    if master:
        with pytest.raises(StoreError, match="not issued to master SAE x"):
            deliver_from_record(reservation_record(master, tuple(named)), "k", named[0], "x")


def test_additional_slaves_each_fetch_the_same_keys_once(tmp_path):

    o, d = _pair_with_keys(tmp_path, nblocks=2, size=128)
    keys, r = o.take_enc_reserved("B", 2, 64, ("b1", "b2", "b3"), "a1")
    _apply_confirmed(o, d, r)
    ids = [str(k.key_id) for k, _ in keys]
    want = [k for _, k in keys]
    assert d.take_dec("A", ids, "b2", master="a1") == want
    with pytest.raises(StoreError, match="already delivered to SAE b2") as e:
        d.take_dec("A", ids[:1], "b2", master="a1")
    assert e.value.kind == "unknown"
    with pytest.raises(StoreError, match="another SAE") as e:
        d.take_dec("A", ids[:1], "b9", master="a1")
    assert e.value.kind == "forbidden"
    del e  # its traceback holds views of the database open
    # Who has had which key survives a restart (it is in the same synced batch).
    d.close()
    d = dest(tmp_path)
    with pytest.raises(StoreError, match="already delivered to SAE b2"):
        d.take_dec("A", ids, "b2")
    assert d.take_dec("A", ids[1:], "b1") == want[1:]
    assert d.take_dec("A", ids[:1], "b3") == want[:1]
    assert d.summary()["dec"]["A"]["reserved_keys"] == 2  # b1 and b3 still to come
    assert d.take_dec("A", ids[:1], "b1") == want[:1]
    assert d.take_dec("A", ids[1:], "b3") == want[1:]
    assert d.summary()["dec"]["A"]["reserved_keys"] == 0
    assert 0 not in d.dec["A"].blocks  # the last SAE's fetch freed the block
    with pytest.raises(StoreError, match="no such key") as e:
        d.take_dec("A", ids[:1], "b1")
    assert e.value.kind == "unknown"


# ---- counters an origin sends are bounded by what this node holds -----------------------------

def test_a_carving_cursor_beyond_the_blocks_held_is_refused_at_once(tmp_path):
    """A RESERVE whose carved_to runs past the highest block held (2**40 - 1 at most on the
    wire) is refused and skipped in its order, nothing moves, and it costs no scan of the
    numbers it would pass; the reservation after it still applies."""
    import time

    from control.gkm.carving import MAX_SEQ, Cursor
    from control.gkm.wire import Reserve, ReserveStatus, parse

    o, d = _pair_with_keys(tmp_path, nblocks=3, size=128)
    assert d.dec["A"].reach() == (3, 0)
    kid = KeySlice(A, B, 0, 0, 64).key_id.bytes
    start = time.monotonic()
    refused = []
    for rseq, carved in enumerate([(MAX_SEQ, 0), (3, 1), (2, 1 << 24 | 1)]):
        msg = Reserve(A, B, rseq, carved, ("evil",), (kid,))
        assert d.apply_reservation("A", msg) == ReserveStatus.REFUSED
        assert "beyond the end of the blocks held here" in d.dec["A"].last_refused
        refused.append(msg)
    assert time.monotonic() - start < 1.0
    # Sent again (its answer was lost): refused again, also after a restart, not the
    # DUPLICATE the origin would take for applied.
    d.close()
    d = dest(tmp_path)
    for msg in refused:
        assert d.apply_reservation("A", msg) == ReserveStatus.REFUSED
    dec = d.summary()["dec"]["A"]
    assert dec["reserve_cursor"] == [0, 0] and dec["reserved_keys"] == 0
    assert dec["reservations_applied"] == 3 and "evil" not in str(d.dec["A"].outstanding)
    # The origin's own reservations, numbered after them, still apply; its cursor may end
    # exactly at the end of the last block held.
    for _ in range(3):
        o.take_enc_reserved("B", 1, 64, ("sae-2",))
    keys, _ = o.take_enc_reserved("B", 3, 64, ("sae-2",))  # to the end of block 2
    assert o.enc["B"].cursor == Cursor(3, 0)
    for rseq in sorted(o.enc["B"].unacked):
        m = parse([o.enc["B"].unacked[rseq]])
        m = Reserve(m.origin, m.destination, rseq + 3, m.carved_to, m.saes, m.key_ids)
        assert d.apply_reservation("A", m) == ReserveStatus.APPLIED, d.dec["A"].last_refused
    for rseq in o.confirm_acked("B", sorted(o.enc["B"].unacked)):
        m = parse([o.enc["B"].unacked[rseq]])
        m = Reserve(m.origin, m.destination, rseq + 3, m.carved_to, (), m.key_ids,
                    confirm=True)
        assert d.apply_reservation("A", m) == ReserveStatus.APPLIED
    assert d.take_dec("A", [str(keys[-1][0].key_id)], "sae-2") == [keys[-1][1]]


def test_a_long_jump_of_the_reservation_cursor_costs_the_blocks_held_not_the_numbers():
    import time

    from control.gkm.carving import MAX_SEQ, Cursor
    from control.gkm.store_rules import DecState

    st = DecState("A", 1)
    for seq in (0, 5, 9):
        st.add_block(seq, 128)
    assert st.top == 9 and not st.beyond_reach(9 + 100, 100) and st.beyond_reach(110, 100)
    start = time.monotonic()
    st.move_cursor(Cursor(MAX_SEQ, 0))
    assert time.monotonic() - start < 0.5
    assert sorted(st.done()) == [0, 5, 9]
    assert not st.beyond_reach(MAX_SEQ, 0)  # the cursor itself counts as held


def test_keys_whose_taker_gave_up_late_are_cancelled_at_the_slaves_node(tmp_path):
    """After the slave's node confirmed (the taker's answer was lost or late), and after a
    restart of the origin with reservations still unconfirmed."""
    from control.gkm.wire import ReserveStatus, parse

    o, d = _pair_with_keys(tmp_path, nblocks=2, size=128)
    keys, r0 = o.take_enc_reserved("B", 2, 32, ("sae-2",))
    assert d.apply_reservation("A", parse([o.enc["B"].unacked[r0]])) == ReserveStatus.APPLIED
    o.reservation_acked("B", r0)
    r1 = o.cancel_keys("B", [k.key_id.bytes for k, _ in keys])
    assert d.apply_reservation("A", parse([o.enc["B"].unacked[r1]])) == ReserveStatus.APPLIED
    o.reservation_acked("B", r1)
    ids = [str(k.key_id) for k, _ in keys]
    with pytest.raises(StoreError, match="unknown or already delivered"):
        d.take_dec("A", ids[:1], "sae-2")
    # Two takes still unconfirmed when the origin stops: cancelled once each at its start.
    later, r2 = o.take_enc_reserved("B", 1, 32, ("sae-2",))
    _, r3 = o.take_enc_reserved("B", 1, 32, ("sae-2",))
    o.close()
    o = origin(tmp_path)
    cancels = o.cancel_unanswered("B")
    assert len(cancels) == 2 and o.cancel_unanswered("B") == []  # not twice
    for r in sorted(o.enc["B"].unacked):
        assert d.apply_reservation("A", parse([o.enc["B"].unacked[r]])) == \
            ReserveStatus.APPLIED
        o.reservation_acked("B", r)
    assert r3 == r2 + 1 and not o.enc["B"].unacked
    with pytest.raises(StoreError, match="no such key stored") as e:  # block 0: freed
        d.take_dec("A", [str(later[0][0].key_id)], "sae-2")
    assert e.value.kind == "unknown"
    assert d.summary()["dec"]["A"]["reserved_keys"] == 0


# ---- answers that may be lost: handed keys -----------------------------------------------

def _reserved(tmp_path, saes=("sae-2",), n=3):
    o, d = origin(tmp_path), dest(tmp_path)
    blocks = seeds.new_blocks(1, 256)
    seqs = fill(o, blocks)
    d.store_received("A", list(zip(seqs, [b.data for b in blocks], strict=True)))
    keys = o.take_enc("B", n, 64)
    ids = [str(k.key_id) for k, _ in keys]
    d._reserve(d.dec["A"], "A", ids, tuple(saes), None, None, "")
    return o, d, ids, [k for _, k in keys]


def test_may_hand_again_only_the_same_request_or_a_lost_answer():
    prev = Handing(holder=7, token=3, at=0.0)
    assert may_hand_again(prev, 7, 3, holder_alive=True)       # the same request again
    assert not may_hand_again(prev, 7, 4, holder_alive=True)   # another, while writing
    assert not may_hand_again(prev, 8, 3, holder_alive=True)   # another worker, same
    assert may_hand_again(prev, 8, 1, holder_alive=False)      # its writer died
    assert may_hand_again(Handing(7, 3, 0.0, lost=True), 8, 1, holder_alive=True)
    assert Handing.unpack(Handing(2**40, 5, 1.5, True).pack()) == Handing(2**40, 5, 1.5, True)


def test_a_handed_key_is_delivered_only_once_its_answer_is_written(tmp_path):
    o, d, ids, keys = _reserved(tmp_path)
    alive = {7: True, 8: True}
    assert d.take_dec("A", ids[:2], "sae-2", holder=(7, 1), alive=alive.get) == keys[:2]
    assert d.summary()["dec"]["A"]["handed_unconfirmed"] == 2
    assert d.summary()["dec"]["A"]["delivered_keys"] == 0
    # While worker 7 may still be writing it, no second answer (not even to sae-2) ...
    with pytest.raises(StoreError, match="being delivered") as e:
        d.take_dec("A", ids[1:2], "sae-2", holder=(8, 1), alive=alive.get)
    assert e.value.kind == "delivering"  # (the key manager holds such a request)
    del e
    with pytest.raises(StoreError, match="another SAE"):  # ... and none to anyone else
        d.take_dec("A", ids[:1], "sae-9", holder=(8, 2), alive=alive.get)
    # ... but the same request again (worker 7 resends it to a restarted manager) is.
    assert d.take_dec("A", ids[:2], "sae-2", holder=(7, 1), alive=alive.get) == keys[:2]
    # A word from another holder or for another request settles nothing.
    assert d.answer_written("A", ids[:2], "sae-2", (8, 1), True) == 0
    assert d.answer_written("A", ids[:2], "sae-2", (7, 9), True) == 0
    assert d.answer_written("A", ids[:2], "sae-2", (7, 1), True) == 2
    s = d.summary()["dec"]["A"]
    assert (s["handed_unconfirmed"], s["delivered_keys"], s["reserved_keys"]) == (0, 2, 1)
    with pytest.raises(StoreError, match="unknown or already delivered"):
        d.take_dec("A", ids[:1], "sae-2", holder=(7, 2), alive=alive.get)
    o.close()
    d.close()


def test_a_lost_answer_leaves_its_keys_to_the_same_sae(tmp_path):
    o, d, ids, keys = _reserved(tmp_path)
    alive = {7: True, 8: True}
    d.take_dec("A", ids[:1], "sae-2", holder=(7, 1), alive=alive.get)
    assert d.answer_written("A", ids[:1], "sae-2", (7, 1), False) == 1  # connection gone
    with pytest.raises(StoreError, match="another SAE"):
        d.take_dec("A", ids[:1], "sae-9", holder=(8, 1), alive=alive.get)
    assert d.take_dec("A", ids[:1], "sae-2", holder=(8, 1), alive=alive.get) == keys[:1]
    # The worker holding the next answer dies before it says anything (kill -9).
    alive[8] = False
    assert d.take_dec("A", ids[:1], "sae-2", holder=(7, 2), alive=alive.get) == keys[:1]
    d.answer_written("A", ids[:1], "sae-2", (7, 2), True)
    assert d.summary()["dec"]["A"]["delivered_keys"] == 1
    o.close()
    d.close()


def test_handings_survive_a_restart_and_expire_as_deliveries(tmp_path):
    o, d, ids, keys = _reserved(tmp_path)
    d.take_dec("A", ids, "sae-2", holder=(7, 1), alive=lambda _: True)
    t0 = d.dec["A"].handed[next(iter(d.dec["A"].handed))].at
    d.close()
    d = dest(tmp_path)
    assert len(d.dec["A"].handed) == 3
    with pytest.raises(StoreError, match="being delivered"):  # worker 7 still runs
        d.take_dec("A", ids[:1], "sae-2", holder=(9, 1), alive=lambda _: True)
    d.close()  # (the exception's traceback would keep it open)
    d = dest(tmp_path)
    assert d.expire_handed(now=t0 + 1.0) == (0, 0)
    # Worker 7 lives and never said a word (lost with a restart): delivered, as it was.
    assert d.expire_handed(now=t0 + HANDED_KEEP_S + 1.0, alive=lambda _: True) == (0, 3)
    s = d.summary()["dec"]["A"]
    assert (s["answers_expired"], s["delivered_keys"], s["reserved_keys"]) == (3, 3, 0)
    d.close()
    d = dest(tmp_path)
    assert not d.dec["A"].handed
    with pytest.raises(StoreError, match="unknown or already delivered"):
        d.take_dec("A", ids[:1], "sae-2", holder=(9, 2), alive=lambda _: False)
    o.close()
    d.close()


def test_a_multicast_key_is_handed_to_each_sae_once(tmp_path):
    o, d, ids, keys = _reserved(tmp_path, saes=("sae-2", "sae-3"))
    alive = lambda _: True  # noqa: E731
    assert d.take_dec("A", ids[:1], "sae-2", holder=(7, 1), alive=alive) == keys[:1]
    assert d.take_dec("A", ids[:1], "sae-3", holder=(8, 1), alive=alive) == keys[:1]
    d.answer_written("A", ids[:1], "sae-3", (8, 1), True)
    d.answer_written("A", ids[:1], "sae-2", (7, 1), True)
    s = d.summary()["dec"]["A"]
    assert (s["delivered_keys"], s["reserved_keys"]) == (2, 2)  # the key ended, 2 left
    for sae in ("sae-2", "sae-3"):
        with pytest.raises(StoreError, match="unknown or already delivered"):
            d.take_dec("A", ids[:1], sae, holder=(9, 1), alive=alive)
    o.close()
    d.close()


def test_a_lost_handing_expires_back_to_its_reservation(tmp_path):
    """A handing known lost (reported, or its worker dead) does not turn into a delivery
    when it expires: the key is the SAE's to fetch, as if never fetched."""
    o, d, ids, keys = _reserved(tmp_path)
    alive = {7: True, 8: True}
    d.take_dec("A", ids[:1], "sae-2", holder=(7, 1), alive=alive.get)
    d.answer_written("A", ids[:1], "sae-2", (7, 1), False)
    d.take_dec("A", ids[1:2], "sae-2", holder=(8, 1), alive=alive.get)
    alive[8] = False
    t0 = max(x.at for x in d.dec["A"].handed.values())
    assert d.expire_handed(now=t0 + HANDED_KEEP_S + 1.0, alive=alive.get) == (2, 0)
    s = d.summary()["dec"]["A"]
    assert (s["handed_unconfirmed"], s["answers_given_back"], s["delivered_keys"],
            s["reserved_keys"]) == (0, 2, 0, 3)
    assert d.take_dec("A", ids[:2], "sae-2", holder=(9, 1), alive=lambda _: True) == keys[:2]
    o.close()
    d.close()
