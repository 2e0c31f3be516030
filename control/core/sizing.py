"""Sizes derived from a link's key rate, for every size the topology file leaves out (pure).

Real QKD links give 1-100 Mb/s of key, the emulator 1 Gb/s or more: one set of fixed
sizes cannot serve both. A 1 MiB key block takes 8 s to arrive at 1 Mb/s (the link would
look dead between blocks), a 1 MiB claim would hold all of a slow ring's key for one
worker, and a 64 MiB store would take a quarter of an hour to fill. So each size is a
span of time at the link's rate, rounded to a power of two and clamped:

| size | time at the rate | bounds |
| --- | --- | --- |
| key block (what the source delivers, one agreement decision) | 50 ms of the link | 4 KiB - 1 MiB |
| ring (per direction and link end) | 2 s of the link | 4 - 256 MiB |
| largest claim of an OTP worker | 10 ms of the link | 4 KiB - 1 MiB, at most ring/256 |
| reserve for control traffic (bulk leaves it) | 50 ms of the link | 64 KiB - 1 MiB |
| reserve for keepalives alone | - | 64 KiB, at most ring/64 |
| global key block | 250 ms of the slowest link | 4 KiB - 1 MiB |
| global key window (sent, unacknowledged) | 1 s of the slowest link | 2 blocks - 16 MiB |
| high watermark (low: half of it) | 32 s of the slowest link | 1 - 64 MiB |
| keepalive period | what keeps keepalives to 2 % of the slower direction's key | 0.2 - 10 s |
| relay ping period | what keeps all relay pings to 1 % of the slowest direction's key | 5 - 60 s |

Keepalives are the one cost an idle link pays, and they do not shrink with the link: every
0.2 s, the link-state database in one of them a second, they take about 0.57 kB/s on a
triangle, 0.9 % of a 1 Mb/s link's direction but 18 % of a 50 kb/s one's and 92 % of a
10 kb/s one's. So below about 1 Mb/s (more, on networks of over a dozen links, whose
database is larger) the period grows until they take 2 %; how long a silent peer has before its
link is called down grows with it (5 to 15 periods, as 1 - 3 s are at 0.2 s), and so does
how long the link-state entries they carry live (25 periods of the slowest link, as 5 s
are at 0.2 s).

A rate of 0 (as fast as the source can) sizes as 1 Gb/s does: the sizes qkdnet always had
for the emulator. Each size set in the topology file wins over its derived value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dataplane.limits import (
    CONTROL_RESERVE,
    KEEPALIVE_MAX_S,
    KEEPALIVE_S,
    KEEPALIVE_SHARE,
    LINK_DEAD_MAX_S,
    LINK_DEAD_S,
    LSA_MAX_AGE_S,
    LSDB_REFRESH_S,
    MAX_COST,
    MIN_CHUNK,
)
from dataplane.wire import MAC_KEY_LEN

KIB, MIB = 1 << 10, 1 << 20
UNLIMITED_MBPS = 1000.0  # what a rate of 0 (as fast as possible) sizes as


def pow2_floor(n: float) -> int:
    """The largest power of two not above ``n`` (1 for anything below 2)."""
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 1


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def bytes_per_s(rate_mbps: float) -> float:
    return (rate_mbps if rate_mbps > 0 else UNLIMITED_MBPS) * 1e6 / 8


@dataclass(frozen=True)
class LinkSizes:
    """A link's sizes, every one resolved."""

    block_size: int
    ring_capacity: int
    chunk: int  # the largest claim of an OTP worker
    reserve_bulk: int  # ENC key bulk packets leave in the ring
    reserve_control: int  # ENC key control packets leave (for the keepalives)
    pin_limit: int  # key used past a worker's kept range before it must give it back
    key_dead_s: float  # no key for this long (and only the reserve left): the link is down
    keepalive_s: float = KEEPALIVE_S  # the tunnel managers' keepalive period

    @property
    def peer_dead_s(self) -> tuple[float, float]:
        """A silent peer's link is down after between these (dataplane.liveness): 1 and
        3 s at the shortest period, as many periods at a longer one."""
        return peer_dead_s(self.keepalive_s)


