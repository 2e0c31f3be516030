"""Tests of control/core/sizing.py: sizes that follow a link's key rate."""

from __future__ import annotations

import pytest

from control.core.sizing import (
    KIB,
    MAX_FIXED_SHARE,
    MIB,
    bytes_per_s,
    gkm_sizes,
    heartbeat_period,
    keepalive_period,
    link_sizes,
    pow2_floor,
    rate_floor,
)
from dataplane.limits import KEEPALIVE_MAX_S


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


def keepalive_cost(period: float, lsdb: int) -> float:
    """Bytes of key a second keepalives of ``period`` spend, the database carried in one
    of them a second (or in each, when they are further apart)."""
    from control.core.sizing import KEEPALIVE_BODY
    from dataplane.wire import MAC_KEY_LEN
    return (MAC_KEY_LEN + KEEPALIVE_BODY) / period + lsdb / max(period, 1.0)


@pytest.mark.parametrize("rate,ratio,lsdb,period", [
    (1000, (1, 1), 214, 0.2),   # fast links keep the 0.2 s they always had
    (1, (1, 1), 214, 0.2),      # and so does 1 Mb/s: 0.5 kB/s is 0.8 % of a direction
    (1, (3, 1), 214, 0.2),      # the triangle's 3:1 link at 1 Mb/s (the demo at 1 Mb/s)
    (1, (3, 1), 300, None),     # ... a little longer with a larger database
    (0.2, (1, 1), 214, None),   # below: longer, up to the 2 % of key
    (0.05, (1, 1), 214, None),
    (0.01, (1, 1), 214, 10.0),  # 10 kb/s: the longest period, over 2 % (4.6 %)
    (1, (1, 1), 1400, None),    # a 16-node ring's database at 1 Mb/s
])
def test_keepalives_take_at_most_two_percent_of_a_slow_links_key(rate, ratio, lsdb, period):
    from control.core.sizing import KEEPALIVE_S
    s = link_sizes(rate, ratio, lsdb_bytes=lsdb)
    direction = rate * 1e6 / 8 * min(x for x in ratio if x) / sum(ratio)
    share = keepalive_cost(s.keepalive_s, lsdb) / direction
    if period is not None:
        assert s.keepalive_s == pytest.approx(period)
    else:
        assert s.keepalive_s > KEEPALIVE_S
        assert share == pytest.approx(0.02, rel=0.01)  # no longer than it must be
    if s.keepalive_s < 10.0:
        assert share <= 0.02 + 1e-9
    else:
        assert share == pytest.approx(0.046, abs=0.001)
    # the same period at both ends: both derive it from the slower direction
    assert link_sizes(rate, ratio[::-1], lsdb_bytes=lsdb).keepalive_s == s.keepalive_s


def test_a_longer_keepalive_period_gives_a_silent_peer_and_the_link_state_longer():
    from control.core.sizing import lsa_max_age
    fast, slow = link_sizes(10, (1, 1), lsdb_bytes=300), link_sizes(0.05, (1, 1),
                                                                     lsdb_bytes=300)
    assert fast.peer_dead_s == pytest.approx((1.0, 3.0))
    assert slow.peer_dead_s == pytest.approx((5 * slow.keepalive_s, 15 * slow.keepalive_s))
    assert lsa_max_age([fast.keepalive_s]) == pytest.approx(5.0)
    # 25 periods, as 5 s are at 0.2 s: past the peer's longest timeout (15) and a refresh
    assert lsa_max_age([fast.keepalive_s, slow.keepalive_s]) == \
        pytest.approx(25 * slow.keepalive_s)
    assert lsa_max_age([fast.keepalive_s, slow.keepalive_s]) > slow.peer_dead_s[1] + \
        slow.keepalive_s


