"""Tests of the OTP tunnel wire format (dataplane/wire.py) and its Poly1305 (dataplane/poly1305.py).

Pure: numpy buffers only. Tags are checked independently with `cryptography`'s Poly1305,
the layout against the module docstring's table.
"""

from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import poly1305, wire
from dataplane.ring import CONTROL_LANE, MAX_LANES

LINK, DIRECTION, LANE, POS, RELEASE = 7, 1, 3, 1_000_000, 999_000
SLACK = 64  # receive buffers are larger than the datagram (as in the worker)


def rand_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def random_pad(length: int, seed: int = 1) -> np.ndarray:
    pad = rand_bytes(wire.pad_len(length), seed)
    pad[0] |= 1  # never an all-zero MAC key, whatever the generator gives
    return pad


def payload_of(length: int, seed: int = 2) -> np.ndarray:
    return rand_bytes(length, seed)


def make_buf(payload: np.ndarray, size: int | None = None) -> np.ndarray:
    size = wire.datagram_len(len(payload)) + SLACK if size is None else size
    buf = np.full(size, 0xEE, dtype=np.uint8)  # garbage where the header and tag go
    buf[wire.HEADER_LEN:wire.HEADER_LEN + len(payload)] = payload
    return buf


def sealed(length: int = 20, *, seed: int = 1, fast: bool = False, lane: int = LANE,
           flags: int = 0, pos: int = POS, release: int = RELEASE,
           payload: np.ndarray | None = None):
    """(buf, n, pad, payload) of a sealed datagram."""
    payload = payload_of(length, seed + 100) if payload is None else payload
    pad = random_pad(length, seed)
    buf = make_buf(payload)
    addrs = (buf.ctypes.data, pad.ctypes.data) if fast else None
    n = wire.seal(buf, length, pad, link=LINK, direction=DIRECTION, lane=lane, pos=pos,
                  release=release, flags=flags, addrs=addrs)
    return buf, n, pad, payload


def independent_tag(key: np.ndarray, data: np.ndarray) -> bytes:
    return Poly1305.generate_tag(bytes(key), bytes(data))


def parse_ok(buf, n) -> wire.Header:
    return wire.parse(buf, n, link=LINK, direction=DIRECTION)


def reason_of_parse(buf, n, *, link: int = LINK, direction: int = DIRECTION) -> str:
    with pytest.raises(wire.WireError) as ei:
        wire.parse(buf, n, link=link, direction=direction)
    return ei.value.reason


# ---- seal / open round trip -----------------------------------------------------------

LENGTHS = [0, 1, 1500, wire.MAX_PAYLOAD]


def test_constants_match_the_documented_layout():
    assert wire.HEADER_LEN == 32
    assert wire.TAG_LEN == 16
    assert wire.OVERHEAD == 48
    assert wire.MAX_PAYLOAD + wire.OVERHEAD == 65507  # the largest UDP/IPv4 payload
    assert wire.pad_len(100) == 132
    assert wire.datagram_len(100) == 148


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_seal_then_open_round_trips(length, fast):
    buf, n, pad, payload = sealed(length, fast=fast)
    assert n == wire.datagram_len(length)
    hdr = parse_ok(buf, n)
    assert hdr == wire.Header(0, DIRECTION, LANE, LINK, POS, RELEASE, length)
    assert hdr.pad_len == 32 + length and not hdr.is_control
    addrs = (buf.ctypes.data, pad.ctypes.data) if fast else None
    out = wire.open_(buf, hdr, pad, addrs=addrs)
    assert len(out) == length
    assert np.array_equal(out, payload)
    # the payload is decrypted in place, in the datagram's buffer
    assert np.array_equal(buf[32:32 + length], payload)


@pytest.mark.parametrize("length", LENGTHS)
def test_fast_and_slow_paths_give_the_same_datagram(length):
    slow, n1, _, _ = sealed(length, fast=False)
    fast, n2, _, _ = sealed(length, fast=True)
    assert n1 == n2
    assert bytes(slow[:n1]) == bytes(fast[:n2])
    # and each path opens what the other sealed
    pad = random_pad(length)
    hdr = parse_ok(slow, n1)
    assert np.array_equal(wire.open_(slow, hdr, pad, addrs=(slow.ctypes.data,
                                                            pad.ctypes.data)),
                          payload_of(length, 101))
    assert np.array_equal(wire.open_(fast, hdr, pad), payload_of(length, 101))


