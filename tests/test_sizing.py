"""Tests of control/core/sizing.py: sizes that follow a link's key rate."""

from __future__ import annotations

import pytest

from control.core.sizing import KIB, MIB, gkm_sizes, link_sizes, pow2_floor


def test_pow2_floor():
    assert [pow2_floor(x) for x in (0, 0.5, 1, 2, 3, 4, 1000, 1024, 1025)] == \
        [1, 1, 1, 2, 2, 4, 512, 1024, 1024]


@pytest.mark.parametrize("rate,block,ring,chunk", [
    (1, 4 * KIB, 4 * MIB, 4 * KIB),        # 1 Mb/s: 6 KB blocks would be 50 ms
    (10, 32 * KIB, 4 * MIB, 8 * KIB),
    (100, 512 * KIB, 16 * MIB, 64 * KIB),
    (1000, MIB, 128 * MIB, MIB // 2),
    (10_000, MIB, 256 * MIB, MIB),
    (0, MIB, 128 * MIB, MIB // 2),          # as fast as possible: sized as 1 Gb/s
])
def test_link_sizes_follow_the_rate(rate, block, ring, chunk):
    s = link_sizes(rate, (1, 1))
    assert (s.block_size, s.ring_capacity, s.chunk) == (block, ring, chunk)
    assert s.chunk <= max(4 * KIB, s.ring_capacity // 256)
    assert s.reserve_control <= s.reserve_bulk <= s.ring_capacity // 8
    assert s.pin_limit == s.ring_capacity // 2


def test_a_block_arrives_well_within_the_link_dead_time_at_every_derived_size():
    for rate in (0.5, 1, 2, 10, 100, 1000):
        for ratio in ((1, 1), (3, 1), (1, 0)):
            s = link_sizes(rate, ratio)
            share = min(x for x in ratio if x) / sum(ratio)
            interval = s.block_size * 8 / (rate * 1e6 * share)
            assert s.key_dead_s >= 4 * interval  # never "no key" between two blocks


def test_sizes_set_in_the_file_win():
    s = link_sizes(10, (1, 1), block_size=MIB, ring_capacity=64 * MIB, chunk=MIB)
    assert (s.block_size, s.ring_capacity, s.chunk) == (MIB, 64 * MIB, MIB)
    assert s.key_dead_s == pytest.approx(4 * MIB / (10e6 / 8 / 2))  # 1 MiB every 1.7 s


@pytest.mark.parametrize("rate,block,window,low,high", [
    (1, 16 * KIB, 64 * KIB, MIB, 2 * MIB),
    (10, 256 * KIB, MIB, 16 * MIB, 32 * MIB),
    (1000, MIB, 16 * MIB, 32 * MIB, 64 * MIB),
])
def test_gkm_sizes_follow_the_slowest_link(rate, block, window, low, high):
    g = gkm_sizes(rate)
    assert (g.block_size, g.window, g.low_watermark, g.high_watermark) == \
        (block, window, low, high)


def test_gkm_given_sizes_win_and_a_given_low_watermark_lifts_the_high_one():
    g = gkm_sizes(1, low=10 * MIB)
    assert g.low_watermark == 10 * MIB and g.high_watermark >= 10 * MIB + 2 * g.block_size
    assert gkm_sizes(1, block_size=MIB, window=3 * MIB).window == 3 * MIB
