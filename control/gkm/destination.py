"""The destination's side of global key relay, without sockets (module 3): where an arrived
key block's fate is decided.

Given the BLOCKS and RESERVE messages that arrived (parsed by ``control.gkm.wire``) and
the node each connection proved to be (its CURVE key, admitted by the ZAP handler as that
node's User-Id, and its address), :class:`Inbox` decides which are refused and why,
hands the rest to the store, and from what the store reports builds the ACK and RESERVED
answers. Everything a batch stores is synced once, together (group commit), and the
answers are returned only after that: no answer before what it confirms is durable
(invariant 4). A block or reservation the store could not keep gets no answer: the origin
sends it again.

Multipath relay: SHARES of a block, one per path, wait in a :class:`ShareBuffer` until
all of one send have arrived; the block they XOR to is then stored like one that came
whole, and acknowledged on the connection whose share completed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from control.gkm.shares import ShareBuffer
from control.gkm.wire import (
    Ack,
    AckStatus,
    Blocks,
    Reserve,
    Reserved,
    ReserveStatus,
    Shares,
    encode_ack,
    encode_reserved,
)
from dataplane.limits import MAX_RELAY_BLOCKS

log = logging.getLogger("qkdnet.gkm")
MAX_HELD = 1024                   # dec requests waiting for their keys' confirmation
MAX_HELD_PER_SAE = MAX_HELD // 4  # ... of them from one SAE
MAX_HELD_KEYS = 2 * MAX_RELAY_BLOCKS  # the key IDs they name, in all: what re-checking
MAX_HELD_KEYS_PER_SAE = 1024          # them costs (a few us each), and of one SAE (more
                                      # in its one request, up to max_key_per_request)
MAX_HELD_LARGE_KEYS = MAX_HELD_KEYS // 2  # key IDs of requests larger than that share,
                                          # in all: the rest stays for requests within it


def may_hold(held: Iterable[tuple[str, frozenset[bytes]]], sae: str,
             keys: frozenset[bytes]) -> bool:
    """Whether a dec request of ``sae`` for ``keys`` (reserved here, not deliverable yet)
    may wait for them, given the requests waiting, (SAE, key IDs) each.

    A waiting request is read and checked again whenever its keys may have changed, on
    the key manager's one thread, so what may wait is bounded by what that costs: in
    requests and in key IDs, in all and per SAE (one request of an SAE waits whatever its
    size, up to the key API's max_key_per_request), and an SAE waits for a key once (a
    second request of its own naming a key it already waits for is refused "busy"; else
    one SAE could repeat one request naming 1,024 keys a thousand times and stall the
    node's key manager with its re-checks). Keys reserved ahead of demand stay
    unconfirmed until their master takes them, so one slave asking early and often must
    not crowd out the others' requests either, nor may a few SAEs' large first requests
    take every key ID that may wait: requests larger than an SAE's share may name half of
    them in all."""
    waiting = mine = n_keys = my_keys = large = 0
    for s, ks in held:
        waiting += 1
        n_keys += len(ks)
        if len(ks) > MAX_HELD_KEYS_PER_SAE:
            large += len(ks)
        if s == sae:
            if not ks.isdisjoint(keys):
                return False
            mine += 1
            my_keys += len(ks)
    return (waiting < MAX_HELD and mine < MAX_HELD_PER_SAE
            and n_keys + len(keys) <= MAX_HELD_KEYS
            and (mine == 0 or my_keys + len(keys) <= MAX_HELD_KEYS_PER_SAE)
            and (len(keys) <= MAX_HELD_KEYS_PER_SAE
                 or large + len(keys) <= MAX_HELD_LARGE_KEYS))

Proof = tuple[str | None, str | None]  # (User-Id, Peer-Address) of the connection
Message = Blocks | Shares | Ack | Reserve | Reserved


class DecIndex(Protocol):
    last_refused: str

    def beyond_reach(self, seq: int, ahead: int) -> bool: ...


class ReceivingStore(Protocol):
    """What :class:`Inbox` needs of the node's key store (``KeyStore``)."""

    dec: Mapping[str, DecIndex]

    def group(self) -> AbstractContextManager[None]: ...

    def store_received(self, peer: str, blocks: list[tuple[int, bytes | memoryview]]
                       ) -> list[AckStatus]: ...

    def apply_reservation(self, peer: str, msg: Reserve) -> ReserveStatus: ...


@dataclass(frozen=True)
class Node:
    name: str
    address: str


@dataclass
class Arrived:
    """One message from a relay connection: the routing identity to answer to (opaque
    here), what it carries, and who the connection proved to be."""

    ident: Any
    msgs: list[Message]
    proof: Proof


@dataclass
class Outcome:
    """What a batch of arrived messages comes to, once what it stored is durable."""

    answers: list[list[Any]] = field(default_factory=list)  # [ident, *frames] each
    refusals: list[str] = field(default_factory=list)       # why, in order
    settled: set[bytes] = field(default_factory=set)  # key IDs a confirmation or a
    # cancellation applied here decided: the held dec requests naming them may be answered


def _no_crash(point: str) -> None:
    pass


@dataclass
class Inbox:
    """The destination's rules for one node. ``nodes`` maps node ids to names and
    addresses; ``origins`` are the nodes that send global key here; ``ahead`` is how far
    past the highest block held a block may be numbered."""

    node_id: int
    node_name: str
    nodes: Mapping[int, Node]
    origins: Collection[str]
    ahead: int
    store: ReceivingStore
    crash: Callable[[str], None] = _no_crash
    received_blocks: int = 0
    received_bytes: int = 0
    shares: ShareBuffer = field(default_factory=ShareBuffer)
    block_size: int = 0  # every share is one block's size (0: not checked)

    def sender(self, origin_id: int, proof: Proof, out: Outcome) -> str | None:
        """The node a message comes from: the one its connection proved to be, which
        must be the node the message names, at that node's address; else refused."""
        origin = self.nodes.get(origin_id)
        user, peer_addr = proof
        if origin is None or user != origin.name or peer_addr != origin.address:
            out.refusals.append(f"a message claiming origin id {origin_id} came from node "
                                f"{user} at {peer_addr}")
            return None
        return origin.name

    def receive(self, arrived: list[Arrived], now: float = 0.0) -> Outcome:
        """Decide, store with one sync, and answer a batch of arrived messages (``now``
        dates shares held for the rest of their set)."""
        out = Outcome()
        with self.store.group():
            self._receive(arrived, out, now)
        return out

    def _combine(self, origin: str, msg: Shares, now: float, out: Outcome
                 ) -> Blocks | None:
        """The blocks whose last share ``msg`` brought, as if they had come whole; a
        message with a share of the wrong size, or one that disagrees with its send's
        other shares, is refused whole."""
        if self.block_size and any(len(d) != self.block_size for _, d in msg.blocks):
            out.refusals.append(f"shares from {origin} that are not {self.block_size} B "
                                f"blocks: refused")
            return None
        why = self.shares.check(origin, msg.nonce, msg.count, msg.blocks)
        if why is not None:
            out.refusals.append(f"shares from {origin} refused: {why}")
            return None
        done = [(seq, block) for seq, data in msg.blocks
                if (block := self.shares.add(origin, msg.nonce, msg.index, msg.count, seq,
                                             data, now)) is not None]
        return Blocks(msg.origin, msg.destination, tuple(done)) if done else None

    def _receive(self, arrived: list[Arrived], out: Outcome, now: float) -> None:
        accepted: list[tuple[Any, Blocks | Shares, str | None]] = []
        for a in arrived:
            if isinstance(a.msgs[0], Reserve):  # their answers go back together too
                answers = [r for m in a.msgs
                           if isinstance(m, Reserve)
                           and (r := self.reserve(m, a.proof, out)) is not None]
                if answers:
                    out.answers.append([a.ident, *answers])
                continue
            msg = a.msgs[0]
            if not isinstance(msg, Blocks | Shares):
                out.refusals.append("an acknowledgement arrived at the relay port")
                continue
            origin = self.sender(msg.origin, a.proof, out)
            if origin is None:
                continue
            if msg.destination != self.node_id or origin not in self.origins:
                out.refusals.append(f"blocks from {origin} for node id {msg.destination}: "
                                    f"not a pair this node keeps")
                accepted.append((a.ident, msg, None))
            elif self.store.dec[origin].beyond_reach(msg.blocks[-1][0], self.ahead):
                out.refusals.append(f"blocks from {origin} numbered up to "
                                    f"{msg.blocks[-1][0]}: more than {self.ahead} past the "
                                    f"highest held; refused")
                accepted.append((a.ident, msg, None))
            elif isinstance(msg, Shares):
                whole = self._combine(origin, msg, now, out)
                if whole is not None:
                    accepted.append((a.ident, whole, origin))
            else:
                accepted.append((a.ident, msg, origin))
        statuses = dict(self._store_blocks(accepted))
        for i, (ident, msg, _) in enumerate(accepted):
            sts = statuses.get(i, [AckStatus.REFUSED] * len(msg.blocks))
            if not sts:
                continue  # not stored: no answer
            ack = Ack(msg.origin, self.node_id,
                      tuple((seq, st) for (seq, _), st in zip(msg.blocks, sts, strict=True)))
            out.answers.append([ident, *encode_ack(ack)])

    def _store_blocks(self, accepted: list[tuple[Any, Blocks | Shares, str | None]]
                      ) -> Iterator[tuple[int, list[AckStatus]]]:
        """Each origin's accepted blocks stored in one call; per message its statuses
        (an empty list: not stored, no answer)."""
        for name in {o for _, _, o in accepted if o is not None}:
            mine = [(i, m) for i, (_, m, o) in enumerate(accepted) if o == name]
            self.crash("dest.received")
            try:
                flat = self.store.store_received(name, [b for _, m in mine for b in m.blocks])
            except Exception as e:  # e.g. a full disk: no ACK, the origin resends later
                log.error("gkm %s: cannot store blocks from %s: %s", self.node_name, name,
                          type(e).__name__)
                for i, _ in mine:
                    yield i, []
                continue
            self.crash("dest.stored")
            at = 0
            for i, m in mine:
                sts = flat[at:at + len(m.blocks)]
                at += len(m.blocks)
                for (_, data), st in zip(m.blocks, sts, strict=True):
                    if st == AckStatus.STORED:
                        self.received_blocks += 1
                        self.received_bytes += len(data)
                    elif st == AckStatus.CONFLICT:
                        log.error("gkm %s: block from %s held with other bytes: refused",
                                  self.node_name, name)
                yield i, sts

    def reserve(self, msg: Reserve, proof: Proof, out: Outcome) -> bytes | None:
        """Apply a reservation; the RESERVED frame to send once it is durable (None: no
        answer, the origin resends)."""
        origin = self.sender(msg.origin, proof, out)
        if origin is None:
            return None
        if msg.destination != self.node_id or origin not in self.origins:
            status = ReserveStatus.REFUSED
        else:
            try:
                status = self.store.apply_reservation(origin, msg)
            except Exception as e:  # e.g. a full disk: no answer, the origin resends
                log.error("gkm %s: cannot store a reservation from %s: %s", self.node_name,
                          origin, type(e).__name__)
                return None
            if status == ReserveStatus.REFUSED:
                log.error("gkm %s: refused from %s (skipped): %s", self.node_name, origin,
                          self.store.dec[origin].last_refused)
            elif status == ReserveStatus.APPLIED and not msg.saes:
                out.settled.update(bytes(k) for k in msg.key_ids)  # confirmed or cancelled
        return encode_reserved(Reserved(msg.origin, self.node_id, msg.rseq, status))[0]
