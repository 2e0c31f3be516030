"""What a link costs a route under ``[routing] metric = "key"``: the key it holds and how fast
it gets more (pure).

Each end of a link judges the key it sends with: its ENC ring. While that ring holds at
least ``LOW_SHARE`` of its capacity the link costs 1, as under the hop metric, so an idle
network routes exactly as by hops. Below that share the link is running dry: it costs
``1 + penalty``, where the penalty is the time in seconds (at least 2, at most
``MAX_COST - 1``) the link's key rate needs to bring the ring from ``LOW_SHARE`` back to
``HIGH_SHARE``. A slow link that ran dry so stays dear for as long as it stays short,
and any path of fewer than ``1 + penalty`` healthy hops is taken around it. It costs 1
again only once the ring holds ``HIGH_SHARE``: between the two shares the cost does not
change (hysteresis), so traffic that moved off a link does not move back while the link
is still nearly empty, and routes do not flap with every packet. A link's cost is the
higher of its two ends' costs (routing.linkstate), so both directions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dataplane.limits import MAX_COST  # the cost of the driest, slowest link

LOW_SHARE = 0.25   # an ENC ring under this share of its capacity: the link is running dry
HIGH_SHARE = 0.75  # ... and it counts as refilled at this share again,
FULL_SHARE = 0.95  # or once the ring has no room left (a worker's kept range may pin up to
HELD_SHARE = 0.5   # half of it, used) while it holds at least this share
MIN_PENALTY = 2    # a dry link costs at least 1 + this: more than a detour of two hops


def dry_penalty(capacity: int, key_bytes_per_s: float) -> int:
    """Seconds the key rate needs to refill the ring from LOW_SHARE to HIGH_SHARE, as a
    whole number from MIN_PENALTY to MAX_COST - 1 (a rate of 0 or less: unlimited)."""
    if key_bytes_per_s <= 0 or math.isinf(key_bytes_per_s):
        return MIN_PENALTY
    seconds = (HIGH_SHARE - LOW_SHARE) * capacity / key_bytes_per_s
    return max(MIN_PENALTY, min(MAX_COST - 1, math.ceil(seconds)))


@dataclass
class EndCost:
    """The cost one link end advertises, from its ENC ring's level over time."""

    capacity: int
    key_bytes_per_s: float  # the key rate of this end's sending direction
    dry: bool = False

    def update(self, available: int, room_used: int | None = None) -> int:
        """The cost with the ring holding ``available`` bytes of key, ``room_used`` of its
        capacity written and not yet freed (a pinned ring is full below HIGH_SHARE)."""
        share = available / self.capacity if self.capacity > 0 else 0.0
        full = room_used is not None and room_used >= FULL_SHARE * self.capacity
        if self.dry and (share >= HIGH_SHARE or full and share >= HELD_SHARE):
            self.dry = False
        elif not self.dry and share < LOW_SHARE:
            self.dry = True
        return self.cost

    @property
    def cost(self) -> int:
        return 1 + dry_penalty(self.capacity, self.key_bytes_per_s) if self.dry else 1
