"""The origin's handling of ACK and RESERVED (control/gkm/origin.py), driven without
sockets: which blocks become usable or never usable, which waiting takers are answered or
given up, and a GAP sends every unacknowledged reservation again."""

from __future__ import annotations

import json

import pytest

from control.gkm import origin
from control.gkm.origin import RESERVE_WAIT_S, Fate, Takers
from control.gkm.relay import Outbox, RateMeter, Restock
from control.gkm.wire import Ack, AckStatus, Blocks, Reserved, ReserveStatus

A, B = 1, 2


def pending(*seqs: int, size: int = 100) -> Outbox:
    box = Outbox()
    for s in seqs:
        box.add(s, size, 0.0)
    box.due(0.0, 1 << 30, 1 << 10)  # sent once
    return box


def test_stored_and_duplicate_become_usable_conflict_never_and_unknown_are_ignored():
    box, rate, restock = pending(0, 1, 2, 3), RateMeter(), Restock(500, 1000, 100)
    restock.blocks_to_make(0, 0, 0.0)  # a fill is running
    ack = Ack(A, B, ((0, AckStatus.STORED), (1, AckStatus.DUPLICATE),
                     (2, AckStatus.CONFLICT), (9, AckStatus.STORED)))
    got = origin.on_ack("B", ack, box, rate, restock, 1.0)
    assert (got.usable, got.conflict) == ([0, 1], [2])
    assert got.error == "1 block(s) held with other bytes by B: unused"
    assert sorted(box.pending) == [3] and box.acked_blocks == 2 and box.conflicts == 1
    assert rate.total == 200 and restock.current.bytes == 200
    # The same ACK again: nothing is pending any more, nothing changes.
    again = origin.on_ack("B", ack, box, rate, restock, 2.0)
    assert (again.usable, again.conflict, again.error) == ([], [], None)
    assert rate.total == 200


def test_a_refused_ack_says_the_pair_is_not_kept_there():
    box = pending(0)
    got = origin.on_ack("B", Ack(A, B, ((0, AckStatus.REFUSED),)), box, RateMeter(),
                        Restock(0, 1000, 100), 1.0)
    assert (got.usable, got.conflict) == ([], [])
    assert got.error == "B does not keep global key from this node (config?)"
    assert sorted(box.pending) == [0]  # resent later


def test_only_answers_for_this_pair_fit_the_connection():
    assert origin.fits([Ack(A, B, ()), Reserved(A, B, 0, ReserveStatus.APPLIED)], A, B)
    assert not origin.fits([Ack(B, A, ())], A, B)
    assert not origin.fits([Reserved(A, 3, 0, ReserveStatus.APPLIED)], A, B)
    assert not origin.fits([Blocks(A, B, ((0, b"x" * 64),))], A, B)


def takers(now: float = 0.0, **deadlines: float | None) -> Takers:
    t = Takers()
    for i, (name, deadline) in enumerate(deadlines.items()):
        t.wait(("B", i), [name.encode(), b""], [b"reply-" + name.encode()], now, deadline)
    return t


def test_reserved_answers_confirm_refuse_give_up_forget_and_resend():
    t = takers(t0=None, t1=None, t2=3.0)
    msgs = [Reserved(A, B, 0, ReserveStatus.APPLIED),
            Reserved(A, B, 1, ReserveStatus.REFUSED),
            Reserved(A, B, 2, ReserveStatus.DUPLICATE),   # its taker's deadline is past
            Reserved(A, B, 7, ReserveStatus.APPLIED),     # nobody waits (a cancellation)
            Reserved(A, B, 8, ReserveStatus.GAP)]
    plan = origin.on_reserved("B", msgs, t, now=3.0)
    assert plan.resend
    assert [(s.rseq, s.fate) for s in plan.steps] == [
        (0, Fate.CONFIRM), (1, Fate.REFUSED), (2, Fate.GIVE_UP), (7, Fate.FORGET)]
    assert plan.confirmed == [0]
    assert plan.steps[0].waiting.reply == [b"reply-t0"]
    assert plan.steps[2].waiting.envelope == [b"t2", b""]
    assert len(t) == 0  # every taker concerned is off the table
    # A duplicate answer for a taker still waiting confirms it too.
    t = takers(t0=None)
    plan = origin.on_reserved("B", [Reserved(A, B, 0, ReserveStatus.DUPLICATE)], t, 1.0)
    assert plan.confirmed == [0] and not plan.resend


def test_a_refusal_nobody_waits_for_says_so_for_the_keys_reserved_ahead():
    """A reservation made ahead of demand has no taker: its answer is FORGET, and whether
    the slave's node refused it (its keys are then dropped, not served) goes with it."""
    plan = origin.on_reserved("B", [Reserved(A, B, 4, ReserveStatus.REFUSED),
                                    Reserved(A, B, 5, ReserveStatus.APPLIED),
                                    Reserved(A, B, 6, ReserveStatus.DUPLICATE)], Takers(), 1.0)
    assert [(s.rseq, s.fate, s.refused) for s in plan.steps] == [
        (4, Fate.FORGET, True), (5, Fate.FORGET, False), (6, Fate.FORGET, False)]


def test_answers_of_another_destination_concern_none_of_its_takers():
    t = takers(t0=None)
    plan = origin.on_reserved("C", [Reserved(A, 3, 0, ReserveStatus.APPLIED)], t, 1.0)
    assert [s.fate for s in plan.steps] == [Fate.FORGET] and len(t) == 1


@pytest.mark.parametrize(("now", "routed", "overdue"), [
    (1.0, False, []),                               # early
    (2.0, True, [("B", 1)]),                        # t1's own deadline
    (RESERVE_WAIT_S, True, [("B", 1)]),             # a path is there: t0 waits on
    (RESERVE_WAIT_S, False, [("B", 0), ("B", 1)]),  # no path: given up after the wait
    (20.0, True, [("B", 0), ("B", 1)]),             # t0's deadline
])
def test_takers_are_given_up_at_their_deadline_or_without_a_route(now, routed, overdue):
    t = takers(t0=20.0, t1=2.0)
    assert (t.waiting[("B", 0)].soft, t.waiting[("B", 0)].hard) == (RESERVE_WAIT_S, 20.0)
    assert t.overdue(now, lambda name: routed) == overdue
    t = takers(t0=None)  # no deadline: RESERVE_WAIT_S in all
    assert t.waiting[("B", 0)].hard == RESERVE_WAIT_S


def test_the_refusals_sent_to_takers():
    head = json.loads(origin.gave_up_answer("B")[0])
    assert head == {"ok": False, "kind": "unreachable", "error":
                    f"node B did not confirm the reservation in time (its taker's deadline, "
                    f"or {RESERVE_WAIT_S:.0f} s with no route there); the keys were not "
                    f"handed out and their reservation is cancelled"}
    assert json.loads(origin.refused_answer("B")[0]) == {
        "ok": False, "kind": "bad", "error": "node B refused the reservation"}