KEEPALIVE_BODY = 40  # a keepalive's own words, as JSON: its node's name and pool size


def lsdb_estimate(links: list[tuple[str, str, str]]) -> int:
    """The link-state database of a network of ``links`` (name, end, end) as keepalives
    carry it (control.routing.linkstate: an entry per link end, its seq microseconds of
    wall time), in bytes, at its largest: every link down and at the highest cost."""
    entries = [[name, end, 2**53, False, MAX_COST] for name, a, b in links for end in (a, b)]
    return len(json.dumps({"lsdb": entries}, separators=(",", ":")))


def keepalive_period(direction_bps: float, lsdb_bytes: int) -> float:
    """The keepalive period at which keepalives take at most KEEPALIVE_SHARE of a
    direction's ``direction_bps`` key (bytes/s), never below KEEPALIVE_S nor above
    KEEPALIVE_MAX_S. Each costs its MAC key and words; the link-state database
    (``lsdb_bytes``) rides in one of them every LSDB_REFRESH_S, or in each when they are
    further apart."""
    budget = KEEPALIVE_SHARE * direction_bps
    plain = MAC_KEY_LEN + KEEPALIVE_BODY
    period = (plain + lsdb_bytes) / budget
    if period < LSDB_REFRESH_S and budget > lsdb_bytes:  # several a refresh
        period = plain / (budget - lsdb_bytes)
    return min(KEEPALIVE_MAX_S, max(KEEPALIVE_S, period))


def peer_dead_s(keepalive_s: float) -> tuple[float, float]:
    """The shortest and longest silence after which a peer keeping ``keepalive_s`` is
    called gone: LINK_DEAD_S and LINK_DEAD_MAX_S, scaled with the period."""
    scale = keepalive_s / KEEPALIVE_S
    return LINK_DEAD_S * scale, LINK_DEAD_MAX_S * scale


def lsa_max_age(keepalive_periods: list[float]) -> float:
    """How long a link-state entry lives unrefreshed: LSA_MAX_AGE_S at the shortest
    keepalive period, scaled with the slowest link's, as a silent peer's timeout is. An
    entry must outlive the longest a link stays up without word (the timeout's cap, 15
    periods) plus a refresh, or a link still up loses the entries it carries."""
    return LSA_MAX_AGE_S * max([KEEPALIVE_S, *keepalive_periods]) / KEEPALIVE_S


def slower_share(ratio: tuple[int, int]) -> float:
    """The share of a link's key its slower direction gets (a direction of 0 sends none)."""
    return min(s for s in ratio if s) / sum(ratio)


