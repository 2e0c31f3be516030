"""Forged relay messages (issue 16, item 1), against real node processes in namespaces: a
process that sends from a node's own address, and a process in a node's namespace that
takes over the relay port, are not that node's key manager and gain nothing. Every
relay connection is CurveZMQ: the destination admits an origin by its key
(``control.gkm.relay_auth``), the origin talks only to a server holding the destination's."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import zmq

from control.core import paths
from control.gkm.carving import MAX_SEQ, KeySlice
from control.gkm.client import GkmClient
from control.gkm.relay_keys import public_path
from control.gkm.store import StoreError
from control.gkm.wire import (
    Ack,
    AckStatus,
    Blocks,
    Reserve,
    Reserved,
    ReserveStatus,
    encode_ack,
    encode_blocks,
    encode_reserve,
    encode_reserved,
    parse_batch,
)
from tests.nsutil import InNetns, run_in_netns, wait_until
from tests.test_gkm import assert_same_blocks, client_call, enc, full, gkm_state, make_net

pytestmark = pytest.mark.netns
MIB = 1 << 20
GKM_TWO = """block_size = "256KiB"
low_watermark = "4MiB"
high_watermark = "8MiB"
window = "2MiB"
pairs = [["A", "B"]]"""


# ---- run inside a node's namespace ------------------------------------------------------------

def _forge(src: str, dst: str, port: int, server_key: bytes,
           messages: list[list[bytes]], seconds: float) -> int:
    """Send every message from ``src`` to the relay at ``dst``: once without CURVE and
    once with CURVE under a key of the forger's own (it knows the server's public key).
    Returns how many answers came back."""
    ctx = zmq.Context()
    answers = 0
    try:
        socks = []
        for curve in (False, True):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if curve:
                s.curve_serverkey = server_key
                s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
            s.connect(f"tcp://{src}:0;{dst}:{port}")
            socks.append(s)
        # A DEALER with no live pipe blocks in send (the relay drops both handshakes and
        # the pipe comes and goes with each reconnect): send without blocking, for a while.
        end = time.monotonic() + seconds
        for s in socks:
            for m in messages:
                while True:
                    try:
                        s.send_multipart(m, flags=zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        if time.monotonic() > end:
                            break
                        time.sleep(0.01)
        while time.monotonic() < end:
            for s in socks:
                while s.poll(0):
                    s.recv_multipart()
                    answers += 1
            time.sleep(0.05)
    finally:
        ctx.destroy(0)
    return answers


def _impostor(addr: str, port: int, seconds: float) -> int:
    """Take over a destination's relay port and answer as its key manager would: every
    block STORED, every reservation APPLIED. Returns how many messages it answered."""
    ctx = zmq.Context()
    answered = 0
    try:
        r = ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + 30
        while True:
            try:
                r.bind(f"tcp://{addr}:{port}")
                break
            except zmq.ZMQError:  # the killed key manager's socket is not gone yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not r.poll(50):
                continue
            frames = r.recv_multipart()
            try:
                msgs = parse_batch(frames[1:])
            except ValueError:
                continue
            if isinstance(msgs[0], Reserve):
                r.send_multipart([frames[0], *(encode_reserved(Reserved(
                    m.origin, m.destination, m.rseq, ReserveStatus.APPLIED))[0]
                    for m in msgs)])
            elif isinstance(msgs[0], Blocks):
                m = msgs[0]
                r.send_multipart([frames[0], *encode_ack(Ack(m.origin, m.destination, tuple(
                    (seq, AckStatus.STORED) for seq, _ in m.blocks)))])
            answered += 1
    finally:
        ctx.destroy(0)
    return answered


# ---- helpers on the test side ----------------------------------------------------------------

def _summary(prefix: str, node: str, timeout_s: float = 10.0) -> dict:
    c = GkmClient(prefix, node, timeout_s=timeout_s)
    try:
        return c.summary()
    finally:
        c.close()


def _next_key(topo, cursor: list[int], size: int) -> KeySlice:
    """The key A's next take of one key of ``size`` cuts (its cursor's block has room)."""
    seq, offset = cursor
    if offset + size > topo.gkm.block_size:
        seq, offset = seq + 1, 0
    return KeySlice(topo.node("A").id, topo.node("B").id, seq, offset, size)


def _refilled(prefix: str) -> bool:
    """A's store for B at the high watermark with nothing pending, asked live (the status
    file may still show the moment before a take)."""
    st = _summary(prefix, "A")["peers"]["B"]["enc"]
    return st["usable"] == 8 * MIB and st["pending"] == 0


def _drain_and_refill(prefix: str) -> None:
    """Take most of A's key for B so that A restocks: new blocks cross the relay."""
    client_call(prefix, "A", "take_enc", "B", 24, 256 << 10)


# ---- a process with A's address forges A's messages to B -------------------------------------

