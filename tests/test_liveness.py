"""The peer-liveness verdict (dataplane.liveness), driven with made-up clocks."""

from __future__ import annotations

import pytest

from dataplane.limits import KEEPALIVE_S, LINK_DEAD_MAX_S, LINK_DEAD_S, UP_AFTER_KEEPALIVES
from dataplane.liveness import PeerLiveness


def steady(lv: PeerLiveness, start: float, n: int, period: float = KEEPALIVE_S,
           loop: float = 0.02) -> float:
    """``n`` keepalives every ``period``, our loop turning every ``loop``; returns the
    time of the last one."""
    t = start
    for _ in range(n):
        nxt = t + period
        while t < nxt:
            t = min(nxt, t + loop)
            lv.tick(t)
            lv.alive(t)
        lv.heard(t)
    return t


def silent_for(lv: PeerLiveness, start: float, seconds: float, loop: float = 0.02
               ) -> float | None:
    """Our loop turns for ``seconds`` with nothing heard; when the verdict fell (None if
    it did not)."""
    t, fell = start, None
    while t < start + seconds:
        t += loop
        lv.tick(t)
        if not lv.alive(t) and fell is None:
            fell = t - start
    return fell


def test_needs_a_few_timely_keepalives_to_be_up():
    lv = PeerLiveness()
    assert not lv.alive(0.0)
    t = 0.0
    for i in range(UP_AFTER_KEEPALIVES):
        assert not lv.alive(t), f"up after {i} keepalive(s)"
        t = steady(lv, t, 1)
    assert lv.alive(t)


def test_an_idle_machine_sees_a_cut_within_link_dead_s():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 50)
    assert lv.alive(t) and lv.dead_after() == pytest.approx(LINK_DEAD_S)
    fell = silent_for(lv, t, 5.0)
    assert fell is not None and LINK_DEAD_S - 0.05 <= fell <= LINK_DEAD_S + 0.05
    assert lv.stats().downs == 1


def test_late_keepalives_widen_the_timeout_up_to_the_cap():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 20)
    base = lv.dead_after()
    # A busy machine: every fourth keepalive comes 0.9 s late, a gap of 1.1 s. The
    # first one of the spell is taken for a cut (nothing foretold it); none after it.
    for _ in range(8):
        t = steady(lv, t, 3)
        t = steady(lv, t, 1, period=KEEPALIVE_S + 0.9)
    assert lv.alive(t), "a peer whose keepalives all came was declared silent"
    assert lv.stats().downs == 1
    assert base < lv.dead_after() <= LINK_DEAD_MAX_S
    # Now a stall of 1.5 s survives ...
    t = steady(lv, t, 1, period=1.5)
    assert lv.alive(t) and lv.stats().downs == 1
    # ... and a real cut is still found, within the cap.
    fell = silent_for(lv, t, 10.0)
    assert fell is not None and fell <= LINK_DEAD_MAX_S + 0.05


def test_the_timeout_comes_back_down_when_keepalives_are_steady_again():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 5)
    for _ in range(5):
        t = steady(lv, t, 1, period=1.2)
    assert lv.dead_after() > LINK_DEAD_S + 0.5
    t = steady(lv, t, 60)
    assert lv.dead_after() < LINK_DEAD_S + 0.1


def test_an_outage_past_the_cap_teaches_nothing():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 20)
    assert silent_for(lv, t, 30.0) is not None
    t = steady(lv, t + 30.0, UP_AFTER_KEEPALIVES)
    assert lv.alive(t)
    assert lv.dead_after() == pytest.approx(LINK_DEAD_S)


def test_our_own_stall_blames_nobody():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 20)
    # We were not scheduled for 3 s (SIGSTOP, an overloaded machine): on waking the
    # peer gets its normal grace, though its keepalives, stalled too, are not queued.
    t += 3.0
    lv.tick(t)
    assert lv.alive(t)
    assert lv.stats().stalls == 1 and lv.stats().stalled_s > 2.5
    fell = silent_for(lv, t, 5.0)  # ... but a peer that stays silent is found
    assert fell is not None and fell <= LINK_DEAD_S + 0.3