@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_seal_leaves_bytes_after_the_datagram_alone(fast):
    buf, n, _, _ = sealed(100, fast=fast)
    assert n == 148
    assert bytes(buf[n:]) == b"\xee" * SLACK


def test_seal_refuses_too_long_payload_and_wrong_pad():
    buf = np.zeros(wire.MAX_DATAGRAM + 64, dtype=np.uint8)
    with pytest.raises(wire.WireError) as ei:
        wire.seal(buf, wire.MAX_PAYLOAD + 1, random_pad(wire.MAX_PAYLOAD + 1), link=LINK,
                  direction=0, lane=0, pos=0, release=0)
    assert ei.value.reason == "toolong"
    with pytest.raises(ValueError, match="pad"):
        wire.seal(buf, 10, random_pad(11), link=LINK, direction=0, lane=0, pos=0, release=0)
    with pytest.raises(ValueError, match="pad"):
        wire.open_(buf, wire.Header(0, 0, 0, LINK, 0, 0, 10), random_pad(9))


# ---- layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_datagram_layout_matches_the_docstring(fast):
    length = 37
    pos, release = 0x0102030405060708, 0x0102030405060700
    link = 0xA1B2
    payload = payload_of(length)
    pad = random_pad(length)
    buf = make_buf(payload)
    addrs = (buf.ctypes.data, pad.ctypes.data) if fast else None
    n = wire.seal(buf, length, pad, link=link, direction=1, lane=CONTROL_LANE, pos=pos,
                  release=release, flags=wire.FLAG_CONTROL, addrs=addrs)
    assert n == 48 + length
    d = bytes(buf[:n])
    assert d[0] == 1  # version
    assert d[1] == 0x01  # flags: control
    assert d[2] == 1  # direction
    assert d[3] == CONTROL_LANE  # lane
    assert d[4:6] == bytes([0xA1, 0xB2])  # link, big-endian
    assert d[6:8] == b"\0\0"  # reserved
    assert d[8:16] == bytes([1, 2, 3, 4, 5, 6, 7, 8])  # pos, big-endian
    assert d[16:24] == bytes([1, 2, 3, 4, 5, 6, 7, 0])  # release
    assert d[24:28] == bytes([0, 0, 0, 37])  # length
    assert d[28:32] == b"\0\0\0\0"  # reserved
    # body: payload XOR pad[32:]
    assert d[32:32 + length] == bytes(payload ^ pad[32:])
    # tag: Poly1305 over [0, 32+length), keyed with pad[:32]
    assert d[32 + length:] == independent_tag(pad[:32], buf[:32 + length])
    hdr = wire.parse(buf, n, link=link, direction=1)
    assert hdr.is_control and hdr.pos == pos and hdr.release == release


