"""A key API worker's hands (``api.hand``) kept against its line to the key manager:
refills are enc takes sent in the background, idle hands and, at stop, every hand are
given back (cancelled at both nodes, as keys whose taker gave up are)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from api.gkm_link import GkmLink
from api.hand import HAND_IDLE_S, Hand, HeldKey, PairKey
from api.hand_counts import HandCounts
from control.gkm.client import StoreError, take

GIVE_BACK_WAIT_S = 1.5  # at most this long for a give-back's answer
REFILL_WAIT_S = 1.0     # at stop, for refills in flight (api.server.STOP_EXTRA_S in all)
log = logging.getLogger("qkdnet.api")


def wipe(keys: list[bytearray]) -> None:
    for k in keys:
        k[:] = bytes(len(k))


class HandKeeper:
    def __init__(self, gkm: GkmLink, ahead_s: float, counts: HandCounts | None = None):
        self.gkm = gkm
        self.hand = Hand(ahead_s, counts)
        self.refills: dict[asyncio.Task, tuple[PairKey, int]] = {}  # on their way: for
        #   which hand, how many keys
        self.giving: set[asyncio.Task] = set()  # give-backs on their way
        self.sweeper: asyncio.Task | None = None
        self.stopping = False  # the worker is draining: no refills
        self.closed = False

    def start(self) -> None:
        if self.hand.ahead_s > 0:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def serve(self, pair: PairKey, number: int
              ) -> tuple[list[str], list[bytearray]] | None:
        """The request's keys from the pair's hand (the caller wipes them once they are
        in the answer), or None: the request goes the long way. Starts a refill when the
        pair's demand asks for one."""
        got, n = self.hand.serve(pair, number, time.monotonic())
        if n > 0 and not self.stopping:
            self.hand.filling(pair)
            task = asyncio.get_running_loop().create_task(self._refill(pair, n))
            self.refills[task] = (pair, n)
            task.add_done_callback(self.refills.pop)
        if got is None:
            return None
        return [kid for kid, _ in got], [k for _, k in got]

    def _give_back_soon(self, pair: PairKey, keys: list[HeldKey]) -> None:
        """Give a dropped hand back in a task of its own (stopping the sweeper cannot cut
        it short; :meth:`close` waits for it)."""
        task = asyncio.get_running_loop().create_task(self._give_back(pair, keys))
        self.giving.add(task)
        task.add_done_callback(self.giving.discard)

    async def _refill(self, pair: PairKey, number: int) -> None:
        peer, master, slaves, size = pair
        try:
            ids, keys = await self.gkm.take_enc_for(peer, number, size, list(slaves),
                                                    master)
        except StoreError:  # no key now, or the slave's node unreachable: requests go
            self.hand.refused(pair, time.monotonic())  # the long way for a while
            return
        except asyncio.CancelledError:  # stopping: a late answer's keys are cancelled
            self.hand.refused(pair, time.monotonic())  # by the link
            raise
        except Exception:
            log.exception("key API: a take for a worker's hand failed")
            self.hand.refused(pair, time.monotonic())
            return
        self.hand.filled(pair, [(kid, bytearray(k)) for kid, k in zip(ids, keys, strict=True)])

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(HAND_IDLE_S / 12)
            for pair, keys in self.hand.idle(time.monotonic()):
                self._give_back_soon(pair, keys)

    async def _give_back(self, pair: PairKey, keys: list[HeldKey]) -> None:
        """Cancel a dropped hand's keys at both nodes; counted given back once the key
        manager has answered, lost if it could not be asked (they reach no application
        either way)."""
        peer = pair[0]
        try:
            await asyncio.wait_for(self.gkm.call(take.cancel(peer, [k for k, _ in keys])),
                                   GIVE_BACK_WAIT_S)
            self.hand.given_back(keys)
        except BaseException as e:
            self.hand.lost(keys)
            log.warning("key API: %d key(s) held for node %s could not be given back "
                        "(%s); they reach no application", len(keys), peer,
                        type(e).__name__)
            if not isinstance(e, Exception):
                raise
        finally:
            wipe([k for _, k in keys])

    async def close(self) -> None:
        """Stop refilling, let refills on their way land (briefly), give every hand
        back. A refill still unanswered is given up: the link cancels its keys if the
        answer comes while it is open; they are counted lost, as many as were asked
        (at most: the key manager may have taken none)."""
        if self.closed:  # closing or closed already (a shutdown run again)
            return
        self.closed = self.stopping = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.sweeper
        if self.refills:
            await asyncio.wait(set(self.refills), timeout=REFILL_WAIT_S)
        for task, (pair, number) in list(self.refills.items()):  # unanswered still:
            task.cancel()                                          # given up
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.hand.abandoned(pair, number)
        for pair, keys in self.hand.empty():
            self._give_back_soon(pair, keys)
        if self.giving:
            await asyncio.wait(set(self.giving), timeout=GIVE_BACK_WAIT_S + 0.5)
        c = self.hand.counts
        if c["taken_keys"]:
            log.info("key API: %d key(s) served from this worker's hands; %d (%d B) given "
                     "back at stop or when idle, %d (%d B) lost", c["served_keys"],
                     c["given_back_keys"], c["given_back_bytes"], c["lost_keys"],
                     c["lost_bytes"])
