"""The key API worker's line to its node's global key manager, from asyncio.

One ZeroMQ DEALER per worker process on the manager's Unix socket; many requests in
flight at once, each tagged with a request id frame that the manager sends back
unchanged (the protocol is ``control.gkm_client``'s). The manager serves every worker's
requests one batch at a time with one sync per batch, which is what keeps the stores
consistent across Sanic's worker processes: no worker opens the stores itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct

import zmq
import zmq.asyncio

from control.gkm_client import socket_path, split_keys
from control.keystore import StoreError

# The manager answers a take for a remote slave within its reservation wait (5 s), so a
# request without an answer after this long is lost (the manager restarted).
TIMEOUT_S = 15.0
_RID = struct.Struct(">Q")


class GkmLink:
    def __init__(self, prefix: str, node: str, timeout_s: float = TIMEOUT_S):
        self.endpoint = f"ipc://{socket_path(prefix, node)}"
        self.timeout_s = timeout_s
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    def start(self) -> None:
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(StoreError("busy", "the key API is shutting down"))
        self.sock.close(0)
        self.ctx.term()

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            if len(frames) < 3 or len(frames[0]) != _RID.size:
                continue
            fut = self.waiting.pop(_RID.unpack(frames[0].bytes)[0], None)
            if fut is not None and not fut.done():
                fut.set_result(frames[2:])

    async def call(self, op: str, **args) -> tuple[dict, memoryview]:
        rid = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = fut
        try:
            await self.sock.send_multipart([_RID.pack(rid), b"",
                                            json.dumps({"op": op, **args}).encode()])
            frames = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            raise StoreError("busy", f"the global key manager did not answer within "
                                     f"{self.timeout_s:.0f} s") from None
        finally:
            self.waiting.pop(rid, None)
        head = json.loads(frames[0].bytes)
        if not head.get("ok"):
            raise StoreError(head.get("kind", "bad"), head.get("error", "refused"))
        return head, frames[1].buffer if len(frames) > 1 else memoryview(b"")

    async def take_enc_for(self, peer: str, number: int, size: int, slaves: list[str],
                           master: str) -> tuple[list[str], list[memoryview]]:
        head, data = await self.call("take_enc", peer=peer, number=number, size=size,
                                     slaves=slaves, master=master)
        return head["key_ids"], split_keys([size] * number, data)

    async def take_dec(self, peer: str, key_ids: list[str], sae: str, master: str
                       ) -> list[memoryview]:
        head, data = await self.call("take_dec", peer=peer, key_ids=key_ids, sae=sae,
                                     master=master)
        return split_keys(head["sizes"], data)

    async def stock(self, peer: str) -> dict:
        return (await self.call("stock", peer=peer))[0]
