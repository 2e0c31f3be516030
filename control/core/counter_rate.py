"""The rate of a growing counter over the last seconds (pure).

Key arrives in blocks: a 0.2 Mb/s link brings a 4 KiB block about six times a second, so
a rate taken between two status writes half a second apart swings by a block either way
(166 or 250 kb/s for 200). Over a window of several seconds the blocks average out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0


@dataclass
class CounterRate:
    """Per-second growth of a counter sampled now and then, over about ``span`` seconds
    (less until that much has been seen)."""

    span: float = RATE_WINDOW_S
    marks: deque[tuple[float, int]] = field(default_factory=deque)

    def update(self, value: int, now: float) -> float:
        """Record ``value`` at ``now`` and return the growth per second since the oldest
        sample still in the window (0 before there are two samples)."""
        self.marks.append((now, value))
        # The oldest sample kept is the newest one at least span old: a full window.
        while len(self.marks) > 2 and self.marks[1][0] <= now - self.span:
            self.marks.popleft()
        t0, v0 = self.marks[0]
        return (value - v0) / (now - t0) if now > t0 else 0.0
