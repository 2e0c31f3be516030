"""Multipath relay's pure parts: XOR shares (control/gkm/shares.py), the SHARES message
(control/gkm/wire.py), the destination combining shares into blocks it stores and only
then acknowledges (control/gkm/destination.py, a real KeyStore in a tmp dir), the
config's share addresses and the origin's paths policy."""

from __future__ import annotations

import ipaddress
import os

import pytest

from bench.topology import network, render, triangle
from control.core.config import ConfigError, parse_topology, share_addresses
from control.gkm.destination import Arrived, Inbox, Node
from control.gkm.shares import SET_OVERHEAD, ShareBuffer, split, xor
from control.gkm.store import KeyStore
from control.gkm.wire import (
    Ack,
    AckStatus,
    Blocks,
    RelayWireError,
    Shares,
    encode_blocks,
    encode_shares,
    parse,
)

A, B = 1, 2
NODES = {A: Node("A", "10.0.0.1"), B: Node("B", "10.0.0.2")}
FROM_A = ("A", "10.0.0.1")


# ---- shares -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shares_xor_to_the_block_and_each_send_draws_new_ones(n):
    blocks = [os.urandom(64), os.urandom(32)]
    first, second = split(blocks, n), split(blocks, n)
    assert len(first) == n and all(len(part) == 2 for part in first)
    for j, b in enumerate(blocks):
        assert xor([first[i][j] for i in range(n)]) == b
        assert xor([second[i][j] for i in range(n)]) == b
        if n > 1:  # no share is the block, and a new send's shares differ
            assert all(bytes(first[i][j]) != b for i in range(n))
            assert bytes(first[0][j]) != bytes(second[0][j])


def test_fewer_than_all_shares_say_nothing_of_the_block():
    """Any n-1 shares are the random pads or a pad XOR the block: with the pads drawn
    as given, two different blocks give the same n-1 shares."""
    pads = iter([b"\x5a" * 16, b"\xa5" * 16] * 2)
    one = split([b"\x00" * 16], 3, draw=lambda k: next(pads))
    two = split([b"\xff" * 16], 3, draw=lambda k: next(pads))
    assert [bytes(one[i][0]) for i in (0, 1)] == [bytes(two[i][0]) for i in (0, 1)]
    assert one[2][0] != two[2][0]


def test_the_buffer_combines_the_shares_of_one_send_and_a_newer_send_replaces_it():
    buf = ShareBuffer()
    block = os.urandom(48)
    s1, s2 = split([block], 2), split([block], 2)
    assert buf.add("A", 1, 0, 2, 7, s1[0][0], now=0) is None
    assert buf.held_bytes == SET_OVERHEAD + 48
    assert buf.add("A", 2, 1, 2, 7, s2[1][0], now=0) is None  # a resend: replaces send 1
    assert buf.dropped_sets == 1 and buf.held_bytes == SET_OVERHEAD + 48
    assert buf.add("A", 2, 1, 2, 7, s2[1][0], now=0) is None  # a copy: nothing new
    assert buf.add("A", 2, 0, 2, 7, s2[0][0], now=1) == block
    assert buf.held_bytes == 0 and buf.completed == 1 and buf.sets == {}


def test_a_share_that_disagrees_with_its_send_is_refused_with_its_message():
    buf = ShareBuffer()
    buf.add("A", 1, 0, 2, 1, bytes(40), now=0)
    assert buf.check("A", 1, 3, [(1, bytes(40))]) is not None  # another count
    assert buf.check("A", 1, 2, [(1, bytes(32))]) is not None  # another size
    assert buf.check("A", 2, 3, [(1, bytes(40))]) is None      # another send: fine
    assert buf.check("B", 1, 3, [(1, bytes(40))]) is None      # another origin
    assert buf.refused == 2


