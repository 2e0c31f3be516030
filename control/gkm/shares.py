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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SHARE_HOLD_S = 60.0              # a partial set of shares is dropped after this
MAX_HELD_SHARE_BYTES = 256 << 20  # ... and the oldest sets once shares held pass this


def random_bytes(n: int) -> bytes:
    """``n`` uniformly random bytes: a ChaCha20 keystream under a fresh os.urandom key
    (as the blocks themselves are made: control.gkm.manager.random_blocks)."""
    return Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), None).encryptor() \
        .update(bytes(n))


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
    count: int
    size: int
    since: float
    parts: dict[int, bytes] = field(default_factory=dict)


SetKey = tuple[str, int, int]  # (origin, block seq, nonce)


@dataclass
class ShareBuffer:
    """Shares held at the destination until their block's set is complete. Bounded in
    time (``hold_s``) and bytes (``max_bytes``, oldest sets first): shares that are never
    completed cost the origin a resend, not the destination its memory."""

    hold_s: float = SHARE_HOLD_S
    max_bytes: int = MAX_HELD_SHARE_BYTES
    sets: OrderedDict[SetKey, _Set] = field(default_factory=OrderedDict)
    held_bytes: int = 0
    completed: int = 0
    dropped_sets: int = 0
    refused: int = 0

    def add(self, origin: str, nonce: int, index: int, count: int, seq: int,
            data: bytes | memoryview, now: float) -> bytes | None:
        """Take in one share; the block if this completes its set (the set is then
        forgotten). A share that disagrees with its set (another count or size) is
        refused and the set dropped: that send can never be combined."""
        if count == 1:
            self.completed += 1
            return bytes(data)
        key = (origin, seq, nonce)
        s = self.sets.get(key)
        if s is None:
            s = self.sets[key] = _Set(count, len(data), now)
        elif s.count != count or s.size != len(data):
            self.refused += 1
            self._drop(key, counted=False)
            return None
        if index in s.parts:
            return None  # a copy of one held (same send): nothing new
        s.parts[index] = bytes(data)
        self.held_bytes += len(data)
        if len(s.parts) < s.count:
            self._bound()
            return None
        self._drop(key, counted=False)
        self.completed += 1
        return xor([s.parts[i] for i in range(s.count)])

    def _drop(self, key: SetKey, counted: bool = True) -> None:
        s = self.sets.pop(key, None)
        if s is not None:
            self.held_bytes -= sum(len(p) for p in s.parts.values())
            self.dropped_sets += counted

    def _bound(self) -> None:
        while self.held_bytes > self.max_bytes and self.sets:
            self._drop(next(iter(self.sets)))

    def expire(self, now: float) -> int:
        """Drop sets older than ``hold_s``; how many were dropped."""
        old = [k for k, s in self.sets.items() if now - s.since > self.hold_s]
        for k in old:
            self._drop(k)
        return len(old)

    def summary(self) -> dict:
        return {"partial_sets": len(self.sets), "held_bytes": self.held_bytes,
                "completed": self.completed, "dropped_sets": self.dropped_sets,
                "refused": self.refused}
