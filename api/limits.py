"""Per-SAE limits of the key API, without I/O: how often an SAE may call, and how much of
a pair's store it may take, so that one SAE cannot drain a pair for the others.

Both are token buckets. Requests: ``[api] sae_requests_per_s`` per SAE, bursts of up to
one second's worth. Key: per SAE and slave node, ``[api] sae_store_share`` of the pair's
store (its high watermark) at once, refilled over ``[api] sae_share_window_s``; so over
any window an SAE takes at most about twice its share, and the rest is left for the
others. A refused request takes nothing (invariant 7), and key that was accounted for a
take the store then refused is given back.

The buckets live in a flat float64 buffer (level, time of last update per bucket), so the
key API's worker processes can share one (an anonymous shared mapping made before they
are forked); the caller passes the lock that serialises them.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from api.etsi import ApiError

_F = struct.Struct("<dd")  # spent, last update


@dataclass(frozen=True)
class SaeLimits:
    requests_per_s: float = 0.0  # 0: unlimited
    store_share: float = 1.0     # 1: unlimited
    share_window_s: float = 10.0
    store_bytes: int = 0         # the pair's store (high watermark) the share is of

    @property
    def limits_requests(self) -> bool:
        return self.requests_per_s > 0

    @property
    def limits_share(self) -> bool:
        return self.store_share < 1.0 and self.store_bytes > 0


class Buckets:
    """Token buckets over a buffer: bucket i has ``capacity`` tokens, refilled at ``rate``
    per second. Each keeps what was spent (and when), so zeroed memory is full buckets."""

    def __init__(self, buf: memoryview | bytearray, count: int):
        if len(buf) < count * _F.size:
            raise ValueError("buffer too small for the buckets")
        self.buf, self.count = buf, count

    def _spent(self, i: int, rate: float, now: float) -> float:
        spent, last = _F.unpack_from(self.buf, i * _F.size)
        return max(0.0, spent - max(0.0, now - last) * rate)

    def take(self, i: int, amount: float, capacity: float, rate: float, now: float) -> bool:
        """Take ``amount`` if the bucket holds it (all or nothing)."""
        spent = self._spent(i, rate, now)
        ok = spent + amount <= capacity
        _F.pack_into(self.buf, i * _F.size, spent + amount if ok else spent, now)
        return ok

    def give_back(self, i: int, amount: float, rate: float, now: float) -> None:
        _F.pack_into(self.buf, i * _F.size, max(0.0, self._spent(i, rate, now) - amount), now)


def buffer_size(saes: Sequence[str], peers: Sequence[str]) -> int:
    return (len(saes) + len(saes) * len(peers)) * _F.size


class SaeLimiter:
    """The limits of one node's key API, for its SAEs and the nodes they take key for."""

    def __init__(self, limits: SaeLimits, saes: Sequence[str], peers: Sequence[str],
                 buf: memoryview | bytearray | None = None,
                 lock: AbstractContextManager | None = None):
        self.limits = limits
        self.saes = {s: i for i, s in enumerate(saes)}
        self.peers = {p: i for i, p in enumerate(peers)}
        size = buffer_size(saes, peers)
        self.buckets = Buckets(buf if buf is not None else bytearray(size),
                               len(saes) * (1 + len(peers)))
        self.lock = lock if lock is not None else contextlib.nullcontext()

    def _share_bucket(self, sae: str, peer: str) -> int | None:
        if sae not in self.saes or peer not in self.peers:
            return None
        return len(self.saes) + self.saes[sae] * len(self.peers) + self.peers[peer]

    def _share(self) -> tuple[float, float]:
        lim = self.limits
        capacity = lim.store_share * lim.store_bytes
        return capacity, capacity / lim.share_window_s

    def admit(self, sae: str, now: float) -> None:
        """One request by ``sae``; 503 when it calls faster than it may."""
        lim = self.limits
        i = self.saes.get(sae)
        if not lim.limits_requests or i is None:
            return
        rate = lim.requests_per_s
        with self.lock:
            ok = self.buckets.take(i, 1.0, max(1.0, rate), rate, now)
        if not ok:
            raise ApiError(503, f"too many requests from SAE {sae}: at most {rate:g} per "
                                f"second ([api] sae_requests_per_s); nothing was taken, "
                                f"retry later")

    def take_share(self, sae: str, peer: str, nbytes: int, now: float) -> None:
        """Account ``nbytes`` of key for ``sae`` from the store for ``peer``; 503 (and
        nothing accounted) when that would exceed its share."""
        i = self._share_bucket(sae, peer)
        if not self.limits.limits_share or i is None:
            return
        capacity, rate = self._share()
        with self.lock:
            ok = self.buckets.take(i, nbytes, capacity, rate, now)
        if not ok:
            lim = self.limits
            raise ApiError(503, f"SAE {sae} has taken its share of the keys for node {peer} "
                                f"({lim.store_share:g} of {lim.store_bytes} B per "
                                f"{lim.share_window_s:g} s, [api] sae_store_share); "
                                f"nothing was taken, retry later")

    def refund(self, sae: str, peer: str, nbytes: int, now: float) -> None:
        """Key accounted by take_share that the store did not hand out after all."""
        i = self._share_bucket(sae, peer)
        if not self.limits.limits_share or i is None:
            return
        _, rate = self._share()
        with self.lock:
            self.buckets.give_back(i, nbytes, rate, now)


class AddressCap:
    """Connections one SAE holds open from one client address, at most ``limit`` each
    (0: no limit).

    Anyone who reaches the key API's port can open connections, and each holds one of a
    worker's descriptors until it is closed; a connection that is no SAE's gets its 401
    and closes (and is not counted here: it would use up an SAE's place at a shared
    address), but an SAE's stay open as long as it makes a request every SILENT_S. An SAE
    holding this many from one address at a worker gets its next ones answered 503
    (their first request) and closed, so that it cannot take every descriptor from the
    others. Kept per worker process (no lock): at most ``limit`` times the workers in all.
    ``refused`` paces the worker's log (the shared count is the worker's ``HandCounts``)."""

    __slots__ = ("limit", "refused", "_held")

    def __init__(self, limit: int):
        self.limit = limit
        self.refused = 0
        self._held: dict[tuple[str, str], int] = {}

    def admit(self, key: tuple[str, str]) -> bool:
        """Count one more connection of ``key`` (address, SAE); False (nothing counted) if
        it holds ``limit`` already. Without a limit nothing is counted."""
        if not self.limit:
            return True
        n = self._held.get(key, 0)
        if n >= self.limit:
            self.refused += 1
            return False
        self._held[key] = n + 1
        return True

    def release(self, key: tuple[str, str]) -> None:
        """One admitted connection of ``key`` has closed."""
        if not self.limit:
            return
        n = self._held.pop(key) - 1
        if n:
            self._held[key] = n

    def held(self, key: tuple[str, str]) -> int:
        return self._held.get(key, 0)

    def refusal(self, sae: str) -> ApiError:
        """The answer to a connection over the cap (to its first request; then closed)."""
        return ApiError(503, f"SAE {sae} holds {self.limit} connections from this client "
                             f"address at this KME worker, the most one SAE may from one "
                             f"address ([api] max_connections_per_address): this connection "
                             f"is closed and nothing was taken; send on those open, or "
                             f"close some")
