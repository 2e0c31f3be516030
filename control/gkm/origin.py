"""The origin's handling of the destination's answers, without sockets (module 3).

An ACK says which blocks the destination holds durably: those become usable here (or
never usable, on CONFLICT), leave the outbox and count towards the pair's rate and the
current fill. A RESERVED answers a reservation (or a confirmation, or a cancellation):
a taker still waiting on it is answered once a confirmation of its keys is durably
queued, a taker already past its deadline is given up (its keys go to no one and their
reservation is cancelled at the destination), and a GAP means an earlier reservation was
lost, so every unacknowledged one is sent again, in order.

The functions here decide and update the pure bookkeeping (``control.gkm.relay``'s
Outbox, RateMeter, Restock, and :class:`Takers`); they return what the shell must do
with the store and the local socket.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from control.gkm import take
from control.gkm.relay import Outbox, RateMeter, Restock
from control.gkm.wire import Ack, AckStatus, Blocks, Reserve, Reserved, ReserveStatus

RESERVE_WAIT_S = 5.0          # a taker waits this long for the slave's node to confirm,
                              # or to its own deadline while the router has a path there

Key = tuple[str, int]  # (destination, reservation number)


def fits(msgs: Sequence[Blocks | Ack | Reserve | Reserved], origin: int,
         destination: int) -> bool:
    """Whether what came back on the connection to ``destination`` is answers (ACK or
    RESERVED) to this node, from that node."""
    return all(isinstance(m, Ack | Reserved) and m.origin == origin
               and m.destination == destination for m in msgs)


# ---- ACK ------------------------------------------------------------------------------

@dataclass
class Acked:
    """What an ACK comes to: blocks to mark usable, blocks held with other bytes there
    (never usable), and the error to show, if any."""

    usable: list[int] = field(default_factory=list)
    conflict: list[int] = field(default_factory=list)
    error: str | None = None


def on_ack(dest: str, msg: Ack, outbox: Outbox, rate: RateMeter, restock: Restock,
           now: float) -> Acked:
    """Sort an ACK's results for blocks still pending and settle them in the outbox,
    the rate meter and the current fill. Blocks no longer pending (acknowledged before)
    are left alone."""
    out = Acked(
        usable=[seq for seq, st in msg.results
                if st in (AckStatus.STORED, AckStatus.DUPLICATE) and seq in outbox.pending],
        conflict=[seq for seq, st in msg.results
                  if st == AckStatus.CONFLICT and seq in outbox.pending])
    for seq in out.usable:
        n = outbox.acked(seq, now)
        rate.add(n, now)
        restock.acked(n)
    for seq in out.conflict:
        outbox.conflict(seq, now)
    if out.conflict:
        out.error = f"{len(out.conflict)} block(s) held with other bytes by {dest}: unused"
    if any(st == AckStatus.REFUSED for _, st in msg.results):
        out.error = f"{dest} does not keep global key from this node (config?)"
    return out


# ---- RESERVED -------------------------------------------------------------------------

@dataclass
class Waiting:
    """A take answered once the slave's node confirms: where to answer (opaque here),
    the answer, when to give up if no path is routed there, and when anyway."""

    envelope: list[Any]
    reply: list[bytes]
    soft: float
    hard: float


class Takers:
    """Takes for slave SAEs waiting on their reservation, by (destination, number)."""

    def __init__(self) -> None:
        self.waiting: dict[Key, Waiting] = {}

    def __len__(self) -> int:
        return len(self.waiting)

    def wait(self, key: Key, envelope: list[Any], reply: list[bytes], now: float,
             deadline: float | None) -> None:
        soft = now + RESERVE_WAIT_S
        hard = deadline or soft
        self.waiting[key] = Waiting(envelope, reply, min(soft, hard), hard)

    def pop(self, key: Key) -> Waiting:
        return self.waiting.pop(key)

    def overdue(self, now: float, routed: Callable[[str], bool]) -> list[Key]:
        """Takers to answer "unreachable": at their deadline, or after RESERVE_WAIT_S if
        the router has no path to the slave's node (on a loaded machine a confirmation
        may take longer than that over a path that is there, while with no path it
        cannot come)."""
        return [key for key, w in self.waiting.items()
                if now >= w.hard or now >= w.soft and not routed(key[0])]


class Fate(Enum):
    FORGET = "forget"      # no taker waits: the reservation is acknowledged
    GIVE_UP = "give up"    # its taker stopped waiting: cancel it, then acknowledge
    REFUSED = "refused"    # acknowledged; its taker is told the slave's node refused
    CONFIRM = "confirm"    # applied: confirm its keys, then answer its taker


@dataclass
class Step:
    rseq: int
    fate: Fate
    waiting: Waiting | None = None
    refused: bool = False  # FORGET: the slave's node refused it (no taker to tell)


@dataclass
class ReservedPlan:
    """What RESERVED answers come to, in order: ``resend`` (a GAP: every unacknowledged
    reservation again, in order), and one step per other answer."""

    resend: bool = False
    steps: list[Step] = field(default_factory=list)

    @property
    def confirmed(self) -> list[int]:
        return [s.rseq for s in self.steps if s.fate == Fate.CONFIRM]


def on_reserved(dest: str, msgs: Sequence[Reserved], takers: Takers, now: float
                ) -> ReservedPlan:
    """Decide each answer, taking the takers it concerns off ``takers``. A taker whose
    confirmation is coming is answered only after the shell has durably queued that
    confirmation: the slave's node lets its SAEs fetch keys only after it, so keys whose
    taker is answered "unreachable" reach no SAE."""
    plan = ReservedPlan()
    for msg in msgs:
        if msg.status == ReserveStatus.GAP:
            plan.resend = True
            continue
        key = (dest, msg.rseq)
        w = takers.waiting.get(key)
        if w is not None and now >= w.hard:
            plan.steps.append(Step(msg.rseq, Fate.GIVE_UP, takers.pop(key)))
        elif w is None:
            plan.steps.append(Step(msg.rseq, Fate.FORGET,
                                   refused=msg.status == ReserveStatus.REFUSED))
        elif msg.status == ReserveStatus.REFUSED:
            plan.steps.append(Step(msg.rseq, Fate.REFUSED, takers.pop(key)))
        else:
            plan.steps.append(Step(msg.rseq, Fate.CONFIRM, takers.pop(key)))
    return plan


def refused_answer(dest: str) -> list[bytes]:
    return take.encode_refusal("bad", f"node {dest} refused the reservation")


def gave_up_answer(dest: str) -> list[bytes]:
    return take.encode_refusal(
        "unreachable", f"node {dest} did not confirm the reservation in time (its taker's "
                       f"deadline, or {RESERVE_WAIT_S:.0f} s with no route there); the keys "
                       f"were not handed out and their reservation is cancelled")

