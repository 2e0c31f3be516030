"""OTP tunnel wire format and its one-time-pad and one-time-MAC, without I/O.

A datagram (version 1; byte layout and rules in docs/wire.md)::

    0   u8   version (1)
    1   u8   flags          bit 0: control (a tunnel manager's keepalive, never to the TUN)
    2   u8   direction      0 = a->b, 1 = b->a (which key stream of the link)
    3   u8   lane           the sending worker; CONTROL_LANE for control datagrams
    4   u16  link           the link's index in the topology
    6   u16  reserved, 0
    8   u64  pos            key stream position of the first pad byte this datagram uses
    16  u64  release        the sender's ENC release point: it never sends below it again
    24  u32  length         payload bytes
    28  u32  reserved, 0
    32  ...  payload XOR pad[pos+32, pos+32+length)
    ..  16   Poly1305 tag over bytes [0, 32+length), keyed with pad[pos, pos+32)

Every datagram thus names its key (invariant 4) and spends ``32 + length`` fresh pad bytes:
32 for a one-time Poly1305 key (Wegman-Carter: secure without computational assumptions
when the key is random and used once) and the rest for the pad itself. The header is
authenticated too, so nobody can move a datagram to another lane, link or position.

All functions work on numpy uint8 buffers in place; the worker process owns the I/O.
"""

from __future__ import annotations

import hmac
import struct
from typing import NamedTuple

import numpy as np
from cryptography.exceptions import InvalidSignature

from dataplane import poly1305
from dataplane.ring import CONTROL_LANE, MAX_LANES

VERSION = 1
FLAG_CONTROL = 0x01
HEADER = struct.Struct(">BBBBHHQQII")
HEADER_LEN = HEADER.size  # 32
TAG_LEN = 16
MAC_KEY_LEN = 32
OVERHEAD = HEADER_LEN + TAG_LEN
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
MAX_PAYLOAD = MAX_DATAGRAM - OVERHEAD
ZERO_KEY = bytes(MAC_KEY_LEN)


class WireError(Exception):
    """A datagram refused whole; ``reason`` is the drop counter it goes to."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Header(NamedTuple):
    flags: int
    direction: int
    lane: int
    link: int
    pos: int
    release: int
    length: int

    @property
    def is_control(self) -> bool:
        return bool(self.flags & FLAG_CONTROL)

    @property
    def pad_len(self) -> int:
        return MAC_KEY_LEN + self.length


def pad_len(length: int) -> int:
    """Pad bytes a datagram with ``length`` payload bytes spends."""
    return MAC_KEY_LEN + length


def datagram_len(length: int) -> int:
    return OVERHEAD + length


def seal(buf: np.ndarray, length: int, pad: np.ndarray, *, link: int, direction: int,
         lane: int, pos: int, release: int, flags: int = 0,
         addrs: tuple[int, int] | None = None) -> int:
    """Turn the plaintext at ``buf[32:32+length]`` into a datagram in place.

    ``pad`` holds the ``32 + length`` key bytes at ``pos``. Returns the datagram length.
    ``addrs`` = (address of buf, address of pad), when the caller knows them, lets the
    tag be computed straight into the buffer (see :func:`poly1305.tag_into`).
    """
    if not 0 <= length <= MAX_PAYLOAD:
        raise WireError("toolong", f"{length} B payload (at most {MAX_PAYLOAD})")
    if len(pad) != MAC_KEY_LEN + length:
        raise ValueError(f"pad has {len(pad)} B, datagram needs {MAC_KEY_LEN + length}")
    body = buf[HEADER_LEN:HEADER_LEN + length]
    np.bitwise_xor(body, pad[MAC_KEY_LEN:], out=body)
    HEADER.pack_into(buf, 0, VERSION, flags, direction, lane, link, 0, pos, release,
                     length, 0)
    end = HEADER_LEN + length
    if addrs is not None and poly1305.HAVE_ADDRESSES:
        poly1305.tag_into(addrs[1], addrs[0], end, addrs[0] + end)
    else:
        buf[end:end + TAG_LEN] = np.frombuffer(poly1305.tag(pad[:MAC_KEY_LEN], buf[:end]),
                                               dtype=np.uint8)
    return end + TAG_LEN


def parse(buf: np.ndarray | bytes, n: int, *, link: int, direction: int) -> Header:
    """Check a received datagram's framing (not yet its tag) and return its header."""
    if n < OVERHEAD:
        raise WireError("short", f"{n} B")
    version, flags, d, lane, lk, res1, pos, release, length, res2 = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise WireError("version", f"version {version}")
    if n != OVERHEAD + length:
        raise WireError("length", f"{n} B datagram says {length} B payload")
    if lk != link:
        raise WireError("link", f"link {lk}, expected {link}")
    if d != direction:
        raise WireError("direction", f"direction {d}, expected {direction}")
    if res1 or res2 or flags & ~FLAG_CONTROL:
        raise WireError("reserved", "reserved bits set")
    if lane >= MAX_LANES or bool(flags & FLAG_CONTROL) != (lane == CONTROL_LANE):
        raise WireError("lane", f"lane {lane} with flags {flags:#x}")
    if release > pos:
        raise WireError("reserved", "release point above the datagram's own position")
    return Header(flags, d, lane, lk, pos, release, length)