def test_a_burst_after_our_stall_keeps_the_peer_up_and_teaches_nothing():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 20)
    t += 2.0
    lv.tick(t)
    for _ in range(10):  # the keepalives queued meanwhile, read in one turn
        lv.heard(t)
    assert lv.alive(t)
    assert lv.dead_after() == pytest.approx(LINK_DEAD_S)


def test_a_half_dead_peer_stays_down_instead_of_flapping():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 10)
    assert silent_for(lv, t, 5.0) is not None
    t += 5.0
    ups = 0
    for _ in range(20):  # then one keepalive every 4 s: each is late
        t = steady(lv, t, 1, period=4.0)
        ups += lv.alive(t)
    assert ups == 0
    t = steady(lv, t, UP_AFTER_KEEPALIVES)
    assert lv.alive(t)


def test_missed_keepalives_are_counted_from_the_gaps():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 10)
    assert lv.stats().missed == 0
    t = steady(lv, t, 1, period=4 * KEEPALIVE_S)
    assert lv.stats().missed == 3


def test_authenticated_data_keeps_an_up_peer_up_but_brings_no_silent_one_back():
    """Keepalives crowded out (a flood of forgeries on the control port) while the peer's
    data datagrams pass their MACs: not silent, and the keepalive after the gap does not
    take it down either. Data alone never makes a silent peer up again."""
    lv = PeerLiveness()
    t = steady(lv, 0.0, 10)
    assert lv.alive(t)
    end = t + 3 * LINK_DEAD_MAX_S
    while t < end:  # no keepalive, data every 100 ms
        t += 0.02
        lv.tick(t)
        if round(t * 50) % 5 == 0:
            lv.traffic(t)
        assert lv.alive(t), t
    lv.heard(t)  # the next keepalive that gets through, long after the last one
    assert lv.alive(t) and lv.downs == 0 and lv.missed > 0
    assert silent_for(lv, t, LINK_DEAD_MAX_S + 0.1) is not None  # data stopped: a cut
    downs = lv.downs
    t += LINK_DEAD_MAX_S + 0.1
    for _ in range(20):  # data while silent: still down, and no down counted again
        t += 0.1
        lv.tick(t)
        lv.traffic(t)
        assert not lv.alive(t)
    assert lv.downs == downs
    lv.heard(t)
    assert not lv.alive(t)  # one keepalive is not enough to be up again


def test_silence_while_nobody_asked_still_takes_the_peer_down():
    lv = PeerLiveness()
    t = steady(lv, 0.0, 10)
    for _ in range(250):  # our loop turned, but the verdict was not read meanwhile
        t += 0.02
        lv.tick(t)
    lv.heard(t)
    assert not lv.alive(t) and lv.stats().downs == 1


@pytest.mark.parametrize("period, floor, cap", [(0, 1, 3), (1, 1, 3), (0.2, 3, 1)])
def test_bad_settings_are_refused(period, floor, cap):
    with pytest.raises(ValueError):
        PeerLiveness(period=period, floor=floor, cap=cap)


def test_a_slow_links_longer_period_scales_the_verdict():
    """A link below 1 Mb/s keeps a longer keepalive period (control.core.sizing): its
    steady keepalives, late by a loop turn or two, never read as silence, and a cut is
    seen after the scaled floor, not the 1 s of the 0.2 s period."""
    from control.core.sizing import peer_dead_s
    period = 4.6
    floor, cap = peer_dead_s(period)
    lv = PeerLiveness(period=period, floor=floor, cap=cap)
    t = 0.0
    for i in range(30):  # each a loop turn or two late, or early, by turns
        t = steady(lv, t, 1, period=period + (0.02, 0.04, -0.02)[i % 3])
    assert lv.alive(t) and lv.stats().downs == 0
    assert lv.dead_after() == pytest.approx(floor)
    fell = silent_for(lv, t, cap + 5)
    assert fell is not None and floor - 0.05 <= fell <= floor + 0.05
    assert floor == pytest.approx(5 * period) and cap == pytest.approx(15 * period)