def link_sizes(rate_mbps: float, ratio: tuple[int, int], block_size: int | None = None,
               ring_capacity: int | None = None, chunk: int | None = None,
               lsdb_bytes: int = 0) -> LinkSizes:
    """Every size of a link; the ones given (set in the topology file) are kept.
    ``lsdb_bytes``: the network's link-state database as its keepalives carry it."""
    bps = bytes_per_s(rate_mbps)
    block = block_size or clamp(pow2_floor(bps * 0.05), 4 * KIB, MIB)
    ring = ring_capacity or clamp(pow2_floor(bps * 2), 4 * MIB, 256 * MIB)
    ring = max(ring, block)
    chunk = chunk or clamp(pow2_floor(bps * 0.01), MIN_CHUNK, min(MIB, max(MIN_CHUNK,
                                                                            ring // 256)))
    keepalive = min(CONTROL_RESERVE, ring // 64)
    control = clamp(pow2_floor(bps * 0.05), 64 * KIB, MIB)
    # A direction gets its share of the rate; blocks of it arrive that often.
    share = slower_share(ratio)
    block_interval = block / (bps * share)
    return LinkSizes(block_size=block, ring_capacity=ring, chunk=chunk,
                     reserve_bulk=min(keepalive + control, ring // 8),
                     reserve_control=keepalive, pin_limit=ring // 2,
                     key_dead_s=max(LINK_DEAD_S, 4 * block_interval),
                     keepalive_s=keepalive_period(bps * share, lsdb_bytes))


@dataclass(frozen=True)
class GkmSizes:
    block_size: int
    window: int
    low_watermark: int
    high_watermark: int
    heartbeat_s: float = 5.0  # the relay DEALERs' ZMTP pings (they cross the tunnels)


HEARTBEAT_S = 5.0        # the relay's ZMTP ping period: the shortest
HEARTBEAT_MAX_S = 60.0   # ... the longest, on the slowest links
HEARTBEAT_SHARE = 0.01   # of the slowest direction's key the relay's pings may take
PING_ROUND_B = 190       # key one connection's ping costs a direction: the ping, its answer
                         # and their TCP acknowledgements (measured: 760 B a round for the
                         # four connections of a pair each way, 50 kb/s, 5 s)


def heartbeat_period(slowest_direction_bps: float, connections: int) -> float:
    """The relay connections' ping period, at which the pings of all ``connections``
    (every DEALER of every pair: all may cross the slowest link) take at most
    HEARTBEAT_SHARE of the slowest direction's key (bytes/s), from HEARTBEAT_S to
    HEARTBEAT_MAX_S. A ping crosses the tunnels under one-time pad: at 5 s the four
    connections of a pair each way took 5.1 % of a 50 kb/s link's direction."""
    period = max(1, connections) * PING_ROUND_B / (HEARTBEAT_SHARE * slowest_direction_bps)
    return min(HEARTBEAT_MAX_S, max(HEARTBEAT_S, period))


def gkm_sizes(slowest_mbps: float, block_size: int | None = None, window: int | None = None,
              low: int | None = None, high: int | None = None,
              slowest_direction_mbps: float | None = None, connections: int = 2
              ) -> GkmSizes:
    """The global key manager's sizes from the slowest link's rate; given ones kept.
    ``slowest_direction_mbps`` (default: half the slowest link) and ``connections``
    (the relay's DEALERs in the network) size its pings."""
    bps = bytes_per_s(slowest_mbps)
    block = block_size or clamp(pow2_floor(bps * 0.25), 4 * KIB, MIB)
    window = window or clamp(pow2_floor(bps), 2 * block, 16 * MIB)
    high = high or max(clamp(pow2_floor(bps * 32), MIB, 64 * MIB), (low or 0) + 2 * block)
    low = low or high // 2
    return GkmSizes(block_size=block, window=window, low_watermark=low, high_watermark=high,
                    heartbeat_s=heartbeat_period(bytes_per_s(
                        slowest_mbps / 2 if slowest_direction_mbps is None
                        else slowest_direction_mbps), connections))


MAX_FIXED_SHARE = 0.5    # of a direction's key the fixed costs may take at their longest
                         # periods: at least as much is left for data, and the reserves fill


@dataclass(frozen=True)
class RateFloor:
    """The slowest key rate a link can work at, and what sets it."""

    mbps: float          # the link's rate below which it is refused
    keepalive_bps: float  # bytes/s of its keepalives at their longest period
    ping_bps: float       # bytes/s of all the relay's pings at their longest period


def rate_floor(ratio: tuple[int, int], lsdb_bytes: int, connections: int) -> RateFloor:
    """Below some tens of kb/s (a triangle: 25 kb/s) the keepalive period stops at
    KEEPALIVE_MAX_S and the relay's pings at HEARTBEAT_MAX_S, so these fixed costs no
    longer shrink with the rate: they
    grow as a share of the key until nothing is left for data, then exceed the key and
    the link cannot even stay up. The floor is the rate at which they take
    MAX_FIXED_SHARE of the slower direction's key. Every keepalive at that period carries
    the link-state database (``lsdb_bytes``); every relay connection (``connections``)
    may cross this link, as ``heartbeat_period`` assumes."""
    keepalive = (MAC_KEY_LEN + KEEPALIVE_BODY + lsdb_bytes) / KEEPALIVE_MAX_S
    pings = connections * PING_ROUND_B / HEARTBEAT_MAX_S
    direction_bps = (keepalive + pings) / MAX_FIXED_SHARE
    return RateFloor(mbps=direction_bps / slower_share(ratio) * 8 / 1e6,
                     keepalive_bps=keepalive, ping_bps=pings)
