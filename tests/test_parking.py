"""Tests of dataplane/parking.py: datagrams waiting for key, kept without a stall."""

from __future__ import annotations

from dataplane.parking import ParkingLot, ParkPacer
from dataplane.wire import Header


def hdr(pos: int, lane: int = 0) -> Header:
    return Header(0, 0, lane, 0, pos, 0, 100)


def test_parked_until_the_slots_run_out_then_the_highest_position_goes():
    lot = ParkingLot(3)
    got = [lot.park(hdr(p), 132, 1.0) for p in (500, 100, 300)]
    assert all(p is not None and out is None for p, out in got)
    assert len({p.slot for p, _ in got}) == 3 and len(lot) == 3
    assert lot.park(hdr(900), 132, 1.0) == (None, None)  # further ahead than all: dropped
    kept, out = lot.park(hdr(200), 132, 1.0)
    assert out.hdr.pos == 500 and kept.slot == out.slot  # its slot is reused
    assert [p.hdr.pos for p in lot.in_order()] == [100, 200, 300]


def test_leaving_frees_the_slot_and_deadlines_are_tracked():
    lot = ParkingLot(2)
    assert lot.earliest_deadline() == float("inf")
    p, _ = lot.park(hdr(10), 132, 2.0)
    lot.park(hdr(5), 132, 1.5)
    assert lot.earliest_deadline() == 1.5
    assert lot.park(hdr(20), 132, 1.0) == (None, None)
    lot.leave(p)
    q, out = lot.park(hdr(20), 132, 3.0)
    assert q.slot == p.slot and out is None and len(lot) == 2


def test_what_goes_before_a_datagram_is_its_own_lanes_lower_positions():
    lot = ParkingLot(8)
    for pos, lane in ((10, 1), (20, 2), (30, 1), (40, 1), (50, 2)):
        lot.park(hdr(pos, lane), 132, 1.0)
    assert [p.hdr.pos for p in lot.before(1, 40)] == [10, 30]
    assert [p.hdr.pos for p in lot.before(2, 100)] == [20, 50]
    assert lot.before(3, 100) == []


def test_the_pacer_lets_a_burst_then_the_rate_through():
    pacer = ParkPacer(rate=1000, burst=10)
    assert sum(pacer.allow(0.0) for _ in range(100)) in (10, 11)  # the burst
    allowed = sum(pacer.allow(t / 1e4) for t in range(1, 10_001))  # one second, 10 kHz
    assert 990 <= allowed <= 1010
