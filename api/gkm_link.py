"""The key API worker's line to its node's global key manager, from asyncio.

One ZeroMQ DEALER per worker process on the manager's Unix socket; many requests in
flight at once, each tagged with a request id frame that the manager sends back
unchanged (the requests and answers are ``control.gkm.take``'s, through
``control.gkm.client``). The manager serves every worker's
requests one batch at a time with one sync per batch, which is what keeps the stores
consistent across Sanic's worker processes: no worker opens the stores itself.

A take carries its deadline, a little before this side gives up: the manager takes
nothing for a request it reads later (it was held up), and cancels a reservation whose
confirmation comes later, so a request answered 503 here has taken nothing anywhere. An
answer that still arrives after this side gave up has its keys cancelled at the slave's
node (they went to no one).

A dec take names its *holder* (this worker's process identity and the request's
number): the manager hands the keys and counts them delivered only when the worker says
the SAE's side acknowledged the whole answer (:meth:`GkmLink.settle`, with
``api.delivery``); an answer that was lost, or whose worker died, leaves its keys to the
same SAE (see ``control.gkm.store.Handing``).

When the manager's process goes away (the socket disconnects), requests waiting on it
are not left to time out: reads and dec takes are sent again, to the manager that
replaces it (a dec take again is the same handing); an enc take is refused at once,
nothing taken (a late answer's keys are cancelled as above).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import struct
import time
from collections import OrderedDict

import zmq
import zmq.asyncio
import zmq.utils.monitor

from control.core.procs import process_identity
from control.gkm.client import (
    BusyError,
    Request,
    StoreError,
    decode_answer,
    socket_path,
    split_keys,
    take,
    taken_key_ids,
)

# The manager answers a take by the deadline the take carries (ANSWER_MARGIN_S before
# this), so a request without an answer after this long is lost (the manager restarted).
TIMEOUT_S = 15.0
ANSWER_MARGIN_S = 2.0  # the manager must have answered this long before we give up
GAVE_UP_KEPT = 4096    # takes given up on, remembered to cancel a late answer's keys
# The same again is harmless: reads, a dec take (the same handing), a word on an answer.
RESENDABLE = ("take_dec", "answered", "stock", "summary", "digests")
DELIVERY_WAIT_S = 30.0  # an answer the SAE's side has not acknowledged by then: lost
_RID = struct.Struct(">Q")
log = logging.getLogger("qkdnet.api")


class GkmLink:
    def __init__(self, prefix: str, node: str, timeout_s: float = TIMEOUT_S):
        self.endpoint = f"ipc://{socket_path(prefix, node)}"
        self.timeout_s = timeout_s
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # Request numbers start at random: a take's holder is (process, number), and two
        # links in one process must not name the same one.
        self.ids = itertools.count(random.randrange(1, 1 << 62))
        self.identity = process_identity(os.getpid())  # 0 if unknown: takes are final
        self.waiting: dict[int, asyncio.Future] = {}
        self.sent: dict[int, tuple[Request, list[bytes]]] = {}  # waiting: what, frames
        self.gave_up: OrderedDict[int, str] = OrderedDict()  # request id -> peer node
        self.reader: asyncio.Task | None = None
        self.watcher: asyncio.Task | None = None
        self.settling: set[asyncio.Task] = set()
        self.restarts_seen = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.reader = loop.create_task(self._read())
        self.watcher = loop.create_task(self._watch())

    async def close(self) -> None:
        if self.settling:  # words on answers still on their way (a short while)
            await asyncio.wait(self.settling, timeout=2.0)
        for task in (self.reader, self.watcher, *self.settling):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(0)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(BusyError("the key API is shutting down"))
        self.sock.close(0)
        self.ctx.term()

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            if len(frames) < 3 or len(frames[0]) != _RID.size:
                continue
            rid = _RID.unpack(frames[0].bytes)[0]
            fut = self.waiting.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(frames[2:])
            elif rid in self.gave_up:
                await self._cancel_late(self.gave_up.pop(rid), frames[2])

    async def _watch(self) -> None:
        """The manager's process went away: what waits on it is sent again or refused."""
        while True:
            try:
                event = zmq.utils.monitor.parse_monitor_message(
                    await self.monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self.restarts_seen += 1
                    await self._after_restart()
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop watching
                log.exception("key API: handling the key manager's restart")

    async def _after_restart(self) -> None:
        for rid, (request, frames) in list(self.sent.items()):
            fut = self.waiting.get(rid)
            if fut is None or fut.done():
                continue
            if request.op in RESENDABLE:
                await self._send(frames)
                continue
            if request.op == "take_enc":
                self._give_up(rid, request.peer)
            fut.set_exception(StoreError(
                "busy", "the node's global key manager restarted while serving the "
                        "request; nothing was taken"))

    async def _send(self, frames: list[bytes]) -> None:
        """Send, waiting at most the timeout (the DEALER's queue is full while the
        manager is away long)."""
        try:
            await asyncio.wait_for(self.sock.send_multipart(frames), self.timeout_s)
        except TimeoutError:
            raise BusyError("the global key manager is not taking requests; "
                                     "nothing was taken") from None

    def _give_up(self, rid: int, peer: str) -> None:
        self.gave_up[rid] = peer
        while len(self.gave_up) > GAVE_UP_KEPT:
            self.gave_up.popitem(last=False)

    async def _cancel_late(self, peer: str, head_frame) -> None:
        """An answer to a take whose caller was already told it failed: its keys went to
        no one, so the slave's node must not hand them out either."""
        ids = taken_key_ids(head_frame.bytes)
        if not ids:
            return
        log.warning("key API: the key manager answered a take after it had been refused "
                    "(503); its %d key(s) for node %s are cancelled", len(ids), peer)
        await self.sock.send_multipart([_RID.pack(next(self.ids)), b"",
                                        take.cancel(peer, ids).body])

    def _deadline(self) -> float:
        """A take's deadline: the manager must have answered by then."""
        return time.monotonic() + max(self.timeout_s / 2, self.timeout_s - ANSWER_MARGIN_S)

    async def call(self, request: Request, rid: int | None = None
                   ) -> tuple[dict, memoryview]:
        rid = next(self.ids) if rid is None else rid
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        frames = [_RID.pack(rid), b"", request.body]
        self.sent[rid] = (request, frames)
        try:
            await self._send(frames)
            frames = await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except TimeoutError:
            if not fut.done():  # (an answer that came with the timeout is kept)
                if request.op == "take_enc":  # its answer, if it ever comes, goes to
                    self._give_up(rid, request.peer)  # no one
                raise BusyError(f"the global key manager did not answer within "
                                         f"{self.timeout_s:.0f} s; nothing was taken") \
                    from None
            frames = fut.result()
        finally:
            self.waiting.pop(rid, None)
            self.sent.pop(rid, None)
        head = decode_answer(frames[0].bytes)
        return head, frames[1].buffer if len(frames) > 1 else memoryview(b"")

    async def take_enc_for(self, peer: str, number: int, size: int, slaves: list[str],
                           master: str) -> tuple[list[str], list[memoryview]]:
        head, data = await self.call(take.take_enc(peer, number, size, self._deadline(),
                                                   slaves, master))
        return head["key_ids"], split_keys([size] * number, data)

    async def take_dec(self, peer: str, key_ids: list[str], sae: str, master: str
                       ) -> tuple[list[memoryview], int | None]:
        """The keys, handed to ``sae`` in an answer whose fate this worker must then
        report under the returned token (:meth:`settle`); token None: the take was final
        (this process's identity is unknown)."""
        if not self.identity:
            head, data = await self.call(take.take_dec(peer, key_ids, sae, master,
                                                       self._deadline()))
            return split_keys(head["sizes"], data), None
        token = next(self.ids)
        try:
            head, data = await self.call(
                take.take_dec(peer, key_ids, sae, master, self._deadline(),
                              holder=(self.identity, token)), rid=token)
        except BaseException:  # refused, timed out, or its connection gone: nobody gets
            self.settle(peer, key_ids, sae, token, None)  # what may have been handed
            raise
        return split_keys(head["sizes"], data), token

    def settle(self, peer: str, key_ids: list[str], sae: str, token: int | None,
               transport: asyncio.BaseTransport | None) -> None:
        """Report, in the background, what became of the answer of dec take ``token``:
        delivered once the SAE's side has acknowledged all of it on ``transport``, lost
        if that connection goes first (or no answer was sent: ``transport`` None)."""
        if token is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._settle(peer, key_ids, sae, token, transport))
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    async def _settle(self, peer: str, key_ids: list[str], sae: str, token: int,
                      transport: asyncio.BaseTransport | None) -> None:
        from api.delivery import delivered

        t0 = time.monotonic()
        written = transport is not None and await delivered(transport, DELIVERY_WAIT_S)
        try:
            await self.call(take.answered(peer, key_ids, sae, (self.identity, token),
                                          written))
        except StoreError as e:  # a handing not settled ends by itself (HANDED_KEEP_S):
            # until then the SAE's next fetch of these keys waits, and may get a 503
            log.warning("key API: the word on dec take %d (%s after %.1f s) did not reach "
                        "the key manager: %s", token, "delivered" if written else "lost",
                        time.monotonic() - t0, e)

    async def stock(self, peer: str) -> dict:
        return (await self.call(take.stock(peer)))[0]