def test_ciphertext_is_payload_xor_pad_and_hides_a_known_pattern():
    pattern = b"ATTACK AT DAWN! "
    length = 1500
    payload = np.frombuffer((pattern * (length // len(pattern) + 1))[:length],
                            dtype=np.uint8).copy()
    buf, n, pad, _ = sealed(length, payload=payload.copy(), seed=5)
    body = buf[32:32 + length]
    assert np.array_equal(body ^ pad[32:], payload)
    datagram = bytes(buf[:n])
    assert pattern not in datagram
    assert pattern[:8] not in datagram


def test_pad_of_zeros_would_leave_the_payload_in_clear():
    """Shows the body is only the XOR (the pad is all that protects it), so that the test
    above is meaningful: with zero pad bytes after the MAC key the pattern is visible."""
    length = 64
    payload = np.frombuffer(b"x" * length, dtype=np.uint8).copy()
    pad = random_pad(length)
    pad[32:] = 0
    buf = make_buf(payload)
    n = wire.seal(buf, length, pad, link=LINK, direction=DIRECTION, lane=LANE, pos=POS,
                  release=RELEASE)
    assert b"x" * length in bytes(buf[:n])


# ---- parse refusals -------------------------------------------------------------------

def header_bytes(*, version=1, flags=0, direction=DIRECTION, lane=LANE, link=LINK, res1=0,
                 pos=POS, release=RELEASE, length=20, res2=0) -> np.ndarray:
    """A datagram with the given header fields (not sealed: parse does not check the tag)."""
    buf = np.zeros(48 + length + SLACK, dtype=np.uint8)
    struct.pack_into(">BBBBHHQQII", buf, 0, version, flags, direction, lane, link, res1,
                     pos, release, length, res2)
    return buf


def test_parse_accepts_a_valid_header_and_bytes():
    buf = header_bytes()
    hdr = parse_ok(buf, 68)
    assert hdr == wire.Header(0, DIRECTION, LANE, LINK, POS, RELEASE, 20)
    assert parse_ok(bytes(buf[:68]), 68) == hdr
    assert parse_ok(header_bytes(release=POS), 68).release == POS  # release == pos is fine
    ctl = parse_ok(header_bytes(flags=wire.FLAG_CONTROL, lane=CONTROL_LANE), 68)
    assert ctl.is_control and ctl.lane == CONTROL_LANE
    assert parse_ok(header_bytes(lane=CONTROL_LANE - 1), 68).lane == CONTROL_LANE - 1
    assert parse_ok(header_bytes(length=0), 48).length == 0


@pytest.mark.parametrize("n", [0, 1, 31, 32, 47])
def test_parse_refuses_short(n):
    assert reason_of_parse(header_bytes(length=0), n) == "short"


@pytest.mark.parametrize("version", [0, 2, 255])
def test_parse_refuses_other_versions(version):
    assert reason_of_parse(header_bytes(version=version), 68) == "version"


@pytest.mark.parametrize("n", [48, 67, 69, 100])
def test_parse_refuses_length_mismatch(n):
    assert reason_of_parse(header_bytes(length=20), n) == "length"


def test_parse_refuses_length_field_beyond_the_datagram():
    buf = header_bytes(length=20)
    struct.pack_into(">I", buf, 24, 0xFFFFFFFF)
    assert reason_of_parse(buf, 68) == "length"


def test_parse_refuses_other_link_and_direction():
    buf = header_bytes()
    assert reason_of_parse(buf, 68, link=LINK + 1) == "link"
    assert reason_of_parse(buf, 68, link=LINK | 0x100) == "link"
    assert reason_of_parse(buf, 68, direction=1 - DIRECTION) == "direction"
    assert reason_of_parse(header_bytes(direction=2), 68) == "direction"


@pytest.mark.parametrize("fields", [
    {"res1": 1}, {"res1": 0x8000}, {"res2": 1}, {"res2": 0x80000000},
    {"flags": 0x02}, {"flags": 0x80}, {"flags": 0x03, "lane": CONTROL_LANE},
    {"release": POS + 1}, {"pos": 0, "release": 1},
], ids=lambda f: ",".join(f"{k}={v:#x}" for k, v in f.items()))
def test_parse_refuses_reserved(fields):
    assert reason_of_parse(header_bytes(**fields), 68) == "reserved"


@pytest.mark.parametrize("fields", [
    {"flags": wire.FLAG_CONTROL, "lane": 0},
    {"flags": wire.FLAG_CONTROL, "lane": CONTROL_LANE - 1},
    {"flags": 0, "lane": CONTROL_LANE},
    {"flags": 0, "lane": MAX_LANES},
    {"flags": 0, "lane": 255},
    {"flags": wire.FLAG_CONTROL, "lane": MAX_LANES},
    {"flags": wire.FLAG_CONTROL, "lane": CONTROL_LANE + 64},
], ids=lambda f: f"flags={f['flags']},lane={f['lane']}")
def test_parse_refuses_lane(fields):
    assert reason_of_parse(header_bytes(**fields), 68) == "lane"


# ---- open_ refusals -------------------------------------------------------------------

def refusal(buf: np.ndarray, n: int, pad: np.ndarray, fast: bool) -> str | None:
    """The reason the datagram is refused (parse, then open_), or None if accepted."""
    try:
        hdr = parse_ok(buf, n)
    except wire.WireError as e:
        return e.reason
    addrs = (buf.ctypes.data, pad.ctypes.data) if fast else None
    try:
        wire.open_(buf, hdr, pad, addrs=addrs)
    except wire.WireError as e:
        return e.reason
    return None


PARSE_REASONS = {"short", "version", "length", "link", "direction", "reserved", "lane"}


@settings(max_examples=300, deadline=None)
@given(length=st.sampled_from([0, 1, 5, 16, 100]), data=st.data(),
       fast=st.booleans(), control=st.booleans())
def test_every_single_bit_flip_is_refused(length, data, fast, control):
    lane, flags = (CONTROL_LANE, wire.FLAG_CONTROL) if control else (LANE, 0)
    buf, n, pad, _ = sealed(length, lane=lane, flags=flags)
    bit = data.draw(st.integers(0, 8 * n - 1), label="bit")
    buf[bit // 8] ^= 1 << (bit % 8)
    before = buf.copy()
    reason = refusal(buf, n, pad, fast)
    assert reason in PARSE_REASONS | {"mac"}, f"bit {bit}: {reason}"
    if bit >= 8 * 32:  # body and tag: framing is intact, only the MAC can tell
        assert reason == "mac"
    assert np.array_equal(buf, before)  # nothing decrypted in place


@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_every_single_bit_flip_is_refused_exhaustively(fast):
    buf0, n, pad, _ = sealed(24)
    assert refusal(buf0.copy(), n, pad, fast) is None  # the untouched datagram is fine
    for bit in range(8 * n):
        buf = buf0.copy()
        buf[bit // 8] ^= 1 << (bit % 8)
        before = buf.copy()
        reason = refusal(buf, n, pad, fast)
        assert reason in PARSE_REASONS | {"mac"}, f"bit {bit}: {reason}"
        assert np.array_equal(buf, before)


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 30])
def test_truncated_datagram_is_refused(cut):
    buf, n, pad, _ = sealed(20)
    reason = refusal(buf, n - cut, pad, False)
    assert reason == ("short" if n - cut < 48 else "length")


@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_truncated_datagram_with_rewritten_length_is_refused_by_the_mac(fast):
    """A forger who cuts the payload and fixes the length field still needs the tag."""
    buf, n, pad, _ = sealed(20)
    struct.pack_into(">I", buf, 24, 10)
    buf[42:58] = buf[52:68].copy()  # move the tag next to the shorter body
    assert refusal(buf, 58, pad[:42], fast) == "mac"


@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
@pytest.mark.parametrize("what", ["all", "mac-key", "r", "s"])
def test_wrong_pad_is_refused_by_the_mac(fast, what):
    buf, n, pad, payload = sealed(50)
    other = pad.copy()
    if what == "all":
        other = random_pad(50, seed=99)
    elif what == "mac-key":
        other[:32] = random_pad(0, seed=98)
    elif what == "r":
        other[5] ^= 0x01  # a bit of r that survives clamping
    else:
        other[20] ^= 0x80
    before = buf.copy()
    assert refusal(buf, n, other, fast) == "mac"
    assert np.array_equal(buf, before)
    # the right pad still opens it
    assert np.array_equal(wire.open_(buf, parse_ok(buf, n), pad), payload)


@pytest.mark.parametrize("length", [1, 30, 4000])
def test_a_pad_wiped_at_its_start_or_its_end_is_wiped(length):
    pad = random_pad(length)
    assert not wire.wiped(pad)
    for cut in (slice(0, 32), slice(len(pad) - 32, len(pad))):
        bad = pad.copy()
        bad[cut] = 0
        assert wire.wiped(bad)
    bad = pad.copy()
    bad[1:-1] = 0  # zeros, but not 32 of them at either end
    assert not wire.wiped(bad)


@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_a_pad_whose_end_is_wiped_is_refused_though_its_tag_is_right(fast):
    # A wipe that ran into a pad: its MAC key is key, so the tag checks out, but the
    # payload's tail would come out XORed with zeros.
    length = 4000
    pad = random_pad(length)
    pad[-100:] = 0
    buf = make_buf(payload_of(length))
    n = wire.seal(buf, length, pad, link=LINK, direction=DIRECTION, lane=LANE, pos=POS,
                  release=RELEASE)
    before = buf.copy()
    assert refusal(buf, n, pad, fast) == "zerokey"
    assert np.array_equal(buf, before)


@pytest.mark.parametrize("fast", [False, True], ids=["bytes", "addrs"])
def test_zero_mac_key_is_refused_even_with_a_matching_tag(fast):
    length = 30
    pad = random_pad(length)
    pad[:32] = 0  # wiped key: Poly1305 with r = s = 0
    payload = payload_of(length)
    buf = make_buf(payload)
    n = wire.seal(buf, length, pad, link=LINK, direction=DIRECTION, lane=LANE, pos=POS,
                  release=RELEASE)
    # the forger's tag: with a zero key the tag is zero whatever the message
    assert bytes(buf[n - 16:n]) == bytes(16)
    assert bytes(buf[n - 16:n]) == independent_tag(pad[:32], buf[:n - 16])
    before = buf.copy()
    assert refusal(buf, n, pad, fast) == "zerokey"
    # also when the whole pad is wiped
    assert refusal(buf, n, np.zeros(wire.pad_len(length), dtype=np.uint8), False) == "zerokey"
    assert np.array_equal(buf, before)


def test_a_key_with_one_nonzero_byte_is_not_zerokey():
    buf, n, pad, payload = sealed(10)
    hdr = parse_ok(buf, n)
    other = pad.copy()
    other[:31] = 0
    with pytest.raises(wire.WireError) as ei:
        wire.open_(buf.copy(), hdr, other)
    assert ei.value.reason == "mac"


# ---- acceptance -----------------------------------------------------------------------

def hdr_at(pos: int, length: int) -> wire.Header:
    return wire.Header(0, 0, 0, 0, pos, 0, length)


def verdict(pos, length, *, lane_next=0, release_pos=0, write_pos=10**9, capacity=10**6):
    return wire.acceptance(hdr_at(pos, length), lane_next=lane_next, release_pos=release_pos,
                           write_pos=write_pos, capacity=capacity)


def test_acceptance_replay():
    assert verdict(999, 10, lane_next=1000) == "replay"
    assert verdict(1000, 10, lane_next=1000) == wire.ACCEPT  # exactly at lane_next
    assert verdict(0, 0, lane_next=1) == "replay"


def test_acceptance_old():
    assert verdict(999, 10, release_pos=1000) == "old"
    assert verdict(1000, 10, release_pos=1000) == wire.ACCEPT
    # replay is checked first
    assert verdict(500, 10, lane_next=600, release_pos=1000) == "replay"


def test_acceptance_ahead():
    cap = 4096
    # the datagram ends exactly at release_pos + capacity: the ring can hold it
    pos = 1000 + cap - wire.pad_len(100)
    assert verdict(pos, 100, release_pos=1000, capacity=cap) == wire.ACCEPT
    assert verdict(pos + 1, 100, release_pos=1000, capacity=cap) == "ahead"
    assert verdict(pos + 1, 99, release_pos=1000, capacity=cap) == wire.ACCEPT
    # ahead beats wait: such a datagram could wait for ever
    assert verdict(pos + 1, 100, release_pos=1000, write_pos=1000, capacity=cap) == "ahead"
    # old beats ahead
    assert verdict(10, cap, release_pos=1000, capacity=cap) == "old"


def test_acceptance_wait():
    end = 5000
    pos = end - wire.pad_len(68)
    assert verdict(pos, 68, write_pos=end) == wire.ACCEPT  # the last byte is stored
    assert verdict(pos, 68, write_pos=end - 1) == wire.WAIT
    assert verdict(pos, 69, write_pos=end) == wire.WAIT
    assert verdict(pos + 1, 68, write_pos=end) == wire.WAIT


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 2000), length=st.integers(0, 200), lane_next=st.integers(0, 2000),
       release_pos=st.integers(0, 2000), fill=st.integers(0, 1000),
       capacity=st.integers(1, 1000))
