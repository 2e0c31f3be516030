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
from control import gkm_client, paths
from control.keystore import StoreError


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
