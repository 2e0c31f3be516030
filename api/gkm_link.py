"""The key API worker's line to its node's global key manager, from asyncio.

One ZeroMQ DEALER per worker process on the manager's Unix socket, read from the event
loop's own reader (not zmq.asyncio: see ``docs/design.md``, "Workers and shared stores");
many requests in flight at once, each tagged with a request id frame that the manager
sends back unchanged (the requests and answers are ``control.gkm.take``'s, through
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
import zmq.utils.monitor

from control.core import zmq_frames
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


class _TimedOut(Exception):
    """A request's answer did not come within the link's timeout."""


class GkmLink:
    def __init__(self, prefix: str, node: str, timeout_s: float = TIMEOUT_S):
        self.endpoint = f"ipc://{socket_path(prefix, node)}"
        self.timeout_s = timeout_s
        # Plain sockets on the event loop's own reader (add_reader on their descriptors)
        # rather than zmq.asyncio's: that machinery (a future, a timer and several
        # callbacks per message) cost a worker more per request than Sanic and TLS did.
        self.ctx = zmq.Context()
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
        self.loop: asyncio.AbstractEventLoop | None = None
        self.room = asyncio.Event()  # set while the socket takes sends
        self.room.set()
        self.draining = False
        self.settling: set[asyncio.Task] = set()  # background work: words, restarts
        self.restarts_seen = 0
        self.closing = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.sock.FD, self._drain)
        self.loop.add_reader(self.monitor.FD, self._on_monitor)
        self._drain()
        self._on_monitor()

    async def close(self) -> None:
        if self.closing:  # closing or closed already (a shutdown run again after a signal)
            return
        self.closing = True
        if self.settling:  # words on answers still on their way (a short while)
            await asyncio.wait(self.settling, timeout=2.0)
        for task in list(self.settling):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.loop is not None:
            self.loop.remove_reader(self.sock.FD)
            self.loop.remove_reader(self.monitor.FD)
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(0)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(BusyError("the key API is shutting down"))
        self.sock.close(0)
        self.ctx.term()

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    def _drain(self) -> None:
        """Read every answer there is. A ZeroMQ socket's descriptor only signals that its
        state may have changed (edge-triggered): read until EVENTS says nothing is left,
        and look again after each send (a send can take the signal)."""
        if self.draining or self.sock.closed:
            return
        self.draining = True
        try:
            while True:
                events = self.sock.getsockopt(zmq.EVENTS)  # an int
                if events & zmq_frames.POLLOUT and not self.room.is_set():
                    self.room.set()
                if not events & zmq_frames.POLLIN:
                    return
                try:
                    frames = zmq_frames.recv(self.sock, zmq_frames.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                self._on_answer(frames)
        finally:
            self.draining = False

    def _on_answer(self, frames: list) -> None:
        if len(frames) < 3 or len(frames[0]) != _RID.size:
            return
        rid = _RID.unpack(frames[0].bytes)[0]
        fut = self.waiting.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(frames[2:])
        elif rid in self.gave_up:
            self._background(self._cancel_late(self.gave_up.pop(rid), frames[2]))

    def _on_monitor(self) -> None:
        """The manager's process went away: what waits on it is sent again or refused."""
        while not self.monitor.closed and \
                self.monitor.getsockopt(zmq.EVENTS) & zmq_frames.POLLIN:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.restarts_seen += 1
                self._background(self._after_restart())

    async def _after_restart(self) -> None:
        try:
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
        except Exception:  # never stop watching
            log.exception("key API: handling the key manager's restart")

    async def _send(self, frames: list[bytes]) -> None:
        """Send at once; while the socket takes nothing (the DEALER's queue is full while
        the manager is away long), wait for room, at most the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                zmq_frames.send(self.sock, frames, zmq_frames.NOBLOCK)
                break
            except zmq.Again:
                self.room.clear()
                self._drain()  # room may have come already
                left = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(self.room.wait(), max(0.0, min(left, 0.1)))
                except TimeoutError:
                    if left <= 0.1:
                        raise BusyError("the global key manager is not taking requests; "
                                        "nothing was taken") from None
        self._drain()

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
        await self._send([_RID.pack(next(self.ids)), b"", take.cancel(peer, ids).body])

    def _deadline(self) -> float:
        """A take's deadline: the manager must have answered by then."""
        return time.monotonic() + max(self.timeout_s / 2, self.timeout_s - ANSWER_MARGIN_S)

    def _expire(self, rid: int) -> None:
        fut = self.waiting.get(rid)
        if fut is not None and not fut.done():
            fut.set_exception(_TimedOut())

    async def call(self, request: Request, rid: int | None = None
                   ) -> tuple[dict, memoryview]:
        rid = next(self.ids) if rid is None else rid
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.waiting[rid] = fut
        frames = [_RID.pack(rid), b"", request.body]
        self.sent[rid] = (request, frames)
        timer = loop.call_later(self.timeout_s, self._expire, rid)
        try:
            await self._send(frames)
            frames = await fut
        except _TimedOut:
            if request.op == "take_enc":  # its answer, if it ever comes, goes to no one
                self._give_up(rid, request.peer)
            raise BusyError(f"the global key manager did not answer within "
                            f"{self.timeout_s:.0f} s; nothing was taken") from None
        except asyncio.CancelledError:  # the request was dropped (its SAE went away):
            if request.op == "take_enc":  # the take's keys go to no one
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # answered already, but it will not be sent: cancel them now
                    self._background(self._cancel_late(request.peer, fut.result()[0]))
                else:  # cancelled when the answer comes
                    self._give_up(rid, request.peer)
            raise
        finally:
            timer.cancel()
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
        from api.delivery import watch_now

        # The first look now, in the turn that wrote the answer: a peer that reads it and
        # closes at once is gone before the background's first look.
        started = watch_now(transport) if transport is not None else None
        self._background(self._settle(peer, key_ids, sae, token, transport, started))

    async def _settle(self, peer: str, key_ids: list[str], sae: str, token: int,
                      transport: asyncio.BaseTransport | None, started=None) -> None:
        from api.delivery import delivered

        t0 = time.monotonic()
        written = transport is not None and await delivered(transport, DELIVERY_WAIT_S,
                                                            started)
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