def test_the_database_estimate_is_what_the_routers_flood():
    """The estimate the period is sized by against the database a router exports for a
    32-node ring, every entry originated: never below it, within 15 % of it with every
    link up at cost 1, and equal to it with every link down at the highest cost."""
    import json
    import time

    from control.core.config import load_topology
    from control.core.sizing import KEEPALIVE_S, lsdb_estimate
    from control.routing.linkcost import MAX_COST
    from control.routing.linkstate import LinkEnds, LinkStateDb
    ring = load_topology("examples/ring32.toml")
    db = LinkStateDb([LinkEnds(lk.name, lk.index, lk.a, lk.b) for lk in ring.links])
    for node in ring.nodes:
        db.originate(node, {lk.name: True for lk in ring.links_of(node)},
                     time.time_ns() // 1000, 0.0)
    flooded = len(json.dumps({"lsdb": db.export()}, separators=(",", ":")))
    estimate = lsdb_estimate([(lk.name, lk.a, lk.b) for lk in ring.links])
    assert flooded <= estimate <= 1.15 * flooded
    for node in ring.nodes:
        db.originate(node, {lk.name: False for lk in ring.links_of(node)},
                     time.time_ns() // 1000, 0.0, {lk.name: MAX_COST for lk in ring.links})
    assert len(json.dumps({"lsdb": db.export()}, separators=(",", ":"))) == estimate
    # the ring at its 25 Mb/s: the shortest period; its database on 1 Mb/s links: longer
    assert {lk.sizes.keepalive_s for lk in ring.links} == {KEEPALIVE_S}
    assert link_sizes(1, (1, 1), lsdb_bytes=estimate).keepalive_s > KEEPALIVE_S


def test_a_keepalives_words_fit_the_estimate_at_the_longest_names():
    """KEEPALIVE_BODY against what a tunnel manager writes: the longest node name the
    topology file allows and the largest pool."""
    import json

    from control.core.config import NAME_RE
    from control.core.sizing import KEEPALIVE_BODY
    from dataplane.limits import MAX_WORKERS
    longest = "N" * 8
    assert NAME_RE.fullmatch(longest) and not NAME_RE.fullmatch(longest + "N")
    words = json.dumps({"node": longest, "workers": MAX_WORKERS}, separators=(",", ":"))
    assert len(words) <= KEEPALIVE_BODY


@pytest.mark.parametrize("slowest,direction,connections,period", [
    (0, None, 2, 5.0),          # as fast as possible
    (1000, None, 12, 5.0),
    (1, 0.5, 4, 5.0),           # a pair each way on a 1 Mb/s link: 1.2 s would do
    (1, 0.25, 12, 7.3),         # the triangle at 1 Mb/s, A-C at 3:1, every pair
    (0.2, 0.1, 4, 6.1),
    (0.05, 0.025, 4, 24.3),     # the slow-link test's network
    (0.05, 0.025, 12, 60.0),    # ... a triangle of them: the longest, 1.2 %
])
def test_the_relays_pings_take_at_most_one_percent_of_the_slowest_direction(
        slowest, direction, connections, period):
    from control.core.sizing import PING_ROUND_B
    g = gkm_sizes(slowest, slowest_direction_mbps=direction, connections=connections)
    assert g.heartbeat_s == pytest.approx(period, abs=0.05)
    if slowest and g.heartbeat_s < 60.0:
        spent = connections * PING_ROUND_B / g.heartbeat_s
        assert spent <= 0.01 * (direction or slowest / 2) * 1e6 / 8 * 1.0001


def test_at_the_rate_floor_the_periods_are_at_their_longest_and_take_half_the_key():
    """The floor lies where neither period can stretch further, so the fixed costs are
    what rate_floor counts, and they take MAX_FIXED_SHARE of the slower direction."""
    for ratio, lsdb, conns in (((1, 1), 238, 12), ((3, 1), 2531, 100), ((1, 1), 86, 0)):
        f = rate_floor(ratio, lsdb, conns)
        direction = bytes_per_s(f.mbps) * min(ratio) / sum(ratio)
        assert keepalive_period(direction, lsdb) == KEEPALIVE_MAX_S
        if conns:
            assert heartbeat_period(direction, conns) == 60.0
        assert f.keepalive_bps + f.ping_bps == pytest.approx(MAX_FIXED_SHARE * direction)
