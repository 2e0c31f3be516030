"""A pair's recent demand for keys, without I/O: what keys held ahead of demand are
sized by, at the origin's key manager (``control.gkm.ahead``) and in a key API worker's
hand (``api.hand``).

Demand is the takes and keys taken in the last :data:`RATE_WINDOW_S`. Keys held ahead
aim at ``ahead_s`` seconds of it, and at least the largest take of the window (which they
must be able to serve whole), and only when at least :data:`MIN_AHEAD_REQUESTS` takes are
expected in those ``ahead_s``: an occasional request, however large, never has keys held
for it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

RATE_WINDOW_S = 1.0     # demand is what was taken over this long
MIN_AHEAD_REQUESTS = 2  # takes expected within ahead_s, at least, for keys to be held
REFILL_SHARE = 4        # near the most held, a refill waits for 1/this of it missing


@dataclass
class Demand:
    taken: deque[tuple[float, int]] = field(default_factory=deque)  # (when, keys)
    largest: deque[tuple[float, int]] = field(default_factory=deque)  # the window's
    #   largest take first: each entry larger than every later one (a sliding maximum)
    keys: int = 0      # keys in ``taken``
    last: float = 0.0  # the last take (0: none since start)

    def note(self, number: int, now: float) -> None:
        """A take of ``number`` keys."""
        self.taken.append((now, number))
        while self.largest and self.largest[-1][1] <= number:
            self.largest.pop()
        self.largest.append((now, number))
        self.keys += number
        self.last = now
        self._forget_old(now)

    def target(self, ahead_s: float, most: int, now: float) -> int:
        """How many keys to hold ahead now (0: the demand is too thin for any), at most
        ``most``."""
        self._forget_old(now)
        if ahead_s <= 0 or len(self.taken) * ahead_s / RATE_WINDOW_S < MIN_AHEAD_REQUESTS:
            return 0
        return min(max(math.ceil(self.keys * ahead_s / RATE_WINDOW_S),
                       self.largest[0][1]), most)

    def largest_take(self) -> int:
        """The window's largest take (as of the last :meth:`note` or :meth:`target`)."""
        return self.largest[0][1] if self.largest else 0

    def _forget_old(self, now: float) -> None:
        while self.taken and now - self.taken[0][0] > RATE_WINDOW_S:
            self.keys -= self.taken.popleft()[1]
        while self.largest and now - self.largest[0][0] > RATE_WINDOW_S:
            self.largest.popleft()


def to_take(demand: Demand, have: int, ahead_s: float, most: int, now: float) -> int:
    """Keys to add to the ``have`` held ahead now (0: none): below the aim
    (:meth:`Demand.target`), up to twice the aim, at most ``most``.

    When the aim is near ``most`` that would take a few keys at a time, each one a take
    of its own (at 12,000 requests a second, a hand whose aim was its cap was refilled a
    thousand times a second): then a refill waits until 1/:data:`REFILL_SHARE` of
    ``most`` is missing, or the largest recent take no longer fits.
    """
    target = demand.target(ahead_s, most, now)
    low = min(target, max(most - most // REFILL_SHARE, demand.largest_take()))
    if have >= low:
        return 0
    return min(2 * target, most) - have


def followed(table: dict, key: tuple, new: Callable[[], T], most: int,
             most_per_owner: int) -> T | None:
    """The entry that follows ``key``'s demand in ``table``, made if the table has room
    for one more: at most ``most`` entries, and ``most_per_owner`` with the same owner
    (``key[1]``, the master SAE), so that whoever asks cannot grow it without end nor
    fill it for everyone else."""
    entry = table.get(key)
    if entry is None and len(table) < most and \
            sum(1 for k in table if k[1] == key[1]) < most_per_owner:
        entry = table[key] = new()
    return entry
