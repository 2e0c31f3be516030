"""How fast a pair's global key may leave: the key rate of its path (pure).

Global key crosses every link of its path inside OTP datagrams, so each byte costs one
byte of local key on each link, in the direction it travels. A relay that sends faster
than the slowest of those can carry only fills the tunnels' queues: packets wait for key,
get dropped, are sent again, and the queue delays everything behind it (reservations,
acknowledgements) past their timeouts. So the origin paces each pair to a share of the
path's key rate, keeps no more in flight than that rate carries in about a second, and
gives a block that long (and the queue ahead of it) before it counts it as lost.

Under ``[routing] metric = "key"`` a pair whose path is one link may also spend, at once,
the key that link's ENC ring holds beyond ``STOCK_FLOOR`` of its capacity
(``spendable_stock``): stored key is there to be used. Spending it down past the share
at which the link counts as running dry (routing.linkcost) makes the routers take the
pair's traffic around the link while it refills, so a slow link lends its stock and the
faster paths carry the rest; the floor leaves an eighth of the ring to the traffic that
shares the link. Paths of more links are paced to their key rate alone: the origin does
not know the stock of the links beyond its own.
"""

from __future__ import annotations

from dataclasses import dataclass

PACE_SHARE = 0.9  # of the path's key rate; the rest is for keepalives and control traffic
IN_FLIGHT_S = 1.0  # a pair keeps at most this much of its path's key rate unacknowledged
BURST_S = 0.25  # the pacer lets this much of its rate go at once
STOCK_FLOOR = 0.125  # key metric: a one-link path's stock may be spent down to this share


@dataclass(frozen=True)
class Hop:
    """One link of a path, crossed from ``a`` to ``b`` (True) or back (False)."""

    rate_mbps: float  # the link's key rate; 0 = as fast as possible
    ratio: tuple[int, int]
    a_to_b: bool

    @property
    def bytes_per_s(self) -> float:
        if self.rate_mbps <= 0:
            return float("inf")
        share = self.ratio[0 if self.a_to_b else 1] / sum(self.ratio)
        return self.rate_mbps * 1e6 / 8 * share


def path_rate(hops: list[Hop]) -> float:
    """Bytes per second of key the path carries in its direction (inf: not limited).

    A hop whose direction gets no share of the link's key carries nothing: 0.
    """
    return min((h.bytes_per_s for h in hops), default=float("inf"))


def window(configured: int, block: int, rate: float) -> int:
    """Bytes a pair may have unacknowledged: what the path carries in IN_FLIGHT_S, at
    least two blocks (one arriving while the next goes), at most the configured window."""
    if rate == float("inf"):
        return configured
    return max(2 * block, min(configured, int(rate * IN_FLIGHT_S)))


def resend_after(in_flight: int, rate: float, srtt: float | None, floor: float) -> float:
    """How long a block may stay unacknowledged before it is sent again on a live
    connection: the time the path needs for everything in flight, twice, plus the
    round trip; never less than ``floor``."""
    drain = 0.0 if rate == float("inf") or rate <= 0 else in_flight / rate
    return max(floor, 2 * drain + (4 * srtt if srtt else 0.0))


def spendable_stock(stored: int, capacity: int) -> int:
    """Bytes of a one-link path's stored key that a pair may send at once (key metric):
    what the ENC ring holds above STOCK_FLOOR of its capacity."""
    return max(0, stored - int(STOCK_FLOOR * capacity))


class Pacer:
    """A token bucket: ``rate`` bytes per second, ``burst`` at once at most."""

    def __init__(self, rate: float, burst: int):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp: float | None = None

    def set_rate(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, float(burst))

    def _fill(self, now: float) -> None:
        if self.stamp is not None and self.rate != float("inf") and self.tokens < self.burst:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def credit(self, nbytes: int) -> None:
        """Let ``nbytes`` go at once, beyond the burst: key already stored for them."""
        self.tokens = max(self.tokens, float(nbytes))

    def allows(self, nbytes: int, now: float) -> bool:
        """May ``nbytes`` go now? A message larger than the burst goes once the bucket is
        full (then the bucket is in debt for the rest)."""
        if self.rate == float("inf"):
            return True
        self._fill(now)
        return self.tokens >= min(nbytes, self.burst)

    def spend(self, nbytes: int, now: float) -> None:
        if self.rate != float("inf"):
            self._fill(now)
            self.tokens -= nbytes

    def next_at(self, nbytes: int, now: float) -> float:
        """When ``nbytes`` may go (``now`` if already)."""
        if self.rate == float("inf") or self.rate <= 0:
            return now if self.rate == float("inf") else float("inf")
        self._fill(now)
        missing = min(nbytes, self.burst) - self.tokens
        return now if missing <= 0 else now + missing / self.rate
