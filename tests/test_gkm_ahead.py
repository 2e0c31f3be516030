"""Keys reserved ahead of demand (control.gkm.ahead): when a pool refills and by how much,
what it serves, what a refusal, an idle pair and a restart do; and the store's records
of them on a real RocksDB, with the slave's node applying what the origin sends."""

from __future__ import annotations

import os
import uuid

import pytest

from control.gkm import ahead, seeds
from control.gkm.ahead import AHEAD_IDLE_S, MIN_POOL_KEYS, Ahead, max_keys
from control.gkm.errors import StoreError
from control.gkm.store import KeyStore
from control.gkm.store_rules import BlockState, ahead_record, read_ahead

POOL = ("B", "sae-m", ("sae-s",), 32)


def _keys(n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(i.to_bytes(16, "big"), os.urandom(32)) for i in range(start, start + n)]


def test_an_occasional_request_reserves_nothing_ahead_however_large():
    a = Ahead(0.1)
    for t in range(100):  # 10 takes a second: 1 expected per 0.1 s, 2 needed
        a.note(POOL, 10, t / 10)
        assert a.wanted(POOL, t / 10) == 0
    assert a.ready(POOL, 1) is None
    big = ("B", "sae-m", ("sae-t",), 32)
    a.note(big, 4000, 0.0)  # one large request
    assert a.wanted(big, 0.0) == 0
    for t in range(20):  # 20 takes a second of one key each: a small pool
        a.note(big, 1, 2.0 + t / 20)
    assert a.wanted(big, 2.95) == 4


def test_steady_demand_refills_to_twice_its_share_and_no_more():
    a = Ahead(0.1)
    for i in range(1000):  # 1,000 keys over one second
        a.note(POOL, 1, i / 1000)
    assert a.wanted(POOL, 0.999) == 200  # 0.1 s of demand is 100: twice that
    a.reserving(POOL, 7, _keys(200))
    assert a.wanted(POOL, 0.999) == 0  # held (reserving) counts: no second refill
    assert a.ready(POOL, 1) is None  # ... but nothing is served before the peer applied it
    assert a.acked("B", 7, refused=False, now=1.0) == []
    got = a.ready(POOL, 150)
    assert got is not None and [k for k, _ in got] == [k for k, _ in _keys(150)]
    a.served(POOL, got)
    assert a.ready(POOL, 51) is None and a.ready(POOL, 50) is not None
    assert a.wanted(POOL, 1.0) == 150  # 50 held, under the target of 100: back to 200
    s = a.summary("B")
    assert (s["ready_keys"], s["served_keys"], s["reserved_keys"]) == (50, 150, 200)


def test_a_pool_holds_at_most_its_byte_cap_and_one_message():
    assert max_keys(32) == ahead.MAX_AHEAD_BYTES // 32
    assert max_keys(1) == 4096  # one RESERVE message
    big = ("B", "m", ("s",), 8192)
    assert max_keys(8192) < MIN_POOL_KEYS
    a = Ahead(10.0)
    for i in range(10_000):
        a.note(POOL, 1, i / 10_000)
        a.note(big, 1, i / 10_000)
    assert a.wanted(POOL, 1.0) == max_keys(32)
    assert a.wanted(big, 1.0) == 0 and big not in a.pools  # large keys: never ahead


def test_a_pool_holds_enough_for_its_largest_take_and_ignores_takes_it_could_not_serve():
    a = Ahead(0.1)
    for i in range(40):  # 40 takes a second, the largest 100 keys
        a.note(POOL, 100 if i == 5 else 1, i / 40)
    assert a.wanted(POOL, 0.99) == 200  # not 2 x ceil(139 x 0.1): the take of 100 counts
    a.reserving(POOL, 1, _keys(200))
    a.acked("B", 1, refused=False, now=1.0)
    assert a.ready(POOL, 100) is not None
    huge = max_keys(32) + 1  # more than any pool holds: never served, not its demand
    for i in range(40):
        a.note(("B", "m", ("s",), 32), huge, i / 40)
    assert a.wanted(("B", "m", ("s",), 32), 0.99) == 0
    assert ("B", "m", ("s",), 32) not in a.pools


def test_a_refused_reservation_drops_its_keys_and_bars_the_pool_for_a_while():
    a = Ahead(0.1)
    for i in range(1000):
        a.note(POOL, 1, i / 1000)
    a.reserving(POOL, 3, _keys(200))
    assert a.owns("B", 3) and not a.owns("B", 4) and not a.owns("C", 3)
    dropped = a.acked("B", 3, refused=True, now=1.0)
    assert dropped == [k for k, _ in _keys(200)]
    assert a.summary("B")["cancelled_keys"] == 200
    for i in range(1000):  # demand goes on, refused each time: no new refill meanwhile
        a.note(POOL, 1, 1.0 + i / 1000)
    assert a.wanted(POOL, 2.0) == 0
    for i in range(1000):
        a.note(POOL, 1, 1.0 + AHEAD_IDLE_S + i / 1000)
    assert a.wanted(POOL, 2.0 + AHEAD_IDLE_S) == 200
    assert a.acked("B", 99, refused=True, now=3.0) == []  # not a reservation ahead