def test_the_buffer_is_bounded_per_origin_in_bytes_with_bookkeeping_and_in_time():
    buf = ShareBuffer(hold_s=10, max_bytes=4 * (SET_OVERHEAD + 40), max_sets=3)
    for seq in range(5):  # A: at most 3 partial sets, its oldest go first
        buf.add("A", 9, 0, 2, seq, bytes(40), now=seq)
    assert list(buf.sets["A"]) == [2, 3, 4] and buf.dropped_sets == 2
    buf.add("B", 9, 0, 2, 0, bytes(40), now=5)
    buf.add("B", 9, 0, 2, 1, bytes(40), now=5)  # 5 sets > 4 sets' bytes: the oldest
    assert list(buf.sets["A"]) == [3, 4] and list(buf.sets["B"]) == [0, 1]
    assert buf.held_bytes == 4 * (SET_OVERHEAD + 40)
    assert buf.expire(now=14.5) == 2 and buf.held_bytes == 2 * (SET_OVERHEAD + 40)
    assert buf.expire(now=16) == 2 and buf.held_bytes == 0 and buf.sets == {}


def test_many_tiny_partial_sets_cost_their_bookkeeping():
    """32-byte shares under fresh nonces: bounded by sets per origin, and each set
    counts its bookkeeping, so the byte bound holds for what they really take."""
    buf = ShareBuffer(max_sets=64)
    for seq in range(10_000):
        buf.add("A", seq, 0, 2, seq, bytes(32), now=0)
    assert len(buf.sets["A"]) == 64 and buf.held_bytes == 64 * (SET_OVERHEAD + 32)


# ---- wire -------------------------------------------------------------------------------

def test_shares_round_trip_and_bad_share_numbers_are_refused():
    msg = Shares(A, B, 2**64 - 1, 1, 2, ((3, os.urandom(40)), (4, os.urandom(40))))
    got = parse([bytes(f) for f in encode_shares(msg)])
    assert got == msg
    for index, count in ((2, 2), (0, 0), (0, 5)):
        with pytest.raises(RelayWireError, match="shares"):
            encode_shares(Shares(A, B, 1, index, count, msg.blocks))
    frames = encode_shares(msg)
    head = bytearray(frames[0])
    head[14 + 8] = 9  # share index past the count
    with pytest.raises(RelayWireError, match="share 9 of 2"):
        parse([bytes(head), *frames[1:]])
    with pytest.raises(RelayWireError, match="SHARES of 2 blocks has 3 frames"):
        parse(frames[:2])
    whole = Blocks(A, B, msg.blocks)  # the same blocks as BLOCKS: parsed as such
    assert parse([bytes(f) for f in encode_blocks(whole)]) == whole


# ---- the destination --------------------------------------------------------------------

def _acks(out) -> list[tuple[bytes, list[tuple[int, AckStatus]]]]:
    got = []
    for ident, *frames in out.answers:
        m = parse(frames)
        assert isinstance(m, Ack)
        got.append((ident, list(m.results)))
    return got


def test_the_destination_stores_and_acknowledges_a_block_once_all_its_shares_arrived(
        tmp_path):
    store = KeyStore(tmp_path / "b", B, {}, {"A": A})
    box = Inbox(B, "B", NODES, {"A"}, 8, store)
    blocks = [os.urandom(64), os.urandom(64)]
    parts = split(blocks, 2)
    first = Shares(A, B, 11, 0, 2, tuple(zip((0, 1), parts[0], strict=True)))
    out = box.receive([Arrived(b"p0", [first], FROM_A)], now=0)
    assert out.answers == [] and store.block("dec", "A", 0) is None  # not acknowledged
    second = Shares(A, B, 11, 1, 2, ((1, parts[1][1]),))  # block 1's other share only
    out = box.receive([Arrived(b"p1", [second], FROM_A)], now=1)
    assert _acks(out) == [(b"p1", [(1, AckStatus.STORED)])]
    assert store.block("dec", "A", 1) == blocks[1] and store.block("dec", "A", 0) is None
    # A resend after a lost ACK: new shares, the same block: DUPLICATE, on its connection.
    again = split([blocks[1]], 2)
    box.receive([Arrived(b"p0", [Shares(A, B, 12, 0, 2, ((1, again[0][0]),))], FROM_A)], 2)
    out = box.receive([Arrived(b"p1", [Shares(A, B, 12, 1, 2, ((1, again[1][0]),))],
                               FROM_A)], 2)
    assert _acks(out) == [(b"p1", [(1, AckStatus.DUPLICATE)])]
    assert box.received_blocks == 1 and box.shares.completed == 2
    store.close()


