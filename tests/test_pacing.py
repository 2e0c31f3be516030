"""Tests of control/gkm/pacing.py: global key relay paced by the key of its path."""

from __future__ import annotations

import math

import pytest

from control.gkm.pacing import Hop, Pacer, path_rate, resend_after, window


def test_path_rate_is_the_slowest_hop_in_its_direction():
    fast, slow = Hop(100, (1, 1), True), Hop(10, (3, 1), True)
    assert path_rate([fast]) == pytest.approx(100e6 / 8 / 2)
    assert path_rate([fast, slow]) == pytest.approx(10e6 / 8 * 3 / 4)
    assert path_rate([fast, Hop(10, (3, 1), False)]) == pytest.approx(10e6 / 8 / 4)
    assert path_rate([Hop(10, (1, 0), False)]) == 0  # no key that way at all
    assert path_rate([Hop(0, (1, 1), True)]) == math.inf  # as fast as possible
    assert path_rate([]) == math.inf


def test_window_is_a_second_of_the_path_within_bounds():
    assert window(16 << 20, 1 << 20, math.inf) == 16 << 20
    assert window(16 << 20, 16 << 10, 62_500) == 62_500
    assert window(16 << 20, 64 << 10, 62_500) == 128 << 10  # two blocks at least
    assert window(1 << 20, 64 << 10, 100e6) == 1 << 20  # the configured one at most


def test_resend_waits_for_what_is_in_flight_to_drain():
    assert resend_after(0, 62_500, None, 2.0) == 2.0
    assert resend_after(1 << 20, 62_500, None, 2.0) == pytest.approx(2 * (1 << 20) / 62_500)
    assert resend_after(1 << 20, math.inf, 0.5, 2.0) == 2.0
    assert resend_after(1 << 20, math.inf, 1.0, 2.0) == 4.0


def test_pacer_lets_the_rate_through_and_no_more():
    p = Pacer(1000.0, 500)
    sent, now = 0, 0.0
    while now < 10.0:
        if p.allows(100, now):
            p.spend(100, now)
            sent += 100
        now += 0.01
    assert 10_000 <= sent <= 10_500 + 100  # 10 s at 1000 B/s, plus the first burst


def test_a_message_above_the_burst_waits_for_a_full_bucket_then_goes_in_debt():
    p = Pacer(1000.0, 500)
    assert p.allows(2000, 0.0)  # full bucket
    p.spend(2000, 0.0)
    assert not p.allows(100, 1.0)  # 500 of debt left at t=1
    assert p.next_at(100, 1.0) == pytest.approx(1.6)
    assert p.allows(100, 1.6)


def test_unlimited_and_stopped_pacers():
    p = Pacer(math.inf, 0)
    assert p.allows(1 << 30, 0.0) and p.next_at(1 << 30, 5.0) == 5.0
    q = Pacer(0.0, 1)
    q.spend(1, 0.0)
    assert not q.allows(1, 100.0) and q.next_at(1, 100.0) == math.inf


def test_a_one_link_paths_stock_above_the_floor_may_go_at_once_beyond_the_burst():
    from control.gkm.pacing import STOCK_FLOOR, spendable_stock

    assert spendable_stock(4 << 20, 4 << 20) == int((1 - STOCK_FLOOR) * (4 << 20))
    assert spendable_stock(int(STOCK_FLOOR * 1000), 1000) == 0
    assert spendable_stock(0, 1000) == 0
    p = Pacer(rate=1000.0, burst=100)
    p.spend(100, now=0.0)
    p.credit(5000)
    assert p.allows(4000, now=0.0) and p.tokens == 5000  # credited now, beyond the burst
    p.spend(4000, now=0.0)
    assert p.tokens == 1000  # above the burst: no refill on top of it
    assert p.next_at(100, now=1.0) == 1.0
    p.spend(1000, now=1.0)
    assert p.tokens == 0 and p.next_at(100, now=1.0) == 1.1  # back to the rate
    p.credit(10)
    assert p.tokens == 10  # a credit tops the bucket up to it ...
    p.credit(5)
    assert p.tokens == 10  # ... and never takes tokens away