_scratch = np.zeros(TAG_LEN, dtype=np.uint8)
_scratch_addr = _scratch.ctypes.data


def wiped(pad: np.ndarray) -> bool:
    """Whether ``pad`` starts or ends with 32 zero bytes: wiped key, never a real pad
    (2**-256). The start is its one-time MAC key; the end catches a wipe that ran into
    it, which would leave the packet's tail XORed with zeros, in clear. Compared in
    place: no copy of the key is left."""
    mv = pad.data
    return mv[:MAC_KEY_LEN] == ZERO_KEY or mv[-MAC_KEY_LEN:] == ZERO_KEY


def open_(buf: np.ndarray, hdr: Header, pad: np.ndarray,
          addrs: tuple[int, int] | None = None) -> np.ndarray:
    """Verify the tag with the pad's MAC key, then decrypt in place; returns the payload.

    Raises WireError('zerokey') for wiped key (all zero: a Poly1305 key anyone could use)
    and WireError('mac') for a bad tag; the buffer is then left as it was.
    """
    if len(pad) != hdr.pad_len:
        raise ValueError(f"pad has {len(pad)} B, datagram needs {hdr.pad_len}")
    key = pad[:MAC_KEY_LEN]
    if wiped(pad):  # the MAC key, or a pad the tag would pass but the XOR not hide
        raise WireError("zerokey", f"pad at {hdr.pos} is wiped")
    end = HEADER_LEN + hdr.length
    if addrs is not None and poly1305.HAVE_ADDRESSES:
        poly1305.tag_into(addrs[1], addrs[0], end, _scratch_addr)
        if not hmac.compare_digest(_scratch.tobytes(), buf[end:end + TAG_LEN].tobytes()):
            raise WireError("mac", f"bad tag at position {hdr.pos}")
    else:
        try:
            poly1305.verify(key, buf[:end], buf[end:end + TAG_LEN].tobytes())
        except InvalidSignature:
            raise WireError("mac", f"bad tag at position {hdr.pos}") from None
    body = buf[HEADER_LEN:end]
    np.bitwise_xor(body, pad[MAC_KEY_LEN:], out=body)
    return body


# ---- the receiver's acceptance rule -----------------------------------------------------

ACCEPT, WAIT = "accept", "wait"


def acceptance(hdr: Header, *, lane_next: int, release_pos: int, write_pos: int,
               capacity: int) -> str:
    """Decide, before touching key, what to do with an authentic-looking datagram.

    ``lane_next`` is the lowest position the datagram's lane may still use: each lane's
    positions only grow (one worker sends them in order), so anything below it is a
    replay or reordered and is refused — each pad byte is accepted at most once.
    Returns ACCEPT, WAIT (key not yet stored here: the leader stores before the follower)
    or the drop reason.
    """
    end = hdr.pos + hdr.pad_len
    if hdr.pos < lane_next:
        return "replay"
    if hdr.pos < release_pos:
        return "old"
    if end > release_pos + capacity:
        return "ahead"
    if end > write_pos:
        return WAIT
    return ACCEPT


TX_DROPS = ("nokey", "toolong", "send")
RX_DROPS = ("source", "short", "version", "length", "link", "direction", "reserved", "lane",
            "replay", "old", "ahead", "nokey", "zerokey", "mac", "vnet", "tun")
