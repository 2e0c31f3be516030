"""The shell around a key API worker's hands (api.hand_keeper) on an event loop, against
a stand-in for its line to the key manager whose answers the test decides: what is
counted when a give-back fails, when a refill is still unanswered at stop, and that a
stop run twice gives nothing back twice. (End to end, with the real key manager:
tests/test_api_ahead.py.)"""

from __future__ import annotations

import asyncio
import json
import time

from api.hand_keeper import REFILL_WAIT_S, HandKeeper
from control.gkm.errors import BusyError

PAIR = ("B", "a1", ("b1",), 32)


class Line:
    """Answers takes with numbered keys, or holds them (``hold``); cancels are recorded
    and answered, or refused (``refuse``)."""

    def __init__(self) -> None:
        self.hold = False
        self.refuse = False
        self.cancelled: list[list[str]] = []
        self.n = 0

    async def take_enc_for(self, peer, number, size, slaves, master):
        if self.hold:
            await asyncio.sleep(3600)
        ids = [f"k{self.n + i}" for i in range(number)]
        self.n += number
        return ids, [bytes([i % 256]) * size for i in range(number)]

    async def call(self, request):
        if self.refuse:
            raise BusyError("the key manager restarted")
        self.cancelled.append(json.loads(request.body)["key_ids"])
        return {"cancelled": 1}, b""


async def _steady(keeper: HandKeeper, until, seconds: float = 0.3) -> list:
    """One key a request, up to 200 requests a second: a steady demand, for ``seconds``
    and then until ``until(served)`` holds (a throttled machine makes fewer requests in
    that time than the demand needs; 60 s at most); what was served."""
    served: list = []
    start = time.monotonic()
    while time.monotonic() - start < seconds or (
            not until(served) and time.monotonic() - start < 60):
        got = keeper.serve(PAIR, 1)
        if got is not None:
            served += got[0]
        await asyncio.sleep(0.005)
    return served


def _held(keeper: HandKeeper):
    """Served from the hand, and keys still in it."""
    return lambda served: bool(served) and keeper.hand.counts["held_keys"] > 0


def test_a_stop_gives_every_hand_back_once_counted():
    async def go():
        line = Line()
        keeper = HandKeeper(line, 0.1)
        served = await _steady(keeper, _held(keeper))
        held = keeper.hand.counts["held_keys"]
        assert served and held > 0
        await keeper.close()
        await keeper.close()  # run again (Sanic after a signal): nothing more
        c = keeper.hand.counts.get()
        assert len(line.cancelled) == 1 and len(line.cancelled[0]) == held
        assert not set(line.cancelled[0]) & set(served)
        assert (c["given_back_keys"], c["held_keys"], c["lost_keys"]) == (held, 0, 0)
        assert keeper.serve(PAIR, 1) is None  # stopped: nothing in hand, no refill

    asyncio.run(go())


def test_a_give_back_refused_counts_the_keys_lost_and_wipes_them():
    async def go():
        line = Line()
        keeper = HandKeeper(line, 0.1)
        await _steady(keeper, _held(keeper))
        hand = keeper.hand.hands[("B", "a1", ("b1",), 32)]
        keys = [k for _, k in hand.keys]
        line.refuse = True
        await keeper.close()
        c = keeper.hand.counts.get()
        assert (c["lost_keys"], c["lost_bytes"]) == (len(keys), 32 * len(keys))
        assert (c["given_back_keys"], c["held_keys"], c["held_bytes"]) == (0, 0, 0)
        assert all(not any(k) for k in keys)  # wiped

    asyncio.run(go())


def test_a_refill_unanswered_at_stop_is_given_up_and_counted_lost():
    async def go():
        line = Line()
        line.hold = True  # the key manager never answers the take for the hand
        keeper = HandKeeper(line, 0.1)
        # The requests go the long way (nothing in hand) until a refill has left.
        assert await _steady(keeper, lambda _: bool(keeper.refills)) == []
        assert len(keeper.refills) == 1  # one take at a time
        asked = sum(n for _, n in keeper.refills.values())
        t0 = time.monotonic()
        await keeper.close()
        assert time.monotonic() - t0 < REFILL_WAIT_S + 1.0
        assert not keeper.refills
        c = keeper.hand.counts.get()
        assert (c["lost_keys"], c["lost_bytes"], c["held_keys"]) == (asked, 32 * asked, 0)

    asyncio.run(go())
