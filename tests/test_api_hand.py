"""A key API worker's hand (api.hand) and the demand that sizes it (control.core.demand):
pure rules, no I/O."""

from __future__ import annotations

from api.hand import (
    HAND_IDLE_S,
    HAND_MAX_BYTES,
    MAX_HANDS_PER_MASTER,
    MAX_PAIRS,
    MAX_PAIRS_PER_MASTER,
    MIN_HAND_KEYS,
    REFUSED_PAUSE_S,
    Hand,
    max_keys,
)
from api.hand_counts import HandTable
from control.core.demand import REFILL_SHARE, Demand, to_take

PAIR = ("B", "a1", ("b1",), 32)


def _keys(n: int, start: int = 0) -> list:
    return [(f"id-{i}", bytearray([i % 256]) * 32) for i in range(start, start + n)]


def _steady(hand: Hand, pair=PAIR, number: int = 1, per_s: int = 100, t0: float = 0.0,
            seconds: float = 1.0) -> float:
    t = t0
    for _ in range(int(per_s * seconds)):
        t += 1 / per_s
        hand.note(pair, number, t)
    return t


def test_demand_aims_at_its_seconds_and_at_least_its_largest_take():
    d = Demand()
    for i in range(100):  # 100 takes of 3 keys in one second, and one of 40
        d.note(3, i / 100)
    d.note(40, 0.995)
    assert d.target(0.1, 10_000, 1.0) == max(-(-340 // 10), 40) == 40
    assert d.target(0.5, 10_000, 1.0) == 170
    assert d.target(0.5, 64, 1.0) == 64                   # capped
    assert d.target(0.1, 10_000, 2.5) == 0                # the window has passed
    assert d.target(0.0, 10_000, 1.0) == 0                # off


def test_demand_too_thin_holds_nothing():
    d = Demand()
    for i in range(15):  # 15 takes a second: 1.5 expected in 0.1 s, fewer than 2
        d.note(500, i / 15)
    assert d.target(0.1, 10_000, 1.0) == 0
    assert d.target(0.2, 10_000, 1.0) == 1500  # 3 expected in 0.2 s: 0.2 s of 7,500


def test_near_its_cap_a_refill_waits_for_a_quarter_missing():
    """An aim at (or near) the most held refilled at once took a few keys at a time, one
    take each (a thousand takes a second at 12,000 requests a second)."""
    d = Demand()
    for i in range(12_000):  # 12,000 takes of one key in a second: 1,200 aimed at
        d.note(1, i / 12_000)
    most = 1024
    assert d.target(0.1, most, 1.0) == most
    low = most - most // REFILL_SHARE
    assert to_take(d, most - 1, 0.1, most, 1.0) == 0        # one key short: not yet
    assert to_take(d, low, 0.1, most, 1.0) == 0
    assert to_take(d, low - 1, 0.1, most, 1.0) == most - low + 1  # up to the cap
    # Below the cap's reach the aim is the mark, as before: refilled to twice it.
    thin = Demand()
    for i in range(100):
        thin.note(1, i / 100)
    assert to_take(thin, 9, 0.1, most, 1.0) == 11 and to_take(thin, 10, 0.1, most, 1.0) == 0
    # A take too large for what that mark leaves is still served whole.
    big = Demand()
    for i in range(100):
        big.note(1000, i / 100)
    assert to_take(big, 900, 0.1, most, 1.0) == most - 900 > 0


def test_serve_is_note_take_and_wanted_in_one():
    one, three = Hand(0.1), Hand(0.1)
    answers = []
    for i in range(300):
        now = i / 100
        if i % 25 == 0:
            for h in (one, three):
                h.filled(PAIR, _keys(12, i))
        got, n = one.serve(PAIR, 1, now)
        three.note(PAIR, 1, now)
        assert (got, n) == (three.take(PAIR, 1), three.wanted(PAIR, now))
        answers.append(got is None)
    assert one.counts.get() == three.counts.get()
    assert True in answers and False in answers  # served from the hand, and not


def test_a_hand_fills_for_steady_demand_and_serves_whole_requests_in_order():
    hand = Hand(0.1)
    assert hand.take(PAIR, 1) is None and hand.wanted(PAIR, 0.0) == 0
    now = _steady(hand)
    assert hand.wanted(PAIR, now) == 20  # 10 keys aimed at, refilled to twice that
    hand.filling(PAIR)
    assert hand.wanted(PAIR, now) == 0   # one take at a time
    hand.filled(PAIR, _keys(20))
    assert [k for k, _ in hand.take(PAIR, 3)] == ["id-0", "id-1", "id-2"]
    assert hand.take(PAIR, 18) is None   # fewer than asked: the long way, nothing taken
    assert len(hand.take(PAIR, 17)) == 17
    assert (hand.counts["served_keys"], hand.counts["taken_keys"]) == (20, 20)
    assert hand.counts["held_keys"] == 0
    assert hand.take(("B", "a1", ("b2",), 32), 1) is None  # another slave: not this hand


def test_a_refused_refill_pauses_the_hand():
    hand = Hand(0.1)
    now = _steady(hand)
    hand.filling(PAIR)
    hand.refused(PAIR, now)
    assert hand.wanted(PAIR, now + REFUSED_PAUSE_S / 2) == 0
    later = _steady(hand, t0=now, seconds=REFUSED_PAUSE_S)  # the demand goes on
    assert hand.wanted(PAIR, later) == 20


def test_sizes_no_hand_can_serve_are_not_demand():
    hand = Hand(0.1)
    big = ("B", "a1", ("b1",), HAND_MAX_BYTES // MIN_HAND_KEYS + 1)  # < 16 fit
    now = _steady(hand, big)
    assert hand.wanted(big, now) == 0 and big not in hand.hands
    assert max_keys(32) == 1024 and max_keys(2048) == 16
    now = _steady(hand, number=max_keys(32) + 1)  # more than a hand holds
    assert hand.wanted(PAIR, now) == 0
    assert Hand(0.0).wanted(PAIR, _steady(Hand(0.0))) == 0  # reserve_ahead_s = 0: off


def test_idle_hands_and_every_hand_at_stop_are_given_back_counted():
    hand = Hand(0.1)
    now = _steady(hand)
    hand.filled(PAIR, _keys(20))
    other = ("B", "a2", ("b1",), 32)
    hand.note(other, 1, now + HAND_IDLE_S / 2)
    hand.filled(other, _keys(5, 100))
    assert hand.idle(now + HAND_IDLE_S - 1) == []
    ((pair, keys),) = hand.idle(now + HAND_IDLE_S)
    assert pair == PAIR and [k for k, _ in keys] == [f"id-{i}" for i in range(20)]
    assert PAIR not in hand.hands and sum(len(h.keys) for h in hand.hands.values()) == 5
    assert hand.counts["held_keys"] == 25  # held until the give-back is answered
    hand.given_back(keys)
    filling = ("B", "a3", ("b1",), 32)
    hand.filling(filling)  # a hand being filled waits for its take
    ((pair, keys),) = hand.idle(now + 10 * HAND_IDLE_S)
    assert pair == other and len(keys) == 5 and filling in hand.hands
    hand.lost(keys)  # its give-back failed
    hand.filled(filling, _keys(3, 200))
    ((pair, keys),) = hand.empty()
    assert (pair, len(keys)) == (filling, 3)
    hand.given_back(keys)
    assert hand.hands == {} and hand.empty() == []
    c = hand.counts.get()
    assert (c["given_back_keys"], c["given_back_bytes"], c["lost_keys"], c["lost_bytes"],
            c["held_keys"], c["held_bytes"]) == (23, 23 * 32, 5, 5 * 32, 0, 0)


def test_a_master_gets_a_few_hands_however_many_sizes_it_asks_for():
    hand = Hand(0.1)
    now = 0.0
    sizes = [32 + 8 * i for i in range(MAX_HANDS_PER_MASTER + 2)]
    for _ in range(100):  # each size asked for 100 times a second
        now += 0.01
        for size in sizes:
            hand.note(("B", "a1", ("b1",), size), 1, now)
    wanting = [size for size in sizes if hand.wanted(("B", "a1", ("b1",), size), now)]
    assert len(wanting) == len(sizes)  # none holds keys yet
    for size in sizes[:MAX_HANDS_PER_MASTER]:
        hand.filled(("B", "a1", ("b1",), size), _keys(1))
    assert hand.wanted(("B", "a1", ("b1",), sizes[-1]), now) == 0  # four hold keys
    other = ("B", "a2", ("b1",), 32)  # another master is not held back by a1
    assert hand.wanted(other, _steady(hand, other, t0=now, seconds=0.3)) > 0
    for i in range(MAX_PAIRS + 10):  # the demand of a bounded number of pairs is followed
        hand.note(("B", f"m{i}", ("b1",), 32), 1, now)
    assert len(hand.hands) == MAX_PAIRS


def test_hand_counts_rows_are_shared_with_the_manager_and_a_dead_workers_held_keys_lost():
    import os

    table = HandTable(2)
    pid = os.fork()
    if pid == 0:  # a worker, forked after the table: counts in its slot's row
        try:
            hand = Hand(0.1, table.row(1))
            hand.filled(PAIR, _keys(20))
            hand.take(PAIR, 5)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    got = table.totals()
    assert (got["taken_keys"], got["served_keys"], got["held_keys"], got["held_bytes"]) == \
        (20, 5, 15, 15 * 32)
    assert table.worker_ended(1) == 15  # it died holding 15 keys: lost
    got = table.totals()
    assert (got["held_keys"], got["lost_keys"], got["lost_bytes"]) == (0, 15, 15 * 32)
    assert (got["taken_keys"], got["served_keys"]) == (20, 5)  # kept after it ended
    assert table.row(1).get()["taken_keys"] == 0  # the slot's next worker starts at 0


def test_one_master_cannot_fill_a_workers_followed_pairs_for_the_others():
    hand = Hand(0.1)
    for i in range(MAX_PAIRS_PER_MASTER + 20):  # ever new sizes
        hand.note(("B", "a1", ("b1",), 32 + 8 * i), 1, 0.0)
    assert len(hand.hands) == MAX_PAIRS_PER_MASTER
    hand.note(("B", "a2", ("b1",), 32), 1, 0.0)
    assert ("B", "a2", ("b1",), 32) in hand.hands
