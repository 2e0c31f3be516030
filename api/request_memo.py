"""enc_keys requests checked once per worker, without I/O: an SAE that keeps asking for keys
asks the same thing each time (the same slave, number and size), and checking it again
(the path's SAE ID, the query string or JSON body, the slaves' node) cost a 256-bit
request about a tenth of its worker's time, more than the key.

What a valid request resolves to is kept under everything it was checked from: the
caller (its certificate's SAE ID), the path's slave SAE ID, the method, and the query
string and body as received. The same bytes from the same caller resolve the same way
(the topology does not change under a running worker), so a request that matches
skips the checks and is answered exactly as it would have been. Refusals are never
kept: a bad request is checked, and refused, every time. Per-request state (the SAE's
rate and share limits, the keys themselves) is never kept either.

Bounded: requests longer than :data:`MEMO_MAX_INPUT` bytes are not kept, and at most
:data:`MEMO_PER_CALLER` per caller (the callers are the node's SAEs, whose certificates
were checked first); when a caller's are full they start over, so a caller sending ever
new requests costs its own checks, not anyone else's.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.etsi import EncKeysRequest

MEMO_PER_CALLER = 32   # requests kept per caller, at most (then its own start over)
MEMO_MAX_INPUT = 1024  # bytes of query string and body, at most, for a request kept

MemoKey = tuple[str, str, str, str, bytes]
"""(caller SAE, path's slave SAE, method, query string, body)."""


@dataclass(frozen=True)
class EncPlan:
    """What a valid enc_keys request resolves to."""

    req: EncKeysRequest
    peer: str                      # the slaves' node
    pair: tuple[str, str, tuple[str, ...], int]  # (peer, master, slaves, key bytes):
    #   the hand the keys may come from (api.hand.PairKey)
    nbytes: int                    # key asked for, in all

    @property
    def slaves(self) -> list[str]:
        return list(self.pair[2])


def plan(req: EncKeysRequest, master: str, slave: str, peer: str) -> EncPlan:
    slaves = (slave, *req.additional_slave_sae_ids)
    return EncPlan(req, peer, (peer, master, slaves, req.size_bytes),
                   req.number * req.size_bytes)


class RequestMemo:
    """Valid requests' plans by caller, then by what they were checked from."""

    def __init__(self, per_caller: int = MEMO_PER_CALLER):
        self.per_caller = per_caller
        self.plans: dict[str, dict[MemoKey, EncPlan]] = {}
        self.hits = 0

    @staticmethod
    def key(caller: str, slave: str, method: str, query: str, body: bytes | None
            ) -> MemoKey | None:
        """The memo's key of a request; None when it is too long to keep."""
        body = body or b""
        if len(query) + len(body) > MEMO_MAX_INPUT:
            return None
        return (caller, slave, method, query, body)

    def get(self, key: MemoKey | None) -> EncPlan | None:
        if key is None or (mine := self.plans.get(key[0])) is None:
            return None
        p = mine.get(key)
        if p is not None:
            self.hits += 1
        return p

    def put(self, key: MemoKey | None, p: EncPlan) -> None:
        if key is None:
            return
        mine = self.plans.setdefault(key[0], {})
        if len(mine) >= self.per_caller:
            mine.clear()
        mine[key] = p
