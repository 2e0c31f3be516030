"""Tests of a link end's cost under the key metric (control/routing/linkcost.py): pure."""

from __future__ import annotations

from control.routing.linkcost import (
    HIGH_SHARE,
    LOW_SHARE,
    MAX_COST,
    MIN_PENALTY,
    EndCost,
    dry_penalty,
)

MIB = 1 << 20


def test_the_penalty_is_the_refill_time_in_seconds_within_bounds():
    # 4 MiB ring, 1 Mb/s of key this way: half the ring takes 16.8 s
    assert dry_penalty(4 * MIB, 125_000) == 17
    assert dry_penalty(16 * MIB, 6.25e6) == MIN_PENALTY  # 1.3 s: at least MIN_PENALTY
    assert dry_penalty(256 * MIB, 1_000) == MAX_COST - 1
    assert dry_penalty(4 * MIB, 0) == MIN_PENALTY  # an unlimited emulator refills at once
    assert dry_penalty(4 * MIB, float("inf")) == MIN_PENALTY


def test_a_full_ring_costs_1_and_a_dry_one_the_penalty():
    end = EndCost(capacity=4 * MIB, key_bytes_per_s=125_000)
    assert end.update(4 * MIB) == 1
    assert end.update(int(LOW_SHARE * 4 * MIB)) == 1  # at the low share: not yet dry
    assert end.update(int(LOW_SHARE * 4 * MIB) - 1) == 18


def test_hysteresis_a_dry_link_is_dear_until_it_holds_the_high_share():
    end = EndCost(capacity=1000, key_bytes_per_s=10.0)
    costs = [end.update(a) for a in (900, 300, 240, 300, 500, 749, 750, 500, 260, 249)]
    dear = 1 + dry_penalty(1000, 10.0)
    assert costs == [1, 1, dear, dear, dear, dear, 1, 1, 1, dear]
    assert HIGH_SHARE * 1000 == 750


def test_an_empty_ring_of_no_capacity_is_dry():
    assert EndCost(capacity=0, key_bytes_per_s=1.0).update(0) > 1


def test_a_ring_with_no_room_left_counts_as_refilled_once_it_holds_half():
    """A worker's kept range may pin up to half the ring (used, not yet freed): the ring is
    then full below HIGH_SHARE, and waiting longer would keep the link dry for ever."""
    end = EndCost(capacity=1000, key_bytes_per_s=10.0)
    assert end.update(200) > 1
    assert end.update(600, room_used=1000) == 1  # full, and at least half held: refilled
    end.update(200)
    assert end.update(400, room_used=1000) > 1  # full but under half: still dry
    assert end.update(600, room_used=800) > 1  # room left: wait for HIGH_SHARE