def test_an_idle_pool_is_closed_with_all_its_keys_and_an_empty_one_forgotten():
    a = Ahead(0.1)
    other = ("B", "sae-m", ("sae-t",), 32)
    for i in range(1000):
        a.note(POOL, 1, i / 1000)
        a.note(other, 1, i / 1000)
    a.reserving(POOL, 1, _keys(100))
    a.reserving(POOL, 2, _keys(50, 100))
    a.acked("B", 1, refused=False, now=1.0)
    assert a.idle(1.0 + AHEAD_IDLE_S - 1) == []
    assert a.idle(1.0 + AHEAD_IDLE_S) == [POOL]
    assert other not in a.pools  # held nothing: forgotten
    ids = a.close(POOL)
    assert ids == [k for k, _ in _keys(150)]  # ready and still reserving alike
    assert not a.owns("B", 2) and POOL not in a.pools
    assert a.summary("B")["cancelled_bytes"] == 150 * 32


def test_a_restart_restores_ready_and_reserving_keys_in_order():
    keys = _keys(6)
    records = [(kid, 4 if i < 4 else 5, "sae-m", ("sae-s",), data)
               for i, (kid, data) in enumerate(keys)]
    a = Ahead(0.1)
    a.restore("B", records, unacked={5}, now=100.0)
    assert a.rseqs("B") == {5} and a.rseqs("C") == set()
    assert a.ready(POOL, 4) == keys[:4] and a.ready(POOL, 5) is None
    a.acked("B", 5, refused=False, now=101.0)
    assert a.ready(POOL, 6) == keys
    assert a.idle(100.0 + AHEAD_IDLE_S - 1) == []  # restored pools count from the start
    assert a.idle(100.0 + AHEAD_IDLE_S) == [POOL]


def test_nothing_is_reserved_ahead_when_it_is_off():
    a = Ahead(0.0)
    for i in range(1000):
        a.note(POOL, 1, i / 1000)
    assert a.wanting(1.0) == [] and a.pools == {}


def test_a_master_gets_a_few_pools_however_many_sizes_it_asks_for():
    a = Ahead(0.1)
    sizes = [32 + 8 * i for i in range(ahead.MAX_POOLS_PER_MASTER + 2)]
    now = 0.0
    for _ in range(100):  # each size taken 100 times a second
        now += 0.01
        for size in sizes:
            a.note(("B", "sae-m", ("sae-s",), size), 1, now)
    for rseq, size in enumerate(sizes[:ahead.MAX_POOLS_PER_MASTER]):
        key = ("B", "sae-m", ("sae-s",), size)
        assert a.wanted(key, now) > 0
        a.reserving(key, rseq, _keys(1, rseq))
    assert a.wanted(("B", "sae-m", ("sae-s",), sizes[-1]), now) == 0  # eight hold keys
    other = ("B", "sae-n", ("sae-s",), 32)  # another master is not held back
    for i in range(30):
        a.note(other, 1, now + i / 100)
    assert a.wanted(other, now + 0.3) > 0
    for i in range(ahead.MAX_FOLLOWED + 10):  # a bounded number of pools is followed
        a.note(("B", f"m{i}", ("sae-s",), 32), 1, now)
    assert len(a.pools) == ahead.MAX_FOLLOWED


def test_one_turn_cannot_start_more_pools_for_a_master_than_it_may_hold():
    a = Ahead(0.1)
    keys = [("B", "sae-m", ("sae-s",), 32 + 8 * i) for i in range(20)]
    now = 0.0
    for _ in range(100):  # twenty sizes, each taken 100 times a second
        now += 0.01
        for key in keys:
            a.note(key, 1, now)
    picked = a.wanting(now)
    assert len(picked) == ahead.MAX_POOLS_PER_MASTER


def test_one_master_cannot_fill_the_followed_pools_for_the_others():
    a = Ahead(0.1)
    for i in range(ahead.MAX_FOLLOWED_PER_MASTER + 50):  # ever new sizes
        a.note(("B", "sae-m", ("sae-s",), 32 + 8 * i), 1, 0.0)
    assert len(a.pools) == ahead.MAX_FOLLOWED_PER_MASTER
    a.note(("B", "sae-n", ("sae-s",), 32), 1, 0.0)
    assert ("B", "sae-n", ("sae-s",), 32) in a.pools