def test_shares_from_a_node_other_than_the_one_proven_are_refused(tmp_path):
    store = KeyStore(tmp_path / "b", B, {}, {"A": A})
    box = Inbox(B, "B", NODES, {"A"}, 8, store)
    msg = Shares(A, B, 1, 0, 1, ((0, os.urandom(32)),))
    out = box.receive([Arrived(b"x", [msg], ("A", "10.0.0.9"))], now=0)
    assert out.answers == [] and out.refusals and store.block("dec", "A", 0) is None
    store.close()


# ---- config and policy ------------------------------------------------------------------

def tri(paths: int, policy: str | None = None, node_net: str = "10.88.0.0/28") -> str:
    """The triangle A, B, C with global key between A and C over ``paths`` paths."""
    gkm = {"pairs": [["A", "C"]], "paths": paths} | ({"paths_policy": policy} if policy else {})
    return render(network("g", "gt"), {"network": {"node_net": node_net}, "gkm": gkm},
                  triangle(201))


def test_share_addresses_one_per_link_of_the_origin_from_the_top_of_node_net():
    topo = parse_topology(tri(2))
    assert topo.gkm.paths == 2 and topo.gkm.paths_policy == "wait"
    got = topo.gkm.share_addresses
    ip = ipaddress.IPv4Address
    assert got == {("A", "C"): {"A-B": ip("10.88.0.14"), "A-C": ip("10.88.0.13")},
                   ("C", "A"): {"B-C": ip("10.88.0.12"), "A-C": ip("10.88.0.11")}}
    assert topo.gkm.addresses_at("A") == list(got[("C", "A")].values())
    assert not {a for addrs in got.values() for a in addrs.values()} & \
        {n.address for n in topo.nodes.values()}
    assert share_addresses(ipaddress.IPv4Network("10.88.0.0/28"), (("A", "C"),), 2,
                           {ip("10.88.0.14")}, {"A": ["A-B"]}) == \
        {("A", "C"): {"A-B": ip("10.88.0.13")}}
    assert parse_topology(tri(1)).gkm.share_addresses == {}


def test_paths_and_their_policy_are_checked():
    with pytest.raises(ConfigError, match="gkm.paths"):
        parse_topology(tri(5))
    with pytest.raises(ConfigError, match="paths_policy"):
        parse_topology(tri(2, "sometimes"))
    with pytest.raises(ConfigError, match="too small"):  # 3 nodes + 2 pairs x 2 links > 6
        parse_topology(tri(2, node_net="10.88.0.0/29"))
    parse_topology(tri(4))  # 3 + 4 <= 14


@pytest.mark.parametrize(("wanted", "policy", "up", "using"), [
    (1, "wait", 0, 1), (2, "wait", 2, 2), (2, "wait", 3, 2), (2, "wait", 1, 0),
    (2, "fewer", 1, 1), (2, "fewer", 0, 0), (3, "fewer", 2, 2)])
def test_how_many_shares_a_send_uses(wanted, policy, up, using):
    from control.gkm.manager import OutboundPair

    topo = parse_topology(tri(max(2, wanted), policy))
    d = OutboundPair("C", 3, "10.88.0.3", topo.gkm, ("A", "C"))
    d.wanted, d.share_paths = wanted, [[("A-C", "A")]] * up
    assert d.shares_now() == using
    assert d.addresses == [str(a) for a in topo.gkm.share_addresses[("A", "C")].values()]
    assert d.slot == {"A-B": 0, "A-C": 1}


def test_shares_of_the_wrong_size_or_disagreeing_are_refused_whole(tmp_path):
    store = KeyStore(tmp_path / "b", B, {}, {"A": A})
    box = Inbox(B, "B", NODES, {"A"}, 8, store, block_size=64)
    out = box.receive([Arrived(b"x", [Shares(A, B, 1, 0, 2, ((0, os.urandom(32)),))],
                               FROM_A)], now=0)
    assert out.answers == [] and "64 B" in out.refusals[0]
    first = Shares(A, B, 1, 0, 2, ((0, os.urandom(64)), (1, os.urandom(64))))
    box.receive([Arrived(b"x", [first], FROM_A)], now=0)
    bad = Shares(A, B, 1, 1, 3, ((0, os.urandom(64)), (1, os.urandom(64))))
    out = box.receive([Arrived(b"x", [bad], FROM_A)], now=0)
    assert out.answers == [] and "refused" in out.refusals[0]
    assert box.shares.summary()["partial_sets"] == 2  # the first send's shares stay
    store.close()
