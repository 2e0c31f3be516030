"""Taking global keys from a node's key manager, from any process on the node.

Only the global key manager opens the node's RocksDB (RocksDB allows one writer), so the
key API's workers, `qkdctl` and tests ask it over a ZeroMQ REQ socket on a Unix socket
(``<node dir>/gkm.sock``). The manager serves requests one at a time, which is what makes
two concurrent takers never receive the same key; each take is durable before the reply.

The requests and answers are ``control.gkm.take``'s (re-exported here for the key API,
whose layer sees this module only): this module is their transport. The key API's
workers use the same protocol from asyncio (``api.gkm_link``), several requests in
flight on one DEALER socket, each tagged with a request id frame. Takes carry a deadline
a little before the caller gives up: the manager takes nothing for a request it reads
later.
"""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from control.core import paths
from control.gkm import take
from control.gkm.errors import BusyError, StoreError
from control.gkm.take import Request, decode_answer, split_keys, taken_key_ids

__all__ = ["DEFAULT_TIMEOUT_S", "BusyError", "GkmClient", "Request", "StoreError",
           "decode_answer", "socket_path", "split_keys", "take", "taken_key_ids"]

DEFAULT_TIMEOUT_S = 10.0
ANSWER_MARGIN_S = 2.0  # a take's deadline: this long before the client gives up


def socket_path(prefix: str, node: str) -> Path:
    return paths.node_dir(prefix, node) / "gkm.sock"


class GkmClient:
    """One per thread (a REQ socket is not shared); reconnects after a timeout."""

    def __init__(self, prefix: str, node: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.endpoint = f"ipc://{socket_path(prefix, node)}"
        self.timeout_ms = int(timeout_s * 1000)
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self.sock is None:
            self.sock = self.ctx.socket(zmq.REQ)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            self.sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            self.sock.connect(self.endpoint)
        return self.sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def deadline(self) -> float:
        """A take's deadline: the manager takes nothing after it."""
        return time.monotonic() + max(self.timeout_ms / 2000,
                                      self.timeout_ms / 1000 - ANSWER_MARGIN_S)

    def call(self, request: Request) -> tuple[dict, bytes]:
        sock = self._socket()
        try:
            sock.send(request.body)
            frames = sock.recv_multipart()
        except zmq.Again:
            self.close()  # a REQ socket that missed its reply cannot be reused
            raise BusyError(f"the global key manager did not answer within "
                                     f"{self.timeout_ms / 1000:.0f} s ({self.endpoint})") \
                from None
        return decode_answer(frames[0]), frames[1] if len(frames) > 1 else b""

    def take_enc(self, peer: str, number: int, size: int) -> list[tuple[str, bytes]]:
        head, data = self.call(take.take_enc(peer, number, size, self.deadline()))
        return list(zip(head["key_ids"], split_keys([size] * number, data), strict=True))

    def take_enc_for(self, peer: str, number: int, size: int, slaves: list[str],
                     master: str = "") -> list[tuple[str, bytes]]:
        """Keys for an application (``master``) whose slave SAEs are at ``peer``: returned
        only once ``peer`` has stored that these SAEs, and only they, may fetch them
        there (and only naming this master, when given)."""
        head, data = self.call(take.take_enc(peer, number, size, self.deadline(),
                                             slaves, master))
        return list(zip(head["key_ids"], split_keys([size] * number, data), strict=True))

    def reserve(self, peer: str, key_ids: list[str], sae: str) -> None:
        self.call(take.reserve(peer, key_ids, sae))

    def take_dec(self, peer: str, key_ids: list[str], sae: str, master: str | None = None
                 ) -> list[bytes]:
        head, data = self.call(take.take_dec(peer, key_ids, sae, master, self.deadline()))
        return split_keys(head["sizes"], data)

    def summary(self) -> dict:
        return self.call(take.summary())[0]["summary"]

    def digests(self, kind: str, peer: str) -> dict[int, tuple[str, str]]:
        head, _ = self.call(take.digests(kind, peer))
        return {int(k): tuple(v) for k, v in head["digests"].items()}
