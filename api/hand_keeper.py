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

GIVE_BACK_WAIT_S = 5.0  # a give-back not answered by then is left (logged)
log = logging.getLogger("qkdnet.api")


def wipe(keys: list[bytearray]) -> None:
    for k in keys:
        k[:] = bytes(len(k))


class HandKeeper:
    def __init__(self, gkm: GkmLink, ahead_s: float, counts: HandCounts | None = None):
        self.gkm = gkm
        self.hand = Hand(ahead_s, counts)
        self.refills: set[asyncio.Task] = set()
        self.sweeper: asyncio.Task | None = None

    def start(self) -> None:
        if self.hand.ahead_s > 0:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def serve(self, peer: str, master: str, slaves: list[str], size: int, number: int
              ) -> tuple[list[str], list[bytearray]] | None:
        """The request's keys from the pair's hand (the caller wipes them once they are
        in the answer), or None: the request goes the long way. Starts a refill when the
        pair's demand asks for one."""
        pair = (peer, master, tuple(slaves), size)
        now = time.monotonic()
        self.hand.note(pair, number, now)
        got = self.hand.take(pair, number)
        if (n := self.hand.wanted(pair, now)) > 0:
            self.hand.filling(pair)
            task = asyncio.get_running_loop().create_task(self._refill(pair, n))
            self.refills.add(task)
            task.add_done_callback(self.refills.discard)
        if got is None:
            return None
        return [kid for kid, _ in got], [k for _, k in got]

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
            try:
                for pair, keys in self.hand.idle(time.monotonic()):
                    await self._give_back(pair, keys)
            except Exception:  # never stop sweeping
                log.exception("key API: giving back an idle hand")

    async def _give_back(self, pair: PairKey, keys: list[HeldKey]) -> None:
        peer = pair[0]
        try:
            await asyncio.wait_for(self.gkm.call(take.cancel(peer, [k for k, _ in keys])),
                                   GIVE_BACK_WAIT_S)
        except (StoreError, TimeoutError) as e:
            log.warning("key API: %d key(s) held for node %s could not be given back "
                        "(%s); they reach no application", len(keys), peer,
                        type(e).__name__)
        finally:
            wipe([k for _, k in keys])

    async def close(self) -> None:
        """Stop refilling and give every hand back."""
        for task in [self.sweeper, *self.refills]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        hands = self.hand.empty()
        for pair, keys in hands:
            await self._give_back(pair, keys)
        if hands:
            c = self.hand.counts
            log.info("key API: %d key(s) served from this worker's hands; %d (%d B) given "
                     "back at stop or when idle", c.served, c.given_back, c.given_back_bytes)
