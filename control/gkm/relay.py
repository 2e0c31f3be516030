"""The origin's side of global key relay and restocking, without I/O (module 3).

Per ordered pair (origin -> destination) the origin keeps:

- ``Outbox``: blocks stored durably as *pending* and not yet acknowledged. Each is sent,
  then resent with exponential backoff until the destination acknowledges it; the resend
  timeout adapts to the measured acknowledgement delay (Karn's rule: resent blocks do not
  count), so a slow path is not flooded with copies. As TCP restarts its timer on every
  acknowledgement, a block is not resent while acknowledgements keep coming on the same
  connection (``progress``): the stream is moving and the block is queued behind others
  in it, not lost; a resend there would spend link key on every hop for nothing.
- ``Restock``: the fill rule between the watermarks with hysteresis: once the pair's key
  (usable plus pending) falls under the low watermark, make blocks until usable key
  reaches the high one; each such fill is timed (the paper's measure).
- ``RateMeter``: acknowledged bytes per second over the last seconds.

All take ``now`` from the caller, so tests drive time.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from dataplane.limits import RELAY_RETRY_MAX_S, RELAY_RETRY_S


@dataclass
class _Pending:
    size: int
    attempts: int = 0
    due: float = 0.0
    first_sent: float | None = None


@dataclass
class Outbox:
    """Pending blocks, with a heap of (due time, block) so that finding what to send costs
    no scan of the window (a window of small blocks holds thousands). A block's heap
    entries other than the one matching its current ``due`` are stale and skipped."""

    retry_s: float = RELAY_RETRY_S
    retry_max_s: float = RELAY_RETRY_MAX_S
    pending: dict[int, _Pending] = field(default_factory=dict)
    pending_bytes: int = 0
    retries: int = 0
    acked_blocks: int = 0
    conflicts: int = 0
    srtt: float | None = None
    last_ack: float | None = None
    progress: float | None = None  # the last acknowledgement on this connection
    oldest_since: float | None = None  # when the oldest unacknowledged block was sent
    _heap: list[tuple[float, int]] = field(default_factory=list)

    def _schedule(self, seq: int, p: _Pending, due: float) -> None:
        p.due = due
        heapq.heappush(self._heap, (due, seq))

    def _top(self) -> tuple[float, int] | None:
        """The earliest live heap entry (stale ones dropped on the way)."""
        while self._heap:
            due, seq = self._heap[0]
            p = self.pending.get(seq)
            if p is not None and p.due == due:
                return due, seq
            heapq.heappop(self._heap)
        return None

    def next_due(self) -> float:
        """When the next block is due (inf: none pending)."""
        top = self._top()
        return top[0] if top else float("inf")

    def add(self, seq: int, size: int, now: float) -> None:
        """A block now durably pending: due for sending at once."""
        if seq not in self.pending:
            p = self.pending[seq] = _Pending(size)
            self._schedule(seq, p, now)
            self.pending_bytes += size

    def timeout(self, attempts: int) -> float:
        base = max(self.retry_s, 4 * self.srtt) if self.srtt is not None else self.retry_s
        return min(self.retry_max_s, base * 2 ** max(0, attempts - 1))

    def due(self, now: float, max_bytes: int, max_blocks: int) -> list[int]:
        """Blocks to send now, ascending, marked sent; at least one if any is due."""
        out: list[int] = []
        total = 0
        while (top := self._top()) is not None and top[0] <= now:
            seq = top[1]
            p = self.pending[seq]
            if p.attempts and self.progress is not None and \
                    (moving := self.progress + self.timeout(p.attempts)) > now:
                heapq.heappop(self._heap)  # still queued in a stream that moves
                self._schedule(seq, p, moving)
                continue
            if out and (total + p.size > max_bytes or len(out) >= max_blocks):
                break
            heapq.heappop(self._heap)
            out.append(seq)
            total += p.size
            p.attempts += 1
            if p.attempts > 1:
                self.retries += 1
            else:
                p.first_sent = now
            self._schedule(seq, p, now + self.timeout(p.attempts))
        if out and self.oldest_since is None:
            self.oldest_since = now
        return sorted(out)

    def unsent(self, seqs: list[int], now: float) -> None:
        """The transport refused these (no connection): not an attempt (no retry counted,
        no delay sample), due again after the current backoff."""
        for seq in seqs:
            p = self.pending.get(seq)
            if p is not None:
                if p.attempts > 1:
                    self.retries -= 1
                p.attempts = max(0, p.attempts - 1)
                if p.attempts == 0:
                    p.first_sent = None
                self._schedule(seq, p, now + self.timeout(max(1, p.attempts)))

    def resend_all(self, now: float) -> None:
        """A new connection: what was sent on the old one may be lost, send it again."""
        self.progress = None
        self._heap = []
        for seq, p in self.pending.items():
            self._schedule(seq, p, now)

    def _remove(self, seq: int, now: float) -> _Pending | None:
        p = self.pending.pop(seq, None)
        if p is not None:
            self.pending_bytes -= p.size
            self.oldest_since = now if self.pending else None
        return p

    def acked(self, seq: int, now: float) -> int:
        """The destination holds block ``seq``: returns its size (0 if not pending)."""
        p = self._remove(seq, now)
        if p is None:
            return 0
        self.acked_blocks += 1
        self.last_ack = self.progress = now
        if p.attempts == 1 and p.first_sent is not None:
            sample = now - p.first_sent
            self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
        return p.size

    def conflict(self, seq: int, now: float) -> None:
        """The destination holds other bytes under ``seq``: never usable, never resent."""
        if self._remove(seq, now) is not None:
            self.conflicts += 1

    def state(self, now: float, unreachable_after: float) -> str:
        if not self.pending:
            return "ok"
        if self.oldest_since is not None and now - self.oldest_since > unreachable_after:
            return "unreachable"
        return "retrying" if any(p.attempts > 1 for p in self.pending.values()) else "ok"


@dataclass
class Fill:
    started: float
    ended: float | None = None
    bytes: int = 0

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclass
class Restock:
    """Keep a pair's key between the watermarks (hysteresis; never above high)."""

    low: int
    high: int
    block: int
    filling: bool = False
    current: Fill | None = None
    last: Fill | None = None

    def blocks_to_make(self, usable: int, pending: int, now: float) -> int:
        stored = usable + pending
        if not self.filling and stored < self.low:
            self.filling = True
            self.current = Fill(started=now)
        if not self.filling:
            return 0
        if usable + self.block > self.high:  # full of acknowledged key
            self.filling = False
            if self.current is not None:
                self.current.ended = now
                self.last, self.current = self.current, None
            return 0
        return max(0, (self.high - stored) // self.block)

    def acked(self, nbytes: int) -> None:
        if self.current is not None:
            self.current.bytes += nbytes


@dataclass
class RateMeter:
    """Bytes per second over the last ``span`` seconds."""

    span: float = 2.0
    events: deque = field(default_factory=deque)
    total: int = 0

    def add(self, nbytes: int, now: float) -> None:
        self.events.append((now, nbytes))
        self.total += nbytes
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.events and self.events[0][0] < now - self.span:
            self.events.popleft()

    def rate(self, now: float) -> float:
        self._trim(now)
        return sum(n for _, n in self.events) / self.span
