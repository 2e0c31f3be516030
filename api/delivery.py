"""Whether an answer written on a TCP connection reached the other end's TCP.

A dec_keys answer counts as delivered only once the SAE's side has acknowledged every
byte of it (see ``docs/design.md``, "A dec_keys answer that is lost"). Bytes handed to the
transport may still sit in this process (the TLS layer's buffer, the event loop's own
write queue: uvloop's is not visible from Python) or in the kernel's send queue; a
``kill -9`` loses the first, a reset the second. So the socket itself is asked, on a
duplicate of its descriptor (the number is never read after the transport closed it and
it went to another socket): the bytes the kernel holds unacknowledged (``SIOCOUTQ``), the
connection's state and its count of bytes acknowledged so far (``TCP_INFO``).

The answer has left this process once the visible buffers are empty and the kernel's
send queue has room (an invisible queue is written as soon as there is room), seen twice
a loop turn apart: from then on, every byte of it is among the bytes the kernel has taken,
``acked + unacked``, which becomes the *mark*. It is delivered when the count of bytes
acknowledged reaches the mark; later answers on the same connection only add bytes after
it.

A connection that closes before the mark was reached is delivered if the peer
acknowledged the *early mark*: ``acked + unacked`` of a first look taken at once, in the
same turn of the loop as the answer's last write, when nothing was buffered and the
kernel's queue was under half full (the kernel took the whole answer: a write it refused
in part would have found the queue full a moment before). One look in the background
that finds everything acknowledged is no such proof: uvloop may still hold bytes the
kernel refused, and write them at its next turn. The mark alone misjudged the commonest client
of all: curl reads the answer and closes at once (a FIN acknowledging it all), and the
server's TLS layer answers with a close_notify, 24 bytes the closed socket resets. Taken
between the two looks, they raised the mark past what the peer could acknowledge; or the
first look in the background came after the close. 9 of 10 curl fetches were counted
lost, and handed out again to the same SAE.
:class:`DeliveryWatch` is that rule, pure; :func:`delivered` runs it on a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct
import termios
import time
from dataclasses import dataclass

TCP_CLOSE = 7  # linux/tcp_states.h: no connection (reset, or closed)
CALM_CHECKS = 2  # observations in a row, a loop turn apart, before the mark is taken
_BYTES_ACKED = struct.Struct("=Q")  # tcp_info.tcpi_bytes_acked, at offset 120
_INFO_LEN = 136


@dataclass
class DeliveryWatch:
    """The delivery of one answer, from observations of its connection."""
    sndbuf: int  # the kernel's send buffer: the queue has room below half of it
    mark: int | None = None
    calm: int = 0
    early_mark: int | None = None  # see first_look

    def first_look(self, buffered: int, unacked: int, acked: int) -> None:
        """The look taken in the turn of the loop that wrote the answer's last bytes."""
        if buffered == 0 and unacked < self.sndbuf // 2:
            self.early_mark = acked + unacked

    def observe(self, buffered: int, unacked: int, acked: int, tcp_state: int) -> str:
        """``"delivered"``, ``"lost"`` (the connection is gone short of the mark and of
        the early mark, or before the answer left this process) or ``"pending"``."""
        if self.mark is None:
            self.calm = self.calm + 1 if buffered == 0 and unacked < self.sndbuf // 2 else 0
            if self.calm >= CALM_CHECKS:
                self.mark = acked + unacked
        if self.mark is not None and acked >= self.mark:
            return "delivered"
        if tcp_state == TCP_CLOSE:
            early = self.early_mark is not None and acked >= self.early_mark
            return "delivered" if early else "lost"
        return "pending"


def socket_of(transport: asyncio.BaseTransport) -> socket.socket | None:
    """A duplicate of the transport's socket, to be watched after the transport closed
    it (taken while the answer's request is still being handled: a peer that closes at
    once would otherwise leave nothing to look at, and its answer counted lost)."""
    sock = transport.get_extra_info("socket")
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (AttributeError, OSError, ValueError):
        return None


def _buffered(transport: asyncio.BaseTransport) -> int:
    """Bytes the transport holds in this process that Python can see: the TLS layer's,
    and (asyncio's own loop) the TCP transport's under it."""
    n = transport.get_write_buffer_size()
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if inner is not None:
        n += inner.get_write_buffer_size()
    return n


def connection_counts(sock: socket.socket) -> tuple[int, int, int]:
    """(bytes sent and not yet acknowledged, bytes acknowledged so far, TCP state)."""
    unacked = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _INFO_LEN)
    return unacked, _BYTES_ACKED.unpack_from(info, 120)[0], info[0]


def watch_now(transport: asyncio.BaseTransport
              ) -> tuple[socket.socket, DeliveryWatch] | None:
    """The socket of ``transport`` (duplicated) and a watch with its first look, taken now:
    call it in the turn of the loop that wrote the answer's last bytes."""
    sock = socket_of(transport)
    if sock is None:
        return None
    try:
        watch = DeliveryWatch(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        unacked, acked, _ = connection_counts(sock)
        watch.first_look(_buffered(transport), unacked, acked)
    except OSError:
        sock.close()
        return None
    return sock, watch


async def delivered(transport: asyncio.BaseTransport, limit_s: float,
                    started: tuple[socket.socket, DeliveryWatch] | None = None) -> bool:
    """Wait until every byte written so far on ``transport`` is acknowledged by the peer
    (True), or the connection is lost short of that (False). After ``limit_s`` the
    connection is aborted (what it still holds never arrives) and False returned.
    ``started``: what :func:`watch_now` gave when the answer was written (its socket is
    closed here)."""
    started = started if started is not None else watch_now(transport)
    if started is None:
        return False
    sock, watch = started
    deadline = time.monotonic() + limit_s
    delay = 0.0005
    try:
        while True:
            try:
                unacked, acked, state = connection_counts(sock)
            except OSError:
                return False
            v = watch.observe(_buffered(transport), unacked, acked, state)
            if v != "pending":
                return v == "delivered"
            if time.monotonic() > deadline:
                transport.abort()
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
    finally:
        with contextlib.suppress(OSError):
            sock.close()  # the duplicate only: the connection stays the transport's
