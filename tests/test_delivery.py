"""When a dec_keys answer counts as delivered: the rule, and a real TCP connection on
loopback (an SAE that reads its answer, and one that resets the connection instead)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from api.delivery import CALM_CHECKS, TCP_CLOSE, DeliveryWatch, connection_counts, delivered

TCP_ESTABLISHED = 1


def test_delivered_once_the_peer_acknowledged_up_to_the_mark():
    w = DeliveryWatch(sndbuf=1000)
    # Still in this process (buffered), or the kernel's queue full (an invisible queue
    # may hold more): no mark yet, whatever the acknowledgements say.
    assert w.observe(buffered=10, unacked=0, acked=500, tcp_state=TCP_ESTABLISHED) == \
        "pending"
    assert w.observe(0, 900, 500, TCP_ESTABLISHED) == "pending"
    assert w.mark is None
    # Calm twice in a row: the mark is what the kernel has taken, acked + unacked.
    assert w.observe(0, 300, 600, TCP_ESTABLISHED) == "pending" and w.mark is None
    assert w.observe(0, 300, 700, TCP_ESTABLISHED) == "pending" and w.mark == 1000
    # Later answers on the connection add bytes after the mark and change nothing.
    assert w.observe(0, 999, 999, TCP_ESTABLISHED) == "pending"
    assert w.observe(0, 999, 1000, TCP_ESTABLISHED) == "delivered"


def test_a_reset_short_of_the_mark_is_lost_and_after_it_delivered():
    w = DeliveryWatch(sndbuf=1000)
    assert w.observe(0, 0, 0, TCP_CLOSE) == "lost"  # gone before the answer left
    w = DeliveryWatch(sndbuf=1000)
    for _ in range(CALM_CHECKS):
        w.observe(0, 100, 50, TCP_ESTABLISHED)
    assert w.observe(0, 20, 130, TCP_CLOSE) == "lost"
    assert w.observe(0, 0, 150, TCP_CLOSE) == "delivered"  # acknowledged, then reset


def test_the_kernel_counts_bytes_acknowledged_where_we_read_them():
    """tcpi_bytes_acked at offset 120 of TCP_INFO: a connection that sent 100,000 bytes
    to a peer that read them all shows 100,000 acknowledged and none outstanding."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        s, _ = srv.accept()
        with c, s:
            s.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(c.recv(65536))
            deadline = time.monotonic() + 30  # the last acknowledgement on its way back
            while (counts := connection_counts(s))[0] and time.monotonic() < deadline:
                time.sleep(0.001)
            unacked, acked, state = counts
            assert (unacked, acked, state) == (0, 100_000, TCP_ESTABLISHED)


def test_one_look_that_found_all_acknowledged_is_no_proof_before_a_close():
    """uvloop may hold bytes the kernel refused and write them at its next turn: one look
    finding nothing unacknowledged, then a close, is lost without the early mark (a
    review's schedule: a busy loop, every byte in flight acknowledged, the rest written
    after the look, the SAE gone before the next)."""
    w = DeliveryWatch(sndbuf=1000)
    assert w.observe(0, 0, 2950, TCP_ESTABLISHED) == "pending"
    assert w.observe(0, 24, 2950, TCP_CLOSE) == "lost"


@pytest.mark.parametrize(("first_look", "acked", "verdict"), [
    ((0, 100, 2850), 2950, "delivered"),  # the answer's end acknowledged
    ((0, 100, 2850), 2900, "lost"),       # short of it
    ((0, 600, 2350), 2950, "lost"),       # the queue was full: no early mark
    ((7, 100, 2850), 2950, "lost"),       # the TLS layer still held bytes: none either
])
def test_a_close_before_any_look_is_judged_by_the_early_mark(first_look, acked, verdict):
    """The first look in the background can come after curl has read its answer and
    closed. The look taken when the answer was written (nothing buffered, the kernel's
    queue under half full: it holds the whole answer) marks its end: acknowledged,
    delivered; short of it, lost. Without such a look (the queue was full: part of the
    answer may not have reached the kernel yet), lost."""
    w = DeliveryWatch(sndbuf=1000)
    w.first_look(*first_look)
    assert w.observe(0, 24, acked, TCP_CLOSE) == verdict


async def _serve_once(payload: bytes, client) -> bool:
    """Serve one connection that writes ``payload``; ``client(port)`` is the peer."""
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    class Proto(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(payload)

            async def check():
                result.set_result(await delivered(transport, limit_s=20.0))
                transport.close()

            asyncio.get_running_loop().create_task(check())

    server = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer = asyncio.get_running_loop().run_in_executor(None, client, port)
    try:
        return await asyncio.wait_for(result, 60)
    finally:
        await peer
        server.close()


def _reader(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        got = 0
        while got < 4 << 20:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)


def _resetter(port: int) -> None:
    """Never reads (a small receive window fills), then resets the connection."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    # Once the first of the server's 4 MiB has arrived, the rest cannot all be
    # acknowledged: the window is full and nobody reads.
    s.recv(1, socket.MSG_PEEK)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST


def test_an_answer_read_by_the_peer_is_delivered():
    assert asyncio.run(_serve_once(b"k" * (4 << 20), _reader)) is True


def test_an_answer_cut_by_a_reset_is_lost():
    assert asyncio.run(_serve_once(b"k" * (4 << 20), _resetter)) is False
