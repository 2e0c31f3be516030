"""XOR shares of global key blocks for multipath relay, without I/O (``[gkm] paths``).

A block leaves as ``n`` shares, one per node-disjoint path: ``n - 1`` drawn uniformly at
random and the last the block XOR all of them, so any ``n - 1`` shares together are
independent of the block, and a relay node, on one path only, learns nothing of it.
Each send of a block draws new shares under a new nonce (the origin keeps no shares: a
resend after a lost acknowledgement or a restart is a new send); the destination combines
only shares of one nonce (:class:`ShareBuffer`), and a block whose shares do not all
arrive is never stored or acknowledged, so the origin sends it again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from control.gkm import seeds

SHARE_HOLD_S = 60.0               # a partial set of shares is dropped after this
MAX_HELD_SHARE_BYTES = 256 << 20  # ... and the oldest sets once shares held pass this,
SET_OVERHEAD = 1024               # counting each set's bookkeeping as this many bytes
MIN_SETS_PER_ORIGIN = 64          # partial sets one origin may have waiting (at least)


def random_bytes(n: int) -> bytes:
    """``n`` uniformly random bytes: a ChaCha20 keystream under a key drawn from
    os.urandom for each call (a CSPRNG of the kind the kernel's own generator is, but
    several times faster here; see docs/design.md). Global key blocks are made so too
    (control.gkm.seeds)."""
    return seeds.expand(os.urandom(seeds.SEED_BYTES), n)


def xor(parts: list[bytes | memoryview]) -> bytes:
    """The bytewise XOR of equally long byte strings."""
    acc = np.frombuffer(parts[0], dtype=np.uint8).copy()
    for p in parts[1:]:
        np.bitwise_xor(acc, np.frombuffer(p, dtype=np.uint8), out=acc)
    return acc.tobytes()


def split(blocks: list[bytes | memoryview], n: int,
          draw: Callable[[int], bytes] = random_bytes) -> list[list[bytes | memoryview]]:
    """Per share index ``0..n-1``, the shares of ``blocks`` in order (``n`` = 1: the
    blocks themselves). ``draw(size)`` gives fresh random bytes."""
    if n == 1:
        return [list(blocks)]
    total = sum(len(b) for b in blocks)
    pads = [draw(total) for _ in range(n - 1)]
    out: list[list[bytes | memoryview]] = [[] for _ in range(n)]
    at = 0
    for b in blocks:
        mine = [memoryview(p)[at:at + len(b)] for p in pads]
        out[n - 1].append(xor([b, *mine]))
        for i, m in enumerate(mine):
            out[i].append(m)
        at += len(b)
    return out


@dataclass
class _Set:
    nonce: int
    count: int
    size: int
    since: float
    parts: dict[int, bytes] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        """What the set holds, for the buffer's bound: its shares and its bookkeeping."""
        return SET_OVERHEAD + sum(len(p) for p in self.parts.values())


@dataclass
class ShareBuffer:
    """Shares held at the destination until their block's set is complete: one live send
    per (origin, block), a newer send (another nonce) replacing an older one's shares.
    Bounded in time (``hold_s``), in bytes counting each set's bookkeeping (``max_bytes``,
    oldest sets first) and in sets per origin (``max_sets``, that origin's oldest first):
    shares that never complete cost the origin a resend, not the destination its memory,
    and one origin cannot push another's sets out beyond its own share of the sets."""

    hold_s: float = SHARE_HOLD_S
    max_bytes: int = MAX_HELD_SHARE_BYTES
    max_sets: int = MIN_SETS_PER_ORIGIN
    sets: dict[str, OrderedDict[int, _Set]] = field(default_factory=dict)
    held_bytes: int = 0
    completed: int = 0
    dropped_sets: int = 0
    refused: int = 0

    def check(self, origin: str, nonce: int, count: int, blocks) -> str | None:
        """Why one message's shares cannot be taken (None: they can): a share that
        disagrees with its send's set already held (another count or size) means a
        faulty origin; the whole message is refused."""
        mine = self.sets.get(origin, {})
        for seq, data in blocks:
            s = mine.get(seq)
            if s is not None and s.nonce == nonce and (s.count, s.size) != (count, len(data)):
                self.refused += 1
                return (f"share of block {seq} is {len(data)} B of {count}, its send's other "
                        f"shares {s.size} B of {s.count}")
        return None

    def add(self, origin: str, nonce: int, index: int, count: int, seq: int,
            data: bytes | memoryview, now: float) -> bytes | None:
        """Take in one share (``check`` passed for its message); the block if this
        completes its set (the set is then forgotten)."""
        if count == 1:
            self.completed += 1
            return bytes(data)
        mine = self.sets.setdefault(origin, OrderedDict())
        s = mine.get(seq)
        if s is not None and s.nonce != nonce:  # a newer send of the block: it replaces
            self._drop(origin, seq)
            s, mine = None, self.sets.setdefault(origin, OrderedDict())
        if s is None:
            s = mine[seq] = _Set(nonce, count, len(data), now)
            self.held_bytes += SET_OVERHEAD
        if index in s.parts:
            return None  # a copy of one held (same send): nothing new
        s.parts[index] = bytes(data)
        self.held_bytes += len(data)
        if len(s.parts) < s.count:
            self._bound(origin)
            return None
        self._drop(origin, seq, counted=False)
        self.completed += 1
        return xor([s.parts[i] for i in range(s.count)])

    def _drop(self, origin: str, seq: int, counted: bool = True) -> None:
        mine = self.sets.get(origin)
        s = mine.pop(seq, None) if mine is not None else None
        if s is not None:
            self.held_bytes -= s.cost
            self.dropped_sets += counted
            if not mine:
                del self.sets[origin]

    def _bound(self, origin: str) -> None:
        while len(self.sets.get(origin, ())) > self.max_sets:
            self._drop(origin, next(iter(self.sets[origin])))
        while self.held_bytes > self.max_bytes and self.sets:
            oldest = min(self.sets, key=lambda o: next(iter(self.sets[o].values())).since)
            self._drop(oldest, next(iter(self.sets[oldest])))

    def expire(self, now: float) -> int:
        """Drop sets older than ``hold_s``; how many were dropped."""
        old = [(o, seq) for o, mine in self.sets.items() for seq, s in mine.items()
               if now - s.since > self.hold_s]
        for o, seq in old:
            self._drop(o, seq)
        return len(old)

    def summary(self) -> dict:
        return {"partial_sets": sum(len(m) for m in self.sets.values()),
                "held_bytes": self.held_bytes, "completed": self.completed,
                "dropped_sets": self.dropped_sets, "refused": self.refused}
