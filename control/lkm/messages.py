"""Agreement messages and their authenticated framing, without I/O.

The agreement channel carries no key bytes, only block ids, fates and positions, so it
needs integrity, not secrecy. Every frame is authenticated with HMAC-SHA256 under the
link's pre-shared 32-byte authentication key (``auth_key_file``; generated per link by
``qkdctl net up`` in emulation, provisioned out of band in deployment, like the initial
authentication secret every QKD link needs). The MAC covers the sender's role, both
ends' per-connection random nonces and a per-direction frame counter, so frames cannot
be forged, reflected, reordered or replayed from another connection.

Frame: ``u32 length | body | 32-byte tag``; body: ``u8 version | u8 type | u64 counter |
payload``. All integers big-endian. A bad frame is refused whole (the connection drops
and a new session starts); nothing in it is applied.

Besides the agreement's own messages the channel carries a key source's notes to the
peer's source (``KeyIds``: which device keys make up a block); the agreement state
machines ignore them and the key manager routes them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from dataplane.limits import MAX_AGREEMENT_FRAME, MAX_KEYS_PER_NOTE

AB, BA = 0, 1
VERSION = 2  # 2: a Sync start equal to an end's write position keeps its key
TAG_LEN = 32
NONCE_LEN = 16
AUTH_KEY_LEN = 32
KEY_ID_LEN = 36  # a UUID in its canonical text form
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                      r"[0-9a-fA-F]{12}")


class Fate(IntEnum):
    AB = 0
    BA = 1
    DISCARD = 2


@dataclass(frozen=True)
class Hello:
    sync: int
    write_pos: tuple[int, int]
    released: tuple[int, int]


@dataclass(frozen=True)
class Sync:
    sync: int
    start: tuple[int, int]


@dataclass(frozen=True)
class Have:
    sync: int
    ids: tuple[tuple[int, int], ...]
    released: tuple[int, int]


@dataclass(frozen=True)
class Decision:
    block: tuple[int, int]
    fate: Fate
    pos: int


@dataclass(frozen=True)
class Decide:
    sync: int
    decisions: tuple[Decision, ...]


@dataclass(frozen=True)
class KeyIds:
    """The leader's ETSI 014 source to the follower's: block ``block`` is the keys
    ``key_ids`` (UUID strings exactly as the device gave them), in this order."""

    block: tuple[int, int]
    key_ids: tuple[str, ...]


Message = Hello | Sync | Have | Decide | KeyIds

T_HELLO, T_SYNC, T_HAVE, T_DECIDE, T_KEY_IDS = 1, 2, 3, 4, 5
_Q2 = struct.Struct(">QQ")
_Q5 = struct.Struct(">QQQQQ")
_Q3 = struct.Struct(">QQQ")
_HAVE_HEAD = struct.Struct(">QQQI")
_DECIDE_HEAD = struct.Struct(">QI")
_DECISION = struct.Struct(">QQBQ")
_KEY_IDS_HEAD = struct.Struct(">QQH")
_BODY_HEAD = struct.Struct(">BBQ")
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame or message that is malformed or not authentic; refused whole."""


def check_key_id(key_id: object) -> str:
    """A device's key ID as ETSI GS QKD 014 defines it (a UUID); ValueError otherwise."""
    if not isinstance(key_id, str) or not _UUID_RE.fullmatch(key_id):
        raise ValueError(f"key_ID {str(key_id)[:40]!r} is not a UUID")
    return key_id


def encode(msg: Message) -> tuple[int, bytes]:
    if isinstance(msg, Hello):
        return T_HELLO, _Q5.pack(msg.sync, *msg.write_pos, *msg.released)
    if isinstance(msg, Sync):
        return T_SYNC, _Q3.pack(msg.sync, *msg.start)
    if isinstance(msg, Have):
        head = _HAVE_HEAD.pack(msg.sync, *msg.released, len(msg.ids))
        return T_HAVE, head + b"".join(_Q2.pack(e, s) for e, s in msg.ids)
    if isinstance(msg, Decide):
        head = _DECIDE_HEAD.pack(msg.sync, len(msg.decisions))
        return T_DECIDE, head + b"".join(
            _DECISION.pack(d.block[0], d.block[1], int(d.fate), d.pos) for d in msg.decisions)
    if isinstance(msg, KeyIds):
        if not 1 <= len(msg.key_ids) <= MAX_KEYS_PER_NOTE:
            raise ValueError(f"KeyIds: {len(msg.key_ids)} keys, at most {MAX_KEYS_PER_NOTE}")
        head = _KEY_IDS_HEAD.pack(*msg.block, len(msg.key_ids))
        return T_KEY_IDS, head + "".join(check_key_id(k) for k in msg.key_ids).encode()
    raise TypeError(f"not an agreement message: {msg!r}")


