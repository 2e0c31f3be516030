"""The origin's relay bookkeeping (pure): resends with backoff, adaptive timeout, fill
hysteresis between the watermarks, rates."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from control.gkm.relay import Outbox, RateMeter, Restock

MIB = 1 << 20


def test_a_block_is_sent_at_once_then_resent_with_doubling_backoff():
    ob = Outbox(retry_s=1.0, retry_max_s=4.0)
    ob.add(0, MIB, now=0.0)
    assert ob.due(0.0, 8 * MIB, 100) == [0]
    assert ob.due(0.9, 8 * MIB, 100) == []
    sends = [t for t in (x / 10 for x in range(1, 200)) if ob.due(t, 8 * MIB, 100)]
    # resent after 1 s, then 2 s later, then every 4 s (the cap)
    assert [round(t, 1) for t in sends] == [1.0, 3.0, 7.0, 11.0, 15.0, 19.0]
    assert ob.retries == 6


def test_acknowledged_blocks_leave_and_measure_the_ack_delay():
    ob = Outbox(retry_s=1.0)
    for seq in range(4):
        ob.add(seq, MIB, 0.0)
    assert ob.due(0.0, 2 * MIB, 100) == [0, 1]  # a batch stops at max_bytes
    assert ob.due(0.0, 2 * MIB, 100) == [2, 3]
    assert ob.pending_bytes == 4 * MIB
    assert ob.acked(1, 0.2) == MIB
    assert ob.acked(1, 0.3) == 0  # a second ACK is harmless
    assert ob.srtt == 0.2
    assert ob.pending_bytes == 3 * MIB and sorted(ob.pending) == [0, 2, 3]


def test_resent_blocks_do_not_feed_the_timeout_estimate():
    ob = Outbox(retry_s=1.0)
    ob.add(0, 100, 0.0)
    ob.due(0.0, MIB, 10)
    ob.due(1.0, MIB, 10)  # resent
    ob.acked(0, 1.05)     # ambiguous sample (Karn): ignored
    assert ob.srtt is None


def test_a_slow_path_stretches_the_timeout_instead_of_flooding_it():
    ob = Outbox(retry_s=0.5, retry_max_s=30)
    for seq in range(20):
        ob.add(seq, 10, 0.0)
        ob.due(seq * 1.0, MIB, 10)
        ob.acked(seq, seq * 1.0 + 2.0)  # every ACK takes 2 s
    assert 7.0 <= ob.timeout(1) <= 8.0  # 4 x the smoothed delay, not 0.5 s


def test_batches_respect_the_block_limit_and_always_carry_one():
    ob = Outbox()
    for seq in range(10):
        ob.add(seq, 16 * MIB, 0.0)
    assert ob.due(0.0, 4 * MIB, 3) == [0]  # larger than max_bytes alone: still sent
    ob2 = Outbox()
    for seq in range(10):
        ob2.add(seq, 10, 0.0)
    assert ob2.due(0.0, MIB, 3) == [0, 1, 2]


def test_unsent_and_new_connection():
    ob = Outbox(retry_s=1.0)
    ob.add(0, 10, 0.0)
    ob.add(1, 10, 0.0)
    seqs = ob.due(0.0, MIB, 10)
    ob.unsent(seqs, 0.0)  # refused by the transport: later, not now
    assert ob.due(0.5, MIB, 10) == []
    assert ob.due(1.0, MIB, 10) == [0, 1]
    ob.unsent([0, 1], 1.0)  # refused again: still no retry counted, no delay sample
    assert ob.retries == 0 and ob.pending[0].attempts == 0
    ob.resend_all(0.6)     # a new connection: everything again, now
    assert ob.due(0.6, MIB, 10) == [0, 1]


def test_conflicting_block_is_dropped_from_the_outbox_and_counted():
    ob = Outbox()
    ob.add(3, 50, 0.0)
    ob.due(0.0, MIB, 10)
    ob.conflict(3, 0.1)
    assert not ob.pending and ob.pending_bytes == 0 and ob.conflicts == 1


def test_state_reports_unreachable_when_nothing_is_acknowledged():
    ob = Outbox(retry_s=1.0)
    assert ob.state(0.0, 3.0) == "ok"
    ob.add(0, 10, 0.0)
    ob.due(0.0, MIB, 10)
    assert ob.state(0.5, 3.0) == "ok"
    ob.due(1.0, MIB, 10)
    assert ob.state(1.5, 3.0) == "retrying"
    assert ob.state(3.5, 3.0) == "unreachable"
    ob.acked(0, 3.6)
    assert ob.state(3.7, 3.0) == "ok"


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["add", "send", "ack", "conflict", "reconnect"]),
                          st.integers(0, 30), st.floats(0, 2)), max_size=80))
def test_outbox_accounting_never_drifts(ops):
    """Random sends, ACKs (also duplicate and unknown), conflicts and reconnects: the
    pending byte count always matches the pending blocks, nothing leaves twice."""
    ob = Outbox(retry_s=0.3)
    now = 0.0
    left = set()
    for op, seq, dt in ops:
        now += dt
        if op == "add":
            ob.add(seq, seq + 1, now)
            left.add(seq)
        elif op == "send":
            for s in ob.due(now, 64, 5):
                assert s in left
        elif op == "ack":
            assert ob.acked(seq, now) == (seq + 1 if seq in left else 0)
            left.discard(seq)
        elif op == "conflict":
            ob.conflict(seq, now)
            left.discard(seq)
        else:
            ob.resend_all(now)
        assert set(ob.pending) == left
        assert ob.pending_bytes == sum(s + 1 for s in left)


def test_restock_fills_from_low_to_high_and_never_above():
    r = Restock(low=4 * MIB, high=8 * MIB, block=MIB)
    assert r.blocks_to_make(usable=5 * MIB, pending=0, now=0.0) == 0  # above low: idle
    assert r.blocks_to_make(usable=3 * MIB, pending=0, now=1.0) == 5  # under low: to high
    assert r.filling
    assert r.blocks_to_make(usable=3 * MIB, pending=5 * MIB, now=1.1) == 0  # all in flight
    r.acked(5 * MIB)
    assert r.blocks_to_make(usable=7 * MIB, pending=0, now=1.2) == 1  # taken meanwhile
    r.acked(MIB)
    assert r.blocks_to_make(usable=8 * MIB, pending=0, now=2.0) == 0
    assert not r.filling
    assert r.last.bytes == 6 * MIB and r.last.seconds == 1.0
    # Hysteresis: a little consumption does not start a new fill.
    assert r.blocks_to_make(usable=5 * MIB, pending=0, now=3.0) == 0


def test_restock_with_a_block_that_does_not_divide_the_watermark():
    r = Restock(low=100, high=1000, block=300)
    assert r.blocks_to_make(0, 0, 0.0) == 3          # 900: a fourth would exceed 1000
    assert r.blocks_to_make(900, 0, 1.0) == 0 and not r.filling


@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 16),
       st.lists(st.integers(0, 3), max_size=60))
def test_restock_simulation_stays_within_bounds(low_blocks, extra, block, takes):
    """Simulate fills, ACKs and takes: stored key never exceeds high, and a fill ends
    only when the usable key is within one block of high."""
    low, high = low_blocks * block, (low_blocks + extra) * block
    r = Restock(low=low, high=high, block=block)
    usable = pending = 0
    rng = random.Random(low + high)
    for t, take in enumerate(takes):
        pending += block * r.blocks_to_make(usable, pending, float(t))
        assert usable + pending <= high
        acked = rng.randint(0, pending // block) * block
        pending -= acked
        usable += acked
        r.acked(acked)
        usable = max(0, usable - take * block)
    if r.last is not None:
        assert r.last.bytes > 0


def test_rate_meter_counts_the_last_seconds():
    m = RateMeter(span=2.0)
    m.add(1000, 0.0)
    m.add(1000, 1.0)
    assert m.rate(1.5) == 1000.0
    assert m.rate(2.5) == 500.0
    assert m.rate(10.0) == 0.0 and m.total == 2000


def test_no_resend_while_acknowledgements_keep_coming_then_resent_once_they_stop():
    """A window sent at once over a slow path: its last blocks are acknowledged long
    after the timeout, but every ACK shows the stream moving, so nothing is resent (each
    resend would spend key on every hop); a block whose ACK never comes is resent one
    timeout after the last ACK; a new connection resends at once."""
    ob = Outbox(retry_s=1.0, retry_max_s=8.0)
    for seq in range(8):
        ob.add(seq, MIB, 0.0)
    assert ob.due(0.0, 8 * MIB, 100) == list(range(8))
    t = 0.0
    for seq in range(7):  # block 7's ACK never comes
        t += 0.6
        assert ob.due(t, 8 * MIB, 100) == [], t
        ob.acked(seq, t)
    assert ob.retries == 0 and list(ob.pending) == [7]
    assert ob.due(t + 0.9, 8 * MIB, 100) == []
    assert ob.due(t + ob.timeout(1) + 0.01, 8 * MIB, 100) == [7]
    assert ob.retries == 1
    ob.resend_all(t + 5.0)
    assert ob.due(t + 5.0, 8 * MIB, 100) == [7]
