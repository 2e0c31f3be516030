"""Is a link's peer alive? Keepalive arrivals in, a verdict with hysteresis out; no I/O.

A fixed "silent for LINK_DEAD_S" rule takes a link down whenever a busy machine delays a
keepalive by a second, and a link that flaps makes the routers recompute, the relay's TCP
connections back off and reservations time out. Three things make the verdict hold up
under load while a real cut is still seen within LINK_DEAD_S on an idle machine:

- **Adaptive timeout.** The gaps between keepalives are smoothed as TCP smooths round
  trips (RFC 6298: mean and mean deviation, gains 1/8 and 1/4, but the deviation narrows
  at 1/32: late keepalives come in spells, and the first one of a spell can only be
  taken for a cut); the peer is silent after
  ``mean + 4 * deviation + one period``, never less than LINK_DEAD_S and never more than
  LINK_DEAD_MAX_S. A peer whose keepalives came late before gets more time before it is
  declared silent; every gap that ended (a stall survived) teaches the estimate.
- **Own stalls excused.** Silence is counted only while this process was running to hear
  it: when our own loop was held up (not scheduled, stopped), the time beyond a normal
  turn is added to the peer's grace, so a stall of the whole machine blames nobody.
- **Hysteresis.** A peer declared silent is up again only after UP_AFTER_KEEPALIVES
  keepalives in a row, each within the timeout of the one before: a link that is
  half-dead (one keepalive in three) stays down instead of flapping.
- **Data counts too, while up.** Datagrams of the peer's workers that passed their MAC
  prove it alive as well as a keepalive: a flood of forgeries on the control port from
  the peer's address can cost keepalives, never those. They only keep an up peer from
  being called silent: they teach no gap, and bringing a silent peer back is left to
  its keepalives (which also carry what a peer must hear: pool size, link states).
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.limits import (
    KEEPALIVE_S,
    LINK_DEAD_MAX_S,
    LINK_DEAD_S,
    STALL_EXCUSE_S,
    UP_AFTER_KEEPALIVES,
)

GAIN_MEAN = 1 / 8
GAIN_DEV = 1 / 4
GAIN_DEV_DOWN = 1 / 32  # a stall seen is remembered for some 40 keepalives (8 s at 0.2 s)


@dataclass
class LivenessStats:
    """What status shows: how the verdict was reached."""
    dead_after_s: float
    gap_mean_s: float
    gap_dev_s: float
    missed: int        # keepalives that did not arrive in their period (counted from gaps)
    downs: int         # times the peer was declared silent
    stalls: int        # own stalls excused
    stalled_s: float   # ... and their total length


class PeerLiveness:
    """The verdict on one link end's peer, from the times its keepalives arrived."""

    def __init__(self, period: float = KEEPALIVE_S, floor: float = LINK_DEAD_S,
                 cap: float = LINK_DEAD_MAX_S, up_after: int = UP_AFTER_KEEPALIVES,
                 stall_excuse: float = STALL_EXCUSE_S):
        if not 0 < period < floor <= cap:
            raise ValueError(f"need 0 < period < floor <= cap, not {period}, {floor}, {cap}")
        self.period, self.floor, self.cap = period, floor, cap
        self.up_after, self.stall_excuse = max(1, up_after), stall_excuse
        self.gap_mean = period
        self.gap_dev = 0.0
        self.last_heard: float | None = None  # when the last keepalive arrived, shifted
        self.last_tick: float | None = None   # forward by our own stalls
        self.last_traffic: float | None = None  # ... authenticated data, while up
        self.up = False
        self.streak = 0  # keepalives in a row, each in time, while not up
        self.missed = self.downs = self.stalls = 0
        self.stalled_s = 0.0

    def dead_after(self) -> float:
        """Silence longer than this, in our own running time, means the peer is gone."""
        return min(self.cap, max(self.floor,
                                 self.gap_mean + 4 * self.gap_dev + self.period))

    def tick(self, now: float) -> float:
        """Our loop turned at ``now``; returns the stall excused (0.0 if none): the time
        beyond ``stall_excuse`` since the previous turn, during which we heard nothing
        because we did not run. Callers shift their own "last seen" clocks by it too."""
        excused = 0.0
        if self.last_tick is not None and now - self.last_tick > self.stall_excuse:
            excused = now - self.last_tick - self.stall_excuse
            self.stalls += 1
            self.stalled_s += excused
            if self.last_heard is not None:
                self.last_heard += excused
            if self.last_traffic is not None:
                self.last_traffic += excused
        self.last_tick = now
        return excused

    def traffic(self, now: float) -> None:
        """Authenticated data from the peer arrived by ``now``: an up peer is not silent."""
        if self.up:
            self.last_traffic = now

    def _silence(self, now: float) -> float:
        """Since the last keepalive or, while up, authenticated data."""
        last = self.last_heard if self.last_heard is not None else now
        if self.last_traffic is not None:
            last = max(last, self.last_traffic)
        return now - last

    def heard(self, now: float) -> None:
        """A keepalive from the peer (authenticated) arrived at ``now``."""
        if self.last_heard is not None:
            gap = max(0.0, now - self.last_heard)
            in_time = self._silence(now) <= self.dead_after()
            if gap > 1.5 * self.period:
                self.missed += int(gap / self.period + 0.5) - 1
            # A burst read at once after our own stall is not a gap of the peer's, and
            # a silence past the cap was an outage, not a stall to make room for.
            if self.period / 4 <= gap <= self.cap:
                err = gap - self.gap_mean
                self.gap_mean += GAIN_MEAN * err
                dev = abs(err) - self.gap_dev  # quick to widen, slow to narrow again
                self.gap_dev += (GAIN_DEV if dev > 0 else GAIN_DEV_DOWN) * dev
            if not in_time and self.up:  # silent too long, whether or not asked meanwhile
                self.up = False
                self.last_traffic = None
                self.downs += 1
            self.streak = self.streak + 1 if in_time else 1
        else:
            self.streak = 1
        self.last_heard = now
        if not self.up and self.streak >= self.up_after:
            self.up = True

    def alive(self, now: float) -> bool:
        """The verdict at ``now``: False once silent past :meth:`dead_after` (then up
        again only after ``up_after`` timely keepalives)."""
        if self.up and (self.last_heard is None
                        or self._silence(now) > self.dead_after()):
            self.up = False
            self.streak = 0
            self.last_traffic = None
            self.downs += 1
        return self.up

    def stats(self) -> LivenessStats:
        return LivenessStats(round(self.dead_after(), 3), round(self.gap_mean, 4),
                             round(self.gap_dev, 4), self.missed, self.downs, self.stalls,
                             round(self.stalled_s, 3))