def decode(mtype: int, payload: bytes) -> Message:
    try:
        if mtype == T_HELLO and len(payload) == _Q5.size:
            s, w0, w1, r0, r1 = _Q5.unpack(payload)
            return Hello(s, (w0, w1), (r0, r1))
        if mtype == T_SYNC and len(payload) == _Q3.size:
            s, p0, p1 = _Q3.unpack(payload)
            return Sync(s, (p0, p1))
        if mtype == T_HAVE and len(payload) >= _HAVE_HEAD.size:
            s, r0, r1, n = _HAVE_HEAD.unpack_from(payload)
            if len(payload) != _HAVE_HEAD.size + n * _Q2.size:
                raise ProtocolError("Have: length does not match its count")
            ids = tuple(_Q2.unpack_from(payload, _HAVE_HEAD.size + i * _Q2.size)
                        for i in range(n))
            return Have(s, ids, (r0, r1))
        if mtype == T_DECIDE and len(payload) >= _DECIDE_HEAD.size:
            s, n = _DECIDE_HEAD.unpack_from(payload)
            if len(payload) != _DECIDE_HEAD.size + n * _DECISION.size:
                raise ProtocolError("Decide: length does not match its count")
            out = []
            for i in range(n):
                e, q, f, pos = _DECISION.unpack_from(payload,
                                                      _DECIDE_HEAD.size + i * _DECISION.size)
                if f > Fate.DISCARD:
                    raise ProtocolError(f"Decide: unknown fate {f}")
                out.append(Decision((e, q), Fate(f), pos))
            return Decide(s, tuple(out))
        if mtype == T_KEY_IDS and len(payload) >= _KEY_IDS_HEAD.size:
            e, q, n = _KEY_IDS_HEAD.unpack_from(payload)
            if not 1 <= n <= MAX_KEYS_PER_NOTE:
                raise ProtocolError(f"KeyIds: {n} keys, must be 1 to {MAX_KEYS_PER_NOTE}")
            if len(payload) != _KEY_IDS_HEAD.size + n * KEY_ID_LEN:
                raise ProtocolError("KeyIds: length does not match its count")
            text = payload[_KEY_IDS_HEAD.size:].decode("ascii")
            ids = tuple(check_key_id(text[i * KEY_ID_LEN:(i + 1) * KEY_ID_LEN])
                        for i in range(n))
            return KeyIds((e, q), ids)
    except (ValueError, struct.error) as e:
        raise ProtocolError(f"malformed message: {e}") from None
    raise ProtocolError(f"unknown message type {mtype} or bad length {len(payload)}")


class FrameCodec:
    """Seals outgoing and opens incoming frames of one connection.

    ``role`` is b"L" (leader) or b"F" (follower); the tag binds it, so a frame cannot be
    reflected back to its sender.
    """

    def __init__(self, key: bytes, role: bytes, my_nonce: bytes, peer_nonce: bytes):
        if len(key) != AUTH_KEY_LEN:
            raise ValueError(f"agreement key must be {AUTH_KEY_LEN} bytes, got {len(key)}")
        if role not in (b"L", b"F"):
            raise ValueError("role must be b'L' or b'F'")
        self._key = key
        self._role = role
        self._peer_role = b"F" if role == b"L" else b"L"
        lead, foll = (my_nonce, peer_nonce) if role == b"L" else (peer_nonce, my_nonce)
        self._context = b"qkdnet-agreement-v1" + lead + foll
        self._send_counter = 0
        self._recv_counter = 0
        self._buf = bytearray()

    def _tag(self, role: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, self._context + role + body, hashlib.sha256).digest()

    def seal(self, msg: Message) -> bytes:
        mtype, payload = encode(msg)
        body = _BODY_HEAD.pack(VERSION, mtype, self._send_counter) + payload
        self._send_counter += 1
        frame = body + self._tag(self._role, body)
        return _LEN.pack(len(frame)) + frame

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return the complete, authentic messages, in order."""
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if not _BODY_HEAD.size + TAG_LEN <= n <= MAX_AGREEMENT_FRAME:
                raise ProtocolError(f"frame length {n} out of range")
            if len(self._buf) < _LEN.size + n:
                break
            frame = bytes(self._buf[_LEN.size:_LEN.size + n])
            del self._buf[:_LEN.size + n]
            body, tag = frame[:-TAG_LEN], frame[-TAG_LEN:]
            if not hmac.compare_digest(tag, self._tag(self._peer_role, body)):
                raise ProtocolError("frame authentication failed")
            version, mtype, counter = _BODY_HEAD.unpack_from(body)
            if version != VERSION:
                raise ProtocolError(f"unsupported agreement version {version}")
            if counter != self._recv_counter:
                raise ProtocolError(f"frame counter {counter}, expected {self._recv_counter}")
            self._recv_counter += 1
            out.append(decode(mtype, body[_BODY_HEAD.size:]))
        return out
