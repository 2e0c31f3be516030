"""Keys in a key API worker's hand, without I/O: for a master SAE that keeps asking for
keys of one size for the same slaves, the worker takes keys for that pair from its key
manager ahead of the requests (one take of many keys), and answers the next requests from
them without asking the key manager at all.

A key API worker's cost per request was, above all, its round trip to the key manager
(the wait, the wake-ups, ZeroMQ on both sides): for 256-bit keys, more than the rest of
the request (TLS, HTTP, the container). A take for the hand is an ordinary enc take
(``control.gkm.take``): answered only once the slave's node holds the keys and their
confirmation is durably queued, so a key handed out from the hand is as delivered as one
taken for its request, and goes out once: the hand is this process's alone and a key
leaves it for one request.

Per hand, keyed by (peer node, master, slaves, key size):

- *demand* (``control.core.demand``): a hand aims at ``ahead_s`` seconds of the pair's
  recent requests (at least its largest), only when enough are expected in that time;
  below its aim it is refilled, one take at a time, up to twice that (at most the
  hand's cap; an aim near the cap waits until a quarter of it is missing:
  ``control.core.demand.to_take``).
- At most :data:`HAND_MAX_BYTES` per hand, and keys so large that fewer than
  :data:`MIN_HAND_KEYS` fit never go in a hand (their request costs its bytes, not its
  round trip); a request for more keys than a hand may hold does not count as demand.
- At most :data:`MAX_HANDS_PER_MASTER` hands hold keys for one master in a worker (its
  key sizes and slave sets): a master cannot have key held for it without end by asking
  for ever new sizes; nor is the demand of more than :data:`MAX_PAIRS` pairs followed,
  nor :data:`MAX_PAIRS_PER_MASTER` of one master's.
- A refill refused (no key now, the slave's node unreachable) pauses that hand for
  :data:`REFUSED_PAUSE_S`: requests go the long way and get the refusal themselves.
- A hand nobody asked from for :data:`HAND_IDLE_S` is given back: its keys are cancelled at
  both nodes, as keys whose taker gave up are. So is every hand when the worker stops.

The cost in key: keys a worker held when it was killed (at most a hand's per pair) reach
no application; they are confirmed at the slave's node, where nobody will ask for them;
so do keys whose give-back fails. A stop or an idle hand gives its keys back. All are
counted (``api.hand_counts``: the counts live in memory shared with the API's manager,
which counts a dead worker's held keys as lost).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from api.hand_counts import HandCounts
from control.core.demand import Demand, followed, to_take

HAND_MAX_BYTES = 32 << 10  # key held per hand, at most
HAND_MAX_KEYS = 1024       # and keys
MIN_HAND_KEYS = 16         # keys of a size a hand must be able to hold (so <= 2 KiB)
HAND_IDLE_S = 60.0         # a hand nobody asked from for this long is given back
REFUSED_PAUSE_S = 1.0      # a refused refill: none again for this long
MAX_HANDS_PER_MASTER = 4   # hands holding keys for one master SAE in a worker, at most
MAX_PAIRS = 256            # pairs whose demand a worker follows, at most
MAX_PAIRS_PER_MASTER = 32  # and for one master SAE

PairKey = tuple[str, str, tuple[str, ...], int]
"""(peer node, master SAE, slave SAEs in the order asked, key size in bytes)."""

HeldKey = tuple[str, bytearray]
"""A key in hand: its ID (text) and its bytes (wiped when handed out or given back)."""


@dataclass
class Held:
    keys: deque[HeldKey] = field(default_factory=deque)
    demand: Demand = field(default_factory=Demand)
    filling: bool = False      # a take for this hand is on its way
    paused_until: float = 0.0  # a refill was refused: none before this


def max_keys(size: int) -> int:
    """The most keys of ``size`` bytes one hand holds."""
    return min(HAND_MAX_KEYS, HAND_MAX_BYTES // max(1, size))


class Hand:
    """Every hand of one key API worker, and the rule of when to refill one."""

    def __init__(self, ahead_s: float, counts: HandCounts | None = None):
        self.ahead_s = ahead_s
        self.hands: dict[PairKey, Held] = {}
        self.counts = counts if counts is not None else HandCounts()

    def note(self, pair: PairKey, number: int, now: float) -> None:
        """A request for ``number`` keys for the pair (served from the hand or not)."""
        self._note(pair, number, now, max_keys(pair[3]))

    def _note(self, pair: PairKey, number: int, now: float, most: int) -> Held | None:
        """The pair's hand (None: it has none), with the request counted in its demand
        when a hand may serve requests of that size (and the tables have room)."""
        if self.ahead_s <= 0 or most < MIN_HAND_KEYS or number > most:
            return self.hands.get(pair)
        held = followed(self.hands, pair, Held, MAX_PAIRS, MAX_PAIRS_PER_MASTER)
        if held is not None:
            held.demand.note(number, now)
        return held

    def serve(self, pair: PairKey, number: int, now: float
              ) -> tuple[list[HeldKey] | None, int]:
        """A request for ``number`` keys for the pair: :meth:`note`, :meth:`take` and
        :meth:`wanted` in one pass, as every request makes it (the keys or None, and how
        many keys to take into the hand now)."""
        most = max_keys(pair[3])
        held = self._note(pair, number, now, most)
        if held is None:
            return None, 0
        return self._take(held, number), self._wanted(pair, held, most, now)

    def take(self, pair: PairKey, number: int) -> list[HeldKey] | None:
        """``number`` keys out of the hand, oldest first, or None if it holds fewer (the
        request goes the long way)."""
        held = self.hands.get(pair)
        return None if held is None else self._take(held, number)

    def _take(self, held: Held, number: int) -> list[HeldKey] | None:
        if len(held.keys) < number:
            return None
        keys = [held.keys.popleft() for _ in range(number)]
        self.counts.served(number, sum(len(k) for _, k in keys))
        return keys

    def wanted(self, pair: PairKey, now: float) -> int:
        """How many keys to take into the pair's hand now (0: none)."""
        held = self.hands.get(pair)
        return 0 if held is None else self._wanted(pair, held, max_keys(pair[3]), now)

    def _wanted(self, pair: PairKey, held: Held, most: int, now: float) -> int:
        if held.filling or now < held.paused_until:
            return 0
        have = len(held.keys)
        if not have and sum(1 for p, h in self.hands.items() if p[1] == pair[1]
                            and (h.keys or h.filling)) >= MAX_HANDS_PER_MASTER:
            return 0
        return to_take(held.demand, have, self.ahead_s, most, now)

    def filling(self, pair: PairKey) -> None:
        self.hands.setdefault(pair, Held()).filling = True

    def filled(self, pair: PairKey, keys: list[HeldKey]) -> None:
        """The take for the pair's hand brought ``keys``."""
        held = self.hands.setdefault(pair, Held())
        held.filling = False
        held.keys.extend(keys)
        nbytes = sum(len(k) for _, k in keys)
        self.counts.add(taken_keys=len(keys), held_keys=len(keys), held_bytes=nbytes)

    def refused(self, pair: PairKey, now: float) -> None:
        """The take for the pair's hand was refused (or given up): nothing came."""
        held = self.hands.setdefault(pair, Held())
        held.filling = False
        held.paused_until = now + REFUSED_PAUSE_S

    def idle(self, now: float) -> list[tuple[PairKey, list[HeldKey]]]:
        """Hands nobody asked from for HAND_IDLE_S: their keys, to give back (the hands
        are forgotten; one being filled waits for its take). The keys count as held until
        :meth:`given_back` or :meth:`lost`."""
        quiet = [p for p, h in self.hands.items()
                 if now - h.demand.last >= HAND_IDLE_S and not h.filling]
        return [(p, keys) for p in quiet if (keys := self._drop(p))]

    def empty(self) -> list[tuple[PairKey, list[HeldKey]]]:
        """Every hand's keys, to give back (the worker stops)."""
        return [(p, keys) for p in list(self.hands) if (keys := self._drop(p))]

    def _drop(self, pair: PairKey) -> list[HeldKey]:
        return list(self.hands.pop(pair).keys)

    def given_back(self, keys: list[HeldKey]) -> None:
        """Keys of a dropped hand, cancelled at both nodes."""
        nbytes = sum(len(k) for _, k in keys)
        self.counts.add(given_back_keys=len(keys), given_back_bytes=nbytes,
                        held_keys=-len(keys), held_bytes=-nbytes)

    def abandoned(self, pair: PairKey, number: int) -> None:
        """A take for the pair's hand given up unanswered at stop: its keys, if it took
        any, reach no application; counted lost, as many as were asked."""
        self.counts.add(lost_keys=number, lost_bytes=number * pair[3])

    def lost(self, keys: list[HeldKey]) -> None:
        """Keys of a dropped hand whose cancellation failed: they reach no application."""
        nbytes = sum(len(k) for _, k in keys)
        self.counts.add(lost_keys=len(keys), lost_bytes=nbytes, held_keys=-len(keys),
                        held_bytes=-nbytes)