def test_acceptance_accepts_only_fresh_stored_key(pos, length, lane_next, release_pos, fill,
                                                  capacity):
    write_pos = release_pos + min(fill, capacity)
    v = verdict(pos, length, lane_next=lane_next, release_pos=release_pos,
                write_pos=write_pos, capacity=capacity)
    end = pos + 32 + length
    fresh = pos >= lane_next and pos >= release_pos
    stored = end <= write_pos
    assert (v == wire.ACCEPT) == (fresh and stored)
    if v == wire.WAIT:  # waiting only for key that can still come
        assert fresh and end <= release_pos + capacity


# ---- poly1305 -------------------------------------------------------------------------

RFC_KEY = bytes.fromhex("85d6be7857556d337f4452fe42d506a8"
                        "0103808afb0db2fd4abff6af4149f51b")
RFC_MSG = b"Cryptographic Forum Research Group"
RFC_TAG = bytes.fromhex("a8061dc1305136c6c22b8baf0c0127a9")


def u8(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def test_poly1305_rfc8439_vector():
    assert poly1305.tag(u8(RFC_KEY), u8(RFC_MSG)) == RFC_TAG
    poly1305.verify(u8(RFC_KEY), u8(RFC_MSG), RFC_TAG)


def test_poly1305_fallback_backend_rfc8439_vector():
    assert poly1305._CryptographyPoly1305.tag(u8(RFC_KEY), u8(RFC_MSG)) == RFC_TAG


@pytest.mark.skipif(not poly1305.HAVE_ADDRESSES, reason="OpenSSL EVP backend not loaded")
def test_poly1305_tag_into_rfc8439_vector():
    key, msg = u8(RFC_KEY), u8(RFC_MSG)
    out = np.zeros(16, dtype=np.uint8)
    poly1305.tag_into(key.ctypes.data, msg.ctypes.data, len(msg), out.ctypes.data)
    assert bytes(out) == RFC_TAG
    assert ctypes.string_at(out.ctypes.data, 16) == RFC_TAG


def test_poly1305_of_the_empty_message_is_s():
    """No blocks: the accumulator stays 0 and the tag is s, the key's second half."""
    key = rand_bytes(32, 7)
    assert poly1305.tag(key, np.zeros(0, dtype=np.uint8)) == bytes(key[16:])


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=300))
def test_poly1305_matches_cryptography(key, msg):
    expected = Poly1305.generate_tag(key, msg)
    assert poly1305.tag(u8(key), u8(msg)) == expected
    poly1305.verify(u8(key), u8(msg), expected)
    if poly1305.HAVE_ADDRESSES:
        k, m = u8(key), u8(msg)
        out = np.zeros(16, dtype=np.uint8)
        poly1305.tag_into(k.ctypes.data, m.ctypes.data, len(m), out.ctypes.data)
        assert bytes(out) == expected


def test_poly1305_matches_cryptography_on_large_input():
    key, msg = rand_bytes(32, 11), rand_bytes(wire.MAX_DATAGRAM, 12)
    assert poly1305.tag(key, msg) == independent_tag(key, msg)


@pytest.mark.parametrize("flip", [0, 7, 8, 15])
def test_poly1305_verify_raises_on_a_wrong_tag(flip):
    bad = bytearray(RFC_TAG)
    bad[flip] ^= 0x01
    with pytest.raises(InvalidSignature):
        poly1305.verify(u8(RFC_KEY), u8(RFC_MSG), bytes(bad))
    with pytest.raises(InvalidSignature):
        poly1305.verify(u8(RFC_KEY), u8(RFC_MSG + b"!"), RFC_TAG)
    with pytest.raises(InvalidSignature):
        poly1305.verify(u8(RFC_KEY), u8(RFC_MSG), RFC_TAG[:15])
