"""Datagrams that name key not stored here yet, kept aside without stopping the worker
(pure: which to keep, which to let go; the worker copies the bytes).

The leader of a link stores each key block before the follower does, so a datagram may
arrive before the key it names: it cannot be authenticated yet (its one-time MAC key is in
that key). A worker that waited for such key could be stalled by anyone
who can send from the peer's address: well-formed datagrams naming positions just ahead
of the ring each held the worker for up to `key_wait_ms`, and nothing it received
meanwhile was served. So they are parked instead: copied into one of a few slots, the
worker goes on, and it looks again when key has arrived; a parked datagram whose key has
come is checked and delivered like any other, one whose key has not come within
`key_wait_ms` is dropped (`nokey`). When the slots are full, the datagram naming the
highest position goes first: genuine traffic names the key that arrives next. Parking is
also paced (``ParkPacer``): a flood of such datagrams costs a worker a bounded share of
its time, whatever the flood's rate (the XDP guard paces them before they reach it).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from dataplane.wire import Header

PARK_SLOTS = 32  # datagrams one worker keeps waiting for key (a full one is 64 KiB)
PARK_PPS = 5_000  # datagrams one worker parks per second at most ...
PARK_BURST = 1_000  # ... after a burst of this many


@dataclass(frozen=True)
class Parked:
    slot: int
    hdr: Header
    n: int  # datagram length
    deadline: float


class ParkingLot:
    def __init__(self, slots: int = PARK_SLOTS):
        self.free = list(range(slots - 1, -1, -1))
        self.parked: list[Parked] = []  # lowest position first

    def __len__(self) -> int:
        return len(self.parked)

    def park(self, hdr: Header, n: int, deadline: float) -> tuple[Parked | None, Parked | None]:
        """Where to keep a datagram (None: nowhere, drop it) and what it pushed out
        (None: nothing; the caller drops that one and copies into its slot)."""
        out = None
        if self.free:
            slot = self.free.pop()
        else:
            worst = self.parked[-1]
            if hdr.pos >= worst.hdr.pos:
                return None, None
            out = self.parked.pop()
            slot = out.slot
        p = Parked(slot, hdr, n, deadline)
        bisect.insort(self.parked, p, key=lambda q: q.hdr.pos)
        return p, out

    def in_order(self) -> list[Parked]:
        """The parked datagrams, lowest position first (a lane's in the order sent)."""
        return list(self.parked)

    def before(self, lane: int, pos: int) -> list[Parked]:
        """Parked datagrams of ``lane`` below ``pos``: they go before a datagram at pos."""
        out = []
        for p in self.parked:
            if p.hdr.pos >= pos:
                break
            if p.hdr.lane == lane:
                out.append(p)
        return out

    def earliest_deadline(self) -> float:
        return min(p.deadline for p in self.parked) if self.parked else float("inf")

    def leave(self, p: Parked) -> None:
        self.parked.remove(p)
        self.free.append(p.slot)


@dataclass
class ParkPacer:
    """At most ``rate`` parkings per second after a burst of ``burst`` (the generic cell
    rate algorithm: one number of state)."""

    rate: float = PARK_PPS
    burst: int = PARK_BURST
    _tat: float = field(default=0.0)

    def allow(self, now: float) -> bool:
        interval = 1.0 / self.rate
        tat = max(self._tat, now)
        if tat - now > self.burst * interval:
            return False
        self._tat = tat + interval
        return True