def test_forged_messages_from_a_nodes_own_address_change_nothing(tmp_path, prefix):
    topo, _ = make_net(tmp_path, prefix, GKM_TWO, two=True)
    wait_until(lambda: full(prefix, [("A", "B"), ("B", "A")], 8 * MIB), 90, "the first fill")
    a_id, b_id = topo.node("A").id, topo.node("B").id
    a_addr, b_addr = str(topo.node("A").address), str(topo.node("B").address)
    before_b = client_call(prefix, "B", "digests", "dec", "A")
    b_dec = _summary(prefix, "B")["peers"]["A"]["dec"]
    a_enc = _summary(prefix, "A")["peers"]["B"]["enc"]
    next_key = _next_key(topo, a_enc["cursor"], 32)
    rseq = b_dec["reservations_applied"]
    forged = [
        # Reserve A's next (predictable) key for an SAE of the forger's choice.
        encode_reserve(Reserve(a_id, b_id, rseq, (next_key.seq, next_key.offset + 32),
                               ("evil",), (next_key.key_id.bytes,), "evil-master")),
        # Plant other bytes under the next block numbers, so A's genuine blocks CONFLICT.
        encode_blocks(Blocks(a_id, b_id, tuple((a_enc["next_block"] + i, os.urandom(256 << 10))
                                               for i in range(4)))),
        encode_blocks(Blocks(a_id, b_id, ((MAX_SEQ, os.urandom(256 << 10)),))),
        # Answers where only requests belong.
        encode_ack(Ack(b_id, a_id, ((0, AckStatus.CONFLICT),))),
        encode_reserved(Reserved(b_id, a_id, 0, ReserveStatus.APPLIED)),
        # Push the reservation cursor to the end of the numbers: the receiver would walk
        # every number it passes.
        encode_reserve(Reserve(a_id, b_id, rseq + 1, (MAX_SEQ, 0), ("evil",), ())),
        # A frame far above any relay message.
        [b"QKGK", bytes(32 * MIB)],
    ]
    server_key = public_path(topo.gkm.keys, "B").read_bytes().split(b'public-key = "')[1][:40]
    run_in_netns(paths.netns_name(prefix, "A"), _forge, a_addr, b_addr, topo.ports.relay,
                 server_key, [list(m) for m in forged], 4.0, timeout=60)
    # No CPU spin: B's key manager answers at once.
    start = time.monotonic()
    try:
        summary = _summary(prefix, "B", timeout_s=5.0)
    except StoreError as e:
        raise AssertionError(f"B's key manager no longer answers: {e}") from None
    assert time.monotonic() - start < 5.0
    # Nothing moved at B: no block stored, no reservation applied, the cursor where it was.
    dec = summary["peers"]["A"]["dec"]
    assert client_call(prefix, "B", "digests", "dec", "A") == before_b
    assert dec["reservations_applied"] == rseq and dec["reserved_keys"] == 0
    assert dec["reserve_cursor"] == b_dec["reserve_cursor"]
    assert summary["refused_connections"] >= 1  # the forger with a key of its own
    assert "relay connection refused" in (paths.log_dir(prefix) / "node-B.log").read_text()
    # Genuine traffic goes on: the slave's SAE gets the key the forger tried to reserve...
    keys = client_call(prefix, "A", "take_enc_for", "B", 1, 32, ["sae-b"])
    assert keys[0][0] == str(next_key.key_id)
    assert client_call(prefix, "B", "take_dec", "A", [keys[0][0]], "sae-b") == [keys[0][1]]
    # ... and new blocks are stored under their numbers, none of them in CONFLICT.
    _drain_and_refill(prefix)
    wait_until(lambda: _refilled(prefix), 90, "A's store for B refilled")
    live = _summary(prefix, "A")["peers"]["B"]
    assert live["enc"]["conflicts"] == 0 and live["relay"]["conflicts"] == 0
    assert_same_blocks(prefix, "A", "B")


# ---- a process in B's namespace takes over B's relay port --------------------------------------

def test_an_impostor_on_the_destinations_port_cannot_confirm_anything(tmp_path, prefix):
    topo, man = make_net(tmp_path, prefix, GKM_TWO, two=True)
    wait_until(lambda: full(prefix, [("A", "B"), ("B", "A")], 8 * MIB), 90, "the first fill")
    supervisor = man.pids["node:B"]
    gkm_b = gkm_state(prefix, "B")["pid"]
    usable = enc(prefix, "A", "B")["enc"]["usable"]
    impostor = None
    os.kill(supervisor, signal.SIGSTOP)  # so that B's key manager stays down a while
    try:
        os.kill(gkm_b, signal.SIGKILL)
        impostor = InNetns(paths.netns_name(prefix, "B"), _impostor,
                           str(topo.node("B").address), topo.ports.relay, 14.0)
        # A reservation for B's SAE: only B's key manager may confirm it.
        with pytest.raises(StoreError, match="did not confirm the reservation") as e:
            client_call(prefix, "A", "take_enc_for", "B", 1, 32, ["sae-b"])
        assert e.value.kind == "unreachable"
        # New blocks: only B's key manager may acknowledge them.
        _drain_and_refill(prefix)
        wait_until(lambda: enc(prefix, "A", "B")["enc"]["pending"] > 0, 30,
                   "A to send new blocks")
        answered = impostor.result(60)  # it listened and answered for 14 s
        impostor = None
        st = enc(prefix, "A", "B")
        assert answered == 0, "the impostor received relay messages"
        assert st["enc"]["usable"] < usable - 24 * (256 << 10), \
            "blocks acknowledged by the impostor became usable"
        assert st["relay"]["last_error"].startswith("no authenticated connection to B")
    finally:
        if impostor is not None:
            impostor.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGCONT)
    # B's key manager is back (its supervisor restarts it): every block usable at A is at
    # B with the same bytes, and the reservation A gave up on is cancelled there.
    wait_until(lambda: (gkm_state(prefix, "B") or {}).get("pid") not in (None, gkm_b), 60,
               "B's key manager restarted")
    wait_until(lambda: _refilled(prefix), 90, "A's store for B refilled")
    assert_same_blocks(prefix, "A", "B")
    wait_until(lambda: _summary(prefix, "A")["peers"]["B"]["enc"]["unacked_reservations"]
               == 0, 30, "the reservation and its cancellation to reach B")
    assert _summary(prefix, "B")["peers"]["A"]["dec"]["reserved_keys"] == 0