def test_the_record_reads_back_what_was_written():
    data = os.urandom(32)
    assert read_ahead(ahead_record(9, "sae-m", ("s1", "s2"), data)) == \
        (9, "sae-m", ("s1", "s2"), data)
    assert read_ahead(ahead_record(0, "", ("s",), b"")) == (0, "", ("s",), b"")


# ---- on the stores ---------------------------------------------------------------------

A, B = 1, 2


def _stores(tmp_path, nblocks=2, size=4096):
    o = KeyStore(tmp_path / "a", A, {"B": B}, {"B": B})
    d = KeyStore(tmp_path / "b", B, {"A": A}, {"A": A})
    blocks = seeds.new_blocks(nblocks, size)
    seqs = o.add_pending("B", blocks)
    o.mark("B", seqs, BlockState.USABLE)
    d.store_received("A", list(zip(seqs, [b.data for b in blocks], strict=True)))
    return o, d


def _send(o: KeyStore, d: KeyStore) -> None:
    """Every unacknowledged message of the origin applied at the slave's node, in order,
    and acknowledged: what the key managers do over the relay."""
    from control.gkm.wire import parse

    for r in sorted(o.enc["B"].unacked):
        assert d.apply_reservation("A", parse([o.enc["B"].unacked[r]])).name == "APPLIED"
        o.reservation_acked("B", r)


def test_keys_reserved_ahead_reach_the_slave_only_once_handed_to_the_master(tmp_path):
    o, d = _stores(tmp_path)
    rseq, keys = o.reserve_ahead("B", 8, 32, ("sae-s",), "sae-m")
    assert len(keys) == 8 and o.enc["B"].unacked.keys() == {rseq}
    _send(o, d)
    ids = [str(uuid.UUID(bytes=k)) for k, _ in keys]
    with pytest.raises(StoreError, match="not yet confirmed"):  # reserved, not fetchable
        d.take_dec("A", ids[:1], "sae-s", master="sae-m")
    o.take_ahead("B", [k for k, _ in keys[:3]])  # three handed to the master
    _send(o, d)
    assert d.take_dec("A", ids[:3], "sae-s", master="sae-m") == [k for _, k in keys[:3]]
    with pytest.raises(StoreError, match="not yet confirmed"):
        d.take_dec("A", ids[3:4], "sae-s", master="sae-m")
    with pytest.raises(StoreError, match="already delivered"):
        d.take_dec("A", ids[:1], "sae-s", master="sae-m")
    # The rest survive a restart of the origin, which cancels none of them.
    o.close()
    o = KeyStore(tmp_path / "a", A, {"B": B}, {"B": B})
    recs = o.ahead_records("B")
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in recs] == \
        [(k, rseq, "sae-m", ("sae-s",), v) for k, v in keys[3:]]
    assert o.cancel_unanswered("B", keep={rseq}) == []
    # Closed unused: cancelled at both nodes, gone from the origin's records.
    o.cancel_ahead("B", [k for k, _ in keys[3:]])
    _send(o, d)
    assert o.ahead_records("B") == []
    with pytest.raises(StoreError, match="unknown or already delivered|no such key"):
        d.take_dec("A", ids[3:4], "sae-s", master="sae-m")
    assert d.summary()["dec"]["A"]["reserved_keys"] == 0
    o.close()
    d.close()


def test_a_restart_before_the_peer_acknowledged_keeps_the_reservation_ahead(tmp_path):
    """Unlike a taker's reservation (its taker is gone: cancelled), one made ahead is
    resent and its keys stay for later takes."""
    o, d = _stores(tmp_path)
    rseq, keys = o.reserve_ahead("B", 4, 32, ("sae-s",), "sae-m")
    _, r2 = o.take_enc_reserved("B", 1, 32, ("sae-s",), "sae-m")  # a taker's
    o.close()
    o = KeyStore(tmp_path / "a", A, {"B": B}, {"B": B})
    a = Ahead(0.1)
    a.restore("B", o.ahead_records("B"), set(o.enc["B"].unacked), now=0.0)
    assert a.rseqs("B") == {rseq}
    (cancel,) = o.cancel_unanswered("B", keep=a.rseqs("B"))
    from control.gkm.wire import parse

    assert parse([o.enc["B"].unacked[cancel]]).key_ids == \
        parse([o.enc["B"].unacked[r2]]).key_ids  # only the taker's is cancelled
    _send(o, d)
    a.acked("B", rseq, refused=False, now=1.0)
    assert a.ready(POOL, 4) == keys
    o.close()
    d.close()


def test_a_refused_reservation_ahead_is_forgotten_at_the_origin(tmp_path):
    o, _ = _stores(tmp_path)
    _, keys = o.reserve_ahead("B", 4, 32, ("sae-s",), "sae-m")
    o.forget_ahead("B", [k for k, _ in keys[:2]])
    assert [r[0] for r in o.ahead_records("B")] == [k for k, _ in keys[2:]]
    o.close()
