"""Where a link end's key went, from its key manager's status (pure; invariant 8).

A link end's key manager publishes, under ``accounting``, what its source delivered
(``source``: in, discarded, still undecided, stored per direction) and, per direction,
its ring's own counts (``ab``, ``ba``: see dataplane.ring.KeyAccount). This module turns
that into the balances `qkdctl status`, the metrics, the tests and `bench keyrate` show:

- source: ``in = pending + discarded + stored a->b + stored b->a``;
- ENC direction (this end encrypts): ``in = stored + used (pads, MAC keys, keepalives)
  + wasted``;
- DEC direction: ``in = stored + released + wiped at resyncs``.
Every one is exact when the link end is quiet (no block between source and ring, no
worker between using key and publishing it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Direction:
    """One direction of a link end, in bytes."""

    direction: str  # "ab" or "ba"
    role: str  # "enc" or "dec"
    key_in: int
    stored: int
    used_pad: int
    used_mac: int
    used_control: int
    wasted: int
    released: int
    balance: int

    @property
    def used(self) -> int:
        return self.used_pad + self.used_mac + self.used_control

    @property
    def waste_ratio(self) -> float | None:
        """Wasted over used key (ENC): what invariant 8 wants near 0."""
        return self.wasted / self.used if self.role == "enc" and self.used else None


@dataclass(frozen=True)
class LinkEnd:
    source_in: int
    discarded: int
    pending: int
    source_balance: int
    directions: tuple[Direction, ...]

    @property
    def enc(self) -> Direction:
        return next(d for d in self.directions if d.role == "enc")

    @property
    def dec(self) -> Direction:
        return next(d for d in self.directions if d.role == "dec")

    @property
    def balanced(self) -> bool:
        return self.source_balance == 0 and all(d.balance == 0 for d in self.directions)


def link_end(acct: dict) -> LinkEnd:
    """The balances of one link end from its key manager's ``accounting`` object."""
    src = acct["source"]
    stored = src["stored"]
    dirs = []
    for name in ("ab", "ba"):
        a = acct[name]
        dirs.append(Direction(name, a["role"], a["key_in"], a["stored"], a["used_pad"],
                              a["used_mac"], a["used_control"], a["wasted"], a["released"],
                              a["balance"]))
    balance = src["in"] - src["pending"] - src["discarded"] - stored["ab"] - stored["ba"]
    return LinkEnd(src["in"], src["discarded"], src["pending"], balance, tuple(dirs))
