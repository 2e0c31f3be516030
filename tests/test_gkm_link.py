"""The key API's line to its key manager (api/gkm_link.py) when the manager is late: every
take carries its deadline, and the keys of an answer that comes after the link gave up
are sent back to be cancelled. The manager here is a ZeroMQ ROUTER on the same Unix
socket, answering as late as the test wants."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import pytest
import zmq

from api.gkm_link import GkmLink
from control.core import paths
from control.gkm import client as gkm_client
from control.gkm.store import StoreError


@pytest.fixture
def manager():
    prefix = "t" + uuid.uuid4().hex[:7]
    path = gkm_client.socket_path(prefix, "A")
    path.parent.mkdir(parents=True)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{path}")
    yield prefix, sock
    ctx.destroy(0)
    shutil.rmtree(paths.network_dir(prefix), ignore_errors=True)


def test_a_late_answer_to_a_take_has_its_keys_cancelled(manager):
    prefix, sock = manager
    ids = [str(uuid.uuid4()), str(uuid.uuid4())]

    async def run() -> tuple[float, dict]:
        link = GkmLink(prefix, "A", timeout_s=1.0)
        link.start()
        try:
            sent = time.monotonic()
            with pytest.raises(StoreError, match="did not answer within 1 s; nothing was "
                                                 "taken") as e:
                await link.take_enc_for("B", 2, 32, ["b1"], "a1")
            assert e.value.kind == "busy"
            frames = sock.recv_multipart(zmq.NOBLOCK)  # the request, read late
            req = json.loads(frames[-1])
            assert req["op"] == "take_enc" and sent < req["deadline"] < sent + 1.0
            sock.send_multipart([*frames[:-1], json.dumps(
                {"ok": True, "key_ids": ids, "rseq": 0}).encode(), bytes(64)])
            for _ in range(100):  # the link reads the answer and gives the keys back
                if sock.poll(0):
                    break
                await asyncio.sleep(0.05)
            cancel = json.loads(sock.recv_multipart(zmq.NOBLOCK)[-1])
            return req["deadline"] - sent, cancel
        finally:
            await link.close()

    _, cancel = asyncio.run(run())
    assert cancel == {"op": "cancel", "peer": "B", "key_ids": ids}


def test_an_answer_in_time_is_kept_and_nothing_is_given_back(manager):
    prefix, sock = manager

    async def run() -> list:
        link = GkmLink(prefix, "A", timeout_s=5.0)
        link.start()
        try:
            task = asyncio.ensure_future(link.take_enc_for("B", 1, 4, ["b1"], "a1"))
            for _ in range(100):
                if sock.poll(0):
                    break
                await asyncio.sleep(0.02)
            frames = sock.recv_multipart()
            sock.send_multipart([*frames[:-1], json.dumps(
                {"ok": True, "key_ids": ["k"], "rseq": 0}).encode(), b"abcd"])
            ids, keys = await task
            await asyncio.sleep(0.2)
            assert not sock.poll(0)  # no cancel
            return [ids, [bytes(k) for k in keys]]
        finally:
            await link.close()

    assert asyncio.run(run()) == [["k"], [b"abcd"]]


def _rebind(ctx: zmq.Context, old: zmq.Socket, prefix: str) -> zmq.Socket:
    """The manager's process gone and another in its place: a new socket on the path."""
    old.close(0)
    path = gkm_client.socket_path(prefix, "A")
    path.unlink(missing_ok=True)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"ipc://{path}")
    return sock


def _recv(sock: zmq.Socket, timeout_s: float = 30.0) -> list[bytes]:
    assert sock.poll(int(timeout_s * 1000)), "no request came"
    return sock.recv_multipart()


def test_a_manager_gone_mid_request_gets_dec_takes_again_and_refuses_enc_takes(manager):
    """When the manager's process goes away, what waits on it does not wait out the
    timeout: a dec take is sent again, unchanged (the same holder: the same handing), to
    the manager that replaces it; an enc take is refused at once, nothing taken."""
    prefix, sock = manager
    ctx = zmq.Context()

    async def run() -> None:
        nonlocal sock
        link = GkmLink(prefix, "A", timeout_s=60.0)
        link.start()
        try:
            dec = asyncio.ensure_future(link.take_dec("B", ["k1"], "b1", "a1"))
            enc = asyncio.ensure_future(link.take_enc_for("B", 1, 4, ["b1"], "a1"))
            got = [await asyncio.to_thread(_recv, sock) for _ in range(2)]
            first = {json.loads(f[-1])["op"]: f for f in got}
            t0 = time.monotonic()
            sock = _rebind(ctx, sock, prefix)
            with pytest.raises(StoreError, match="restarted while serving") as e:
                await enc
            assert e.value.kind == "busy" and time.monotonic() - t0 < 30
            again = await asyncio.to_thread(_recv, sock)
            assert again[-1] == first["take_dec"][-1] and again[-3] == first["take_dec"][-3]
            req = json.loads(again[-1])
            assert req["holder"][0] == link.identity > 0
            sock.send_multipart([*again[:-1], json.dumps({"ok": True, "sizes": [4]}).encode(),
                                 b"abcd"])
            keys, token = await dec
            assert [bytes(k) for k in keys] == [b"abcd"] and token == req["holder"][1]
            # No answer was sent for it: the take is reported lost, in the background.
            link.settle("B", ["k1"], "b1", token, None)
            word = json.loads((await asyncio.to_thread(_recv, sock))[-1])
            assert word == {"op": "answered", "peer": "B", "key_ids": ["k1"], "sae": "b1",
                            "holder": [link.identity, token], "written": False}
        finally:
            await link.close()

    try:
        asyncio.run(run())
    finally:
        sock.close(0)
        ctx.destroy(0)


def _dropped_take(prefix: str, sock: zmq.Socket, answer_first: bool) -> None:
    """A take whose request is dropped (its handler cancelled) before its answer comes,
    or (``answer_first``) once the answer has been read but before the handler resumed;
    the link must then send the manager a cancellation of the take's keys."""
    ids = [str(uuid.uuid4())]

    def answer(frames: list[bytes]) -> None:
        sock.send_multipart([*frames[:-1], json.dumps(
            {"ok": True, "key_ids": ids, "rseq": 0}).encode(), bytes(32)])

    async def run() -> dict:
        link = GkmLink(prefix, "A", timeout_s=60.0)
        link.start()
        try:
            task = asyncio.ensure_future(link.take_enc_for("B", 1, 32, ["b1"], "a1"))
            frames = await asyncio.to_thread(_recv, sock)
            if answer_first:
                answer(frames)
                deadline = time.monotonic() + 30
                while link.waiting and time.monotonic() < deadline:  # read it without
                    link._drain()  # letting the handler run
                    time.sleep(0.01)
                assert not link.waiting, "the answer never came"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            if not answer_first:
                answer(frames)
            return json.loads((await asyncio.to_thread(_recv, sock))[-1])
        finally:
            await link.close()

    assert asyncio.run(run()) == {"op": "cancel", "peer": "B", "key_ids": ids}


def test_a_take_whose_request_is_dropped_has_its_late_keys_cancelled(manager):
    """The SAE's request went away (its handler cancelled) while the take waited: the
    answer's keys, when it comes, go to no one, so they are cancelled at the slave's node."""
    _dropped_take(*manager, answer_first=False)


def test_a_take_answered_but_dropped_before_its_handler_ran_has_its_keys_cancelled(manager):
    """The answer arrived, but the request was dropped before its handler resumed to
    send it: those keys go to no one either, and are cancelled at once."""
    _dropped_take(*manager, answer_first=True)
