"""Keys reserved ahead of demand, without I/O: for a master SAE that keeps asking for keys
of one size for the same slaves, the origin carves a few keys in advance and has the
slave's node reserve them (unconfirmed, so not fetchable), so that the next take for
that pair is served from them with one local sync and no round trip: the take queues
the keys' confirmation, as a take answered after its own reservation does.

Per pool, keyed by (peer node, master, slaves, key size):

- *demand* (``control.core.demand``): the pool aims at ``ahead_s`` seconds of the pair's
  recent takes, and at least its largest recent take (a refill leaves when less than
  that is held, for twice that; an aim near the pool's cap waits until a quarter of it
  is missing: ``control.core.demand.to_take``), and only when enough takes are expected in those
  ``ahead_s``: an occasional request, however large, never leaves keys reserved for it.
  At most :data:`MAX_AHEAD_BYTES` and one RESERVE message (``MAX_RELAY_BLOCKS`` keys) are
  held per pool, and keys so large that fewer than :data:`MIN_POOL_KEYS` fit are never
  reserved ahead (their take costs its bytes, not its round trip); a take of more keys
  than a pool holds does not count as its demand, since no pool could serve it.
- At most :data:`MAX_POOLS_PER_MASTER` pools hold keys for one master (its key sizes and
  slave sets): a master cannot have key reserved for it without end by asking for ever new
  sizes; nor is the demand of more than :data:`MAX_FOLLOWED` pools followed, nor
  :data:`MAX_FOLLOWED_PER_MASTER` of one master's.
- *reserving*: keys whose reservation the slave's node has not acknowledged; *ready*:
  acknowledged, in carving order. Only ready keys are served: a slave SAE asking for a
  key whose reservation has not arrived would be told it does not exist.
- A pool that nobody took from for :data:`AHEAD_IDLE_S` is closed: its keys are cancelled
  at both nodes (lost, counted, never reused). That is the whole cost of reserving
  ahead: at most a pool's keys each time a pair's demand stops, nothing while it lasts.

The shell (``control.gkm.manager``) keeps the keys durably (``control.gkm.store``,
``a`` records) and rebuilds the pools from them at start; a restart keeps them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from control.core.demand import Demand, followed, to_take
from dataplane.limits import MAX_RELAY_BLOCKS

MIN_POOL_KEYS = 16         # keys of a size a pool must be able to hold (so <= 4 KiB)
MAX_AHEAD_BYTES = 64 << 10  # key held ahead per pool, at most
AHEAD_IDLE_S = 60.0        # a pool nobody took from for this long is cancelled
MAX_POOLS_PER_MASTER = 8   # pools holding keys for one master SAE, at most
MAX_FOLLOWED = 1024        # pools whose demand is followed, at most
MAX_FOLLOWED_PER_MASTER = 64  # and for one master SAE

PoolKey = tuple[str, str, tuple[str, ...], int]
"""(peer node, master SAE, slave SAEs in the order asked, key size in bytes)."""

Key = tuple[bytes, bytes]
"""A key held ahead: its 16-byte ID and its bytes."""


@dataclass
class Pool:
    ready: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)
    reserving: dict[int, list[Key]] = field(default_factory=dict)  # rseq -> keys
    demand: Demand = field(default_factory=Demand)
    barred_until: float = 0.0  # the peer refused a reservation ahead: none before this

    @property
    def held(self) -> int:
        return len(self.ready) + sum(len(k) for k in self.reserving.values())


@dataclass
class AheadCounts:
    served: int = 0          # keys handed out from pools
    reserved: int = 0        # keys reserved ahead
    cancelled: int = 0       # keys cancelled with idle pools or refused by the peer
    cancelled_bytes: int = 0


class Ahead:
    """Every pool of one node's origin side, and the rule of when to refill one."""

    def __init__(self, ahead_s: float):
        self.ahead_s = ahead_s
        self.pools: dict[PoolKey, Pool] = {}
        self.by_rseq: dict[tuple[str, int], PoolKey] = {}
        self.counts: dict[str, AheadCounts] = {}

    def _counts(self, peer: str) -> AheadCounts:
        return self.counts.setdefault(peer, AheadCounts())

    # -- demand and service

    def note(self, key: PoolKey, number: int, now: float) -> None:
        """A take of ``number`` keys for the pool's pair (served from it or not)."""
        if self.ahead_s <= 0 or max_keys(key[3]) < MIN_POOL_KEYS or \
                number > max_keys(key[3]):  # no pool could serve that take: not its demand
            return
        if (pool := followed(self.pools, key, Pool, MAX_FOLLOWED,
                             MAX_FOLLOWED_PER_MASTER)) is not None:
            pool.demand.note(number, now)

    def ready(self, key: PoolKey, number: int) -> list[Key] | None:
        """``number`` ready keys in carving order, or None if the pool has fewer (the take
        goes the long way); nothing changes until :meth:`served`."""
        pool = self.pools.get(key)
        if pool is None or len(pool.ready) < number:
            return None
        it = iter(pool.ready.items())
        return [next(it) for _ in range(number)]

    def served(self, key: PoolKey, keys: list[Key]) -> None:
        """These keys (from :meth:`ready`) are durably handed out."""
        pool = self.pools[key]
        for kid, _ in keys:
            del pool.ready[kid]
        self._counts(key[0]).served += len(keys)

    def wanted(self, key: PoolKey, now: float, holding: Counter | None = None) -> int:
        """How many keys to reserve ahead for ``key`` now (0: none); ``holding``: the
        pools holding keys per master, if known."""
        pool = self.pools.get(key)
        if pool is None or now < pool.barred_until:
            return 0
        if not pool.held and (holding if holding is not None else self._holding())[
                key[1]] >= MAX_POOLS_PER_MASTER:
            return 0
        return to_take(pool.demand, pool.held, self.ahead_s, max_keys(key[3]), now)

    def wanting(self, now: float) -> list[tuple[PoolKey, int]]:
        """Every pool to refill now, and by how much: the pools one master may hold
        count the ones picked in this turn too."""
        holding, out = self._holding(), []
        for k, pool in self.pools.items():
            if (n := self.wanted(k, now, holding)) > 0:
                if not pool.held:
                    holding[k[1]] += 1
                out.append((k, n))
        return out

    def _holding(self) -> Counter:
        return Counter(k[1] for k, p in self.pools.items() if p.held)

    # -- reservations

    def reserving(self, key: PoolKey, rseq: int, keys: list[Key]) -> None:
        """Keys just reserved ahead for ``key`` under reservation ``rseq``."""
        self.pools.setdefault(key, Pool()).reserving[rseq] = keys
        self.by_rseq[(key[0], rseq)] = key
        self._counts(key[0]).reserved += len(keys)

    def owns(self, peer: str, rseq: int) -> bool:
        return (peer, rseq) in self.by_rseq

    def acked(self, peer: str, rseq: int, refused: bool, now: float) -> list[bytes]:
        """The peer's answer to a reservation made ahead: applied, its keys are ready;
        refused, they are dropped (nothing is reserved there) and the pool reserves
        nothing ahead for AHEAD_IDLE_S (a refusal that would repeat must not spend key at
        the pace of refills). Returns the IDs of keys to drop from the store ([] when
        applied or not ours)."""
        key = self.by_rseq.pop((peer, rseq), None)
        if key is None:
            return []
        pool = self.pools[key]
        keys = pool.reserving.pop(rseq, [])
        if refused:
            self._lost(key, keys)
            pool.barred_until = now + AHEAD_IDLE_S
            return [kid for kid, _ in keys]
        pool.ready.update(keys)
        return []

    # -- closing

    def idle(self, now: float) -> list[PoolKey]:
        """Pools nobody took from for AHEAD_IDLE_S (since start, for restored ones) that
        hold keys, to :meth:`close`; those that hold none are forgotten here."""
        quiet = [k for k, p in self.pools.items() if now - p.demand.last >= AHEAD_IDLE_S]
        for k in quiet:
            if not self.pools[k].held:
                del self.pools[k]
        return [k for k in quiet if k in self.pools]

    def close(self, key: PoolKey) -> list[bytes]:
        """Close a pool: the IDs of every key it held, to cancel at both nodes."""
        pool = self.pools.pop(key)
        keys = [*pool.ready.items(), *(k for ks in pool.reserving.values() for k in ks)]
        for rseq in pool.reserving:
            self.by_rseq.pop((key[0], rseq), None)
        self._lost(key, keys)
        return [kid for kid, _ in keys]

    def _lost(self, key: PoolKey, keys: list[Key]) -> None:
        c = self._counts(key[0])
        c.cancelled += len(keys)
        c.cancelled_bytes += sum(len(data) for _, data in keys)

    # -- restart

    def restore(self, peer: str, records: list[tuple[bytes, int, str, tuple[str, ...],
                                                       bytes]],
                unacked: set[int], now: float) -> None:
        """Pools from the store's records (key ID, rseq, master, slaves, bytes), in
        carving order; reservations still unacknowledged are reserving again."""
        for kid, rseq, master, slaves, data in records:
            key = (peer, master, slaves, len(data))
            pool = self.pools.setdefault(key, Pool(demand=Demand(last=now)))
            if rseq in unacked:
                pool.reserving.setdefault(rseq, []).append((kid, data))
                self.by_rseq[(peer, rseq)] = key
            else:
                pool.ready[kid] = data

    def rseqs(self, peer: str) -> set[int]:
        """Reservations made ahead for ``peer`` still unacknowledged: not a taker's (at
        start, only takers' unanswered reservations are cancelled)."""
        return {r for p, r in self.by_rseq if p == peer}

    def summary(self, peer: str) -> dict:
        pools = [p for k, p in self.pools.items() if k[0] == peer and p.held]
        c = self._counts(peer)
        return {"pools": len(pools), "ready_keys": sum(len(p.ready) for p in pools),
                "reserving_keys": sum(p.held - len(p.ready) for p in pools),
                "served_keys": c.served, "reserved_keys": c.reserved,
                "cancelled_keys": c.cancelled, "cancelled_bytes": c.cancelled_bytes}


def max_keys(size: int) -> int:
    """The most keys of ``size`` bytes one pool holds."""
    return min(MAX_RELAY_BLOCKS, MAX_AHEAD_BYTES // max(1, size))
