"""Multipart messages through control.core.zmq_frames: the same messages as pyzmq's own
send_multipart and recv_multipart, whichever side uses which."""

from __future__ import annotations

import pytest
import zmq

from control.core import zmq_frames


@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://frames")
    b.connect("inproc://frames")
    yield a, b
    ctx.destroy(0)


def test_messages_keep_their_frames_and_boundaries(pair):
    a, b = pair
    zmq_frames.send(a, [b"id", b"", b"body"])
    zmq_frames.send(a, [b"one"], zmq_frames.NOBLOCK)
    a.send_multipart([b"x", b"yz"])
    assert b.poll(5000)
    assert zmq_frames.recv(b) == [b"id", b"", b"body"]
    assert b.recv_multipart() == [b"one"]
    frames = zmq_frames.recv(b, copy=False)
    assert [f.bytes for f in frames] == [b"x", b"yz"]
    with pytest.raises(zmq.Again):  # nothing left
        zmq_frames.recv(b, zmq_frames.NOBLOCK)


def test_a_send_that_cannot_go_raises_again_and_sends_nothing():
    ctx = zmq.Context()
    try:
        d = ctx.socket(zmq.DEALER)  # no peer: nowhere to queue a message
        with pytest.raises(zmq.Again):
            zmq_frames.send(d, [b"rid", b"", b"body"], zmq_frames.NOBLOCK)
        r = ctx.socket(zmq.ROUTER)
        r.bind("inproc://later")
        d.connect("inproc://later")
        zmq_frames.send(d, [b"next"])
        assert r.poll(5000)
        assert r.recv_multipart()[1:] == [b"next"]  # not a tail of the refused one
    finally:
        ctx.destroy(0)
