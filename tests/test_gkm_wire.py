"""Relay messages between global key managers (pure): layout, and every refusal."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.gkm.wire import (
    Ack,
    AckStatus,
    Blocks,
    RelayWireError,
    encode_ack,
    encode_blocks,
    parse,
    receive_status,
)
from dataplane.limits import MAX_GLOBAL_BLOCK, MAX_RELAY_BLOCKS


def frames(msg) -> list[bytes]:
    return [bytes(f) for f in (encode_blocks(msg) if isinstance(msg, Blocks)
                               else encode_ack(msg))]


def test_blocks_round_trip_keep_numbers_sizes_and_bytes():
    msg = Blocks(1, 3, ((5, b"a" * 32), (6, b"b" * 100), (9, b"c" * 4096)))
    got = parse(frames(msg))
    assert isinstance(got, Blocks)
    assert (got.origin, got.destination) == (1, 3)
    assert [(s, bytes(d)) for s, d in got.blocks] == [(s, d) for s, d in msg.blocks]


def test_ack_round_trip():
    msg = Ack(2, 7, ((1, AckStatus.STORED), (2, AckStatus.DUPLICATE),
                     (3, AckStatus.CONFLICT), (4, AckStatus.REFUSED)))
    assert parse(frames(msg)) == msg


@given(st.lists(st.binary(min_size=32, max_size=300), min_size=1, max_size=20),
       st.integers(0, 1000))
def test_any_batch_round_trips(datas, first):
    msg = Blocks(9, 4, tuple((first + 2 * i, d) for i, d in enumerate(datas)))
    got = parse(frames(msg))
    assert [(s, bytes(d)) for s, d in got.blocks] == list(msg.blocks)


@pytest.mark.parametrize("blocks, why", [
    ((), "1 to"),
    (((3, b"x" * 32), (3, b"y" * 32)), "ascend"),
    (((4, b"x" * 32), (3, b"y" * 32)), "ascend"),
    (((1, b"x" * 31),), "size 31"),
    (((1 << 40, b"x" * 32),), "ascend"),
])
def test_encoder_refuses_what_a_parser_would(blocks, why):
    with pytest.raises(RelayWireError, match=why):
        encode_blocks(Blocks(1, 2, blocks))


def test_encoder_refuses_node_id_zero():
    with pytest.raises(RelayWireError, match="origin node id 0"):
        encode_blocks(Blocks(0, 2, ((1, b"x" * 32),)))


def good() -> list[bytes]:
    return frames(Blocks(1, 2, ((7, b"k" * 64), (8, b"l" * 64))))


@pytest.mark.parametrize("mutate, why", [
    (lambda f: [], "shorter than its header"),
    (lambda f: [f[0][:10], *f[1:]], "shorter than its header"),
    (lambda f: [b"XXXX" + f[0][4:], *f[1:]], "bad magic"),
    (lambda f: [f[0][:4] + b"\x02" + f[0][5:], *f[1:]], "version 2"),
    (lambda f: [f[0][:5] + b"\x09" + f[0][6:], *f[1:]], "unknown relay message type 9"),
    (lambda f: [f[0][:6] + b"\x00\x00" + f[0][8:], *f[1:]], "node id 0"),
    (lambda f: [f[0], f[1]], "has 3 frames, got 2"),
    (lambda f: [*f, b"x" * 64], "has 3 frames, got 4"),
    (lambda f: [f[0], f[1][:-1], f[2]], "block 7 is 63 B"),
    (lambda f: [f[0], f[1], f[2] + b"x"], "block 8 is 65 B"),
    (lambda f: [f[0][:-1], *f[1:]], "index of 23 B"),
    (lambda f: [f[0][:10] + struct.pack(">I", 3) + f[0][14:], *f[1:]], "for 3 blocks"),
])
def test_parser_refuses_malformed_blocks_whole(mutate, why):
    with pytest.raises(RelayWireError, match=why):
        parse(mutate(good()))


def test_parser_refuses_bad_acks():
    f = frames(Ack(1, 2, ((1, AckStatus.STORED),)))[0]
    with pytest.raises(RelayWireError, match="unknown ACK status 7"):
        parse([f[:-1] + b"\x07"])
    with pytest.raises(RelayWireError, match="ACK has 1 frame"):
        parse([f, b""])
    with pytest.raises(RelayWireError, match="ACK of 9 B for 0 results"):
        parse([f[:10] + struct.pack(">I", 0) + f[14:]])


def test_limits_on_count_and_size():
    many = tuple((i, b"x" * 32) for i in range(MAX_RELAY_BLOCKS + 1))
    with pytest.raises(RelayWireError, match="carries 1 to"):
        encode_blocks(Blocks(1, 2, many))
    with pytest.raises(RelayWireError, match="outside"):
        encode_blocks(Blocks(1, 2, ((1, bytes(MAX_GLOBAL_BLOCK + 1)),)))
    # One block of the largest size travels alone.
    assert len(parse(frames(Blocks(1, 2, ((1, bytes(MAX_GLOBAL_BLOCK)),)))).blocks) == 1


def test_receive_status_is_idempotent_by_bytes():
    assert receive_status(None, b"abc") == AckStatus.STORED
    assert receive_status(b"abc", memoryview(b"abc")) == AckStatus.DUPLICATE
    assert receive_status(b"abc", b"abd") == AckStatus.CONFLICT


def test_reserve_round_trip_and_refusals():
    import os

    from control.gkm.wire import Reserve, Reserved, ReserveStatus, encode_reserve, encode_reserved

    m = Reserve(1, 2, 7, (3, 64), ("sae-a", "b"), (os.urandom(16), os.urandom(16)))
    assert parse(encode_reserve(m)) == m  # no master: any
    named = Reserve(1, 2, 7, (3, 64), ("sae-b",), m.key_ids, master="sae-m")
    assert parse(encode_reserve(named)) == named
    r = Reserved(1, 2, 7, ReserveStatus.GAP)
    assert parse(encode_reserved(r)) == r
    f = encode_reserve(m)[0]
    with pytest.raises(RelayWireError, match="31 B of key IDs for 2 keys"):
        parse([f[:-1]])
    with pytest.raises(RelayWireError, match="runs past"):
        parse([f[:14 + 21 + 5]])
    with pytest.raises(RelayWireError, match="1 frame"):
        parse([f, b""])
    with pytest.raises(RelayWireError, match="at most 254 SAEs"):
        encode_reserve(Reserve(1, 2, 7, (0, 0), ("s",) * 255, ()))
    only_master = f[:14] + f[14:14 + 20] + b"\x01\x01*" + f[-32:]
    with pytest.raises(RelayWireError, match="no slave SAE"):
        parse([only_master])
    cancel = Reserve(1, 2, 8, (3, 64), (), m.key_ids)  # no SAEs: a cancellation
    assert parse(encode_reserve(cancel)) == cancel
    confirm = Reserve(1, 2, 9, (3, 64), (), m.key_ids, confirm=True)
    assert parse(encode_reserve(confirm)) == confirm and confirm != cancel
    with pytest.raises(RelayWireError, match="a confirmation names no SAE"):
        encode_reserve(Reserve(1, 2, 9, (3, 64), ("b",), m.key_ids, confirm=True))
    # Any name travels (the store refuses one that is not an SAE ID as REFUSED, so the
    # pair's later reservations go on: test_gkm_destination).
    named_eq = Reserve(1, 2, 9, (3, 64), ("b",), m.key_ids, master="=")
    assert parse(encode_reserve(named_eq)) == named_eq
    with pytest.raises(RelayWireError, match="unknown RESERVED status 9"):
        parse([encode_reserved(r)[0][:-1] + b"\x09"])


def test_reservations_travel_several_to_a_message_and_are_refused_whole():
    import os

    from control.gkm.wire import (
        MAX_RESERVE_BATCH,
        Reserve,
        Reserved,
        ReserveStatus,
        encode_reserve,
        encode_reserved,
        parse_batch,
    )

    rs = [Reserve(1, 2, n, (3, 64 * n), ("sae-b",), (os.urandom(16),), master="sae-a")
          for n in range(5, 8)]
    assert parse_batch([encode_reserve(r)[0] for r in rs]) == rs
    answers = [Reserved(1, 2, n, ReserveStatus.APPLIED) for n in range(5, 8)]
    assert parse_batch([encode_reserved(a)[0] for a in answers]) == answers
    one = Blocks(1, 3, ((5, b"a" * 32), (6, b"b" * 64)))  # many frames, one message
    assert parse_batch(frames(one)) == [one]
    assert parse_batch([encode_reserve(rs[0])[0]]) == [rs[0]]
    with pytest.raises(RelayWireError, match="mixed"):
        parse_batch([encode_reserve(rs[0])[0], encode_reserved(answers[0])[0]])
    with pytest.raises(RelayWireError, match="runs past|key IDs"):  # one bad frame: all
        parse_batch([encode_reserve(rs[0])[0], encode_reserve(rs[1])[0][:-3]])
    with pytest.raises(RelayWireError, match="at most"):
        parse_batch([encode_reserve(rs[0])[0]] * (MAX_RESERVE_BATCH + 1))
