"""Messages between global key managers, without I/O (module 3).

Global key travels from its origin to its destination in numbered blocks of an ordered
pair (origin -> destination). Two messages, each a ZeroMQ multipart message sent over TCP
to the destination's node address, so the kernel routes it through the OTP tunnels:

BLOCKS  origin -> destination   frame 0: header + (seq, size) per block; then one frame
                                per block with its bytes (sent without copying)
ACK     destination -> origin   frame 0: header + (seq, status) per block
RESERVE origin -> destination   which SAEs may fetch which keys (none: cancel; "=": the
                                master got them, they may be fetched now), numbered
RESERVED destination -> origin  applied, duplicate, or a gap before it
SHARES  origin -> destination   as BLOCKS, but each frame one XOR share of its block
                                (multipath relay, ``[gkm] paths``): frame 0 also says the
                                send's nonce, which share this is and how many there are

SHARES go to the destination's share addresses, one per node-disjoint path; the
destination XORs a block's shares of one nonce once all have arrived, stores the block
and only then acknowledges it (ACK, as for BLOCKS). Each send draws fresh shares under a
new nonce, so shares of two sends are never combined.

RESERVE and RESERVED are one frame each; several may travel as the frames of one
multipart message (at most MAX_RESERVE_BATCH, RESERVEs in increasing number), so that the
reservations of concurrent takes cross the tunnels as one segment and are applied with one
sync, and their answers come back the same way (``parse_batch``).

Header: magic ``QKGK``, version 1, type, origin node id, destination node id, count.
A destination acknowledges a block only once it holds it durably (invariant 4); the
origin resends until it has an ACK, so BLOCKS must be idempotent by sequence number:
STORED (new), DUPLICATE (already held, same bytes), CONFLICT (held with other bytes:
never usable), REFUSED (not a pair this node keeps). Every parse refuses a message whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from control.gkm.carving import MAX_NODE_ID, MAX_SEQ
from dataplane.limits import (
    MAX_GLOBAL_BLOCK,
    MAX_PATHS,
    MAX_RELAY_BLOCKS,
    MAX_RELAY_MESSAGE,
    MIN_GLOBAL_BLOCK,
)

MAGIC = b"QKGK"
VERSION = 1
_HEADER = struct.Struct(">4sBBHHI")  # magic, version, type, origin, destination, count
CONFIRM = "="                         # the one "SAE ID" of a confirmation
MAX_RESERVE_BATCH = 256              # RESERVE or RESERVED frames in one message
_BLOCK = struct.Struct(">QI")         # seq, size
_ACK = struct.Struct(">QB")           # seq, status
_SHARE = struct.Struct(">QBB")        # nonce, share index, shares


class MsgType(IntEnum):
    BLOCKS = 1
    ACK = 2
    RESERVE = 3
    RESERVED = 4
    SHARES = 5


class AckStatus(IntEnum):
    STORED = 0
    DUPLICATE = 1
    CONFLICT = 2
    REFUSED = 3


class ReserveStatus(IntEnum):
    APPLIED = 0
    DUPLICATE = 1   # applied before (a resend)
    GAP = 2         # an earlier reservation is missing: resend from the first unacknowledged
    REFUSED = 3     # names keys that cannot be reserved (never expected from a sound origin)


class RelayWireError(ValueError):
    """A relay message refused whole, with the reason."""


@dataclass(frozen=True)
class Blocks:
    origin: int
    destination: int
    blocks: tuple[tuple[int, bytes | memoryview], ...]  # (seq, bytes), seq ascending


@dataclass(frozen=True)
class Shares:
    """Share ``index`` of ``count`` of each block, all of one send (``nonce``)."""

    origin: int
    destination: int
    nonce: int
    index: int
    count: int
    blocks: tuple[tuple[int, bytes | memoryview], ...]  # (seq, share bytes), seq ascending


@dataclass(frozen=True)
class Ack:
    origin: int
    destination: int
    results: tuple[tuple[int, AckStatus], ...]


@dataclass(frozen=True)
class Reserve:
    """The master's node tells the slave's node which keys which SAEs may fetch, in the
    origin's carving order (``rseq`` numbers them per pair), and how far it has carved.
    No SAEs: cancel these keys' reservations (their taker never got them). ``confirm``:
    their taker got them, so the SAEs may fetch them from now on (a reservation alone
    is not fetchable: the taker may yet be refused). ``master`` is the master SAE that
    took them ("" = any: a reservation made by hand); on the wire it is the first of the
    SAE IDs, "*" standing for any; a confirmation names the one ID "=" instead."""

    origin: int
    destination: int
    rseq: int
    carved_to: tuple[int, int]  # (block, offset)
    saes: tuple[str, ...]
    key_ids: tuple[bytes, ...]  # 16 bytes each
    master: str = ""
    confirm: bool = False


@dataclass(frozen=True)
class Reserved:
    origin: int
    destination: int
    rseq: int
    status: ReserveStatus


_RESERVE = struct.Struct(">QQIB")  # rseq, carved block, carved offset, number of SAEs
_RESERVED = struct.Struct(">QB")


def encode_reserve(msg: Reserve) -> list[bytes]:
    if len(msg.saes) > 254 or len(msg.key_ids) > MAX_RELAY_BLOCKS:
        raise RelayWireError("a RESERVE names at most 254 SAEs and at most "
                             f"{MAX_RELAY_BLOCKS} keys")
    if msg.confirm and msg.saes:
        raise RelayWireError("a confirmation names no SAE")
    head = _header(MsgType.RESERVE, msg.origin, msg.destination, len(msg.key_ids))
    names = [msg.master or "*", *msg.saes] if msg.saes else [CONFIRM] if msg.confirm else []
    encoded = [x.encode() for x in names]
    if any(not 0 < len(e) < 256 for e in encoded):
        raise RelayWireError("SAE IDs are 1-255 bytes")
    saes = b"".join(bytes([len(e)]) + e for e in encoded)
    if any(len(k) != 16 for k in msg.key_ids):
        raise RelayWireError("key IDs are 16 bytes")
    return [head + _RESERVE.pack(msg.rseq, *msg.carved_to, len(names)) + saes
            + b"".join(msg.key_ids)]


def encode_reserved(msg: Reserved) -> list[bytes]:
    return [_header(MsgType.RESERVED, msg.origin, msg.destination, 1)
            + _RESERVED.pack(msg.rseq, int(msg.status))]


def _parse_reserve(origin: int, destination: int, count: int, body: bytes) -> Reserve:
    if len(body) < _RESERVE.size or count > MAX_RELAY_BLOCKS:
        raise RelayWireError("RESERVE too short")
    rseq, cseq, coff, nsaes = _RESERVE.unpack_from(body)
    at = _RESERVE.size
    saes = []
    for _ in range(nsaes):
        if at >= len(body) or not body[at] or at + 1 + body[at] > len(body):
            raise RelayWireError("RESERVE: an SAE ID runs past the message")
        try:
            saes.append(body[at + 1:at + 1 + body[at]].decode())
        except UnicodeDecodeError:
            raise RelayWireError("RESERVE: an SAE ID is not UTF-8") from None
        at += 1 + body[at]
    if len(body) - at != 16 * count:
        raise RelayWireError(f"RESERVE: {len(body) - at} B of key IDs for {count} keys")
    keys = tuple(body[at + 16 * i:at + 16 * (i + 1)] for i in range(count))
    if saes == [CONFIRM]:
        return Reserve(origin, destination, rseq, (cseq, coff), (), keys, confirm=True)
    if len(saes) == 1:
        raise RelayWireError("RESERVE: a master SAE and no slave SAE")
    master = "" if not saes or saes[0] == "*" else saes[0]
    return Reserve(origin, destination, rseq, (cseq, coff), tuple(saes[1:]), keys, master)


def _header(kind: MsgType, origin: int, destination: int, count: int) -> bytes:
    for name, v in (("origin", origin), ("destination", destination)):
        if not 0 < v <= MAX_NODE_ID:
            raise RelayWireError(f"{name} node id {v} outside 1..{MAX_NODE_ID}")
    return _HEADER.pack(MAGIC, VERSION, kind, origin, destination, count)


def _index(blocks: tuple[tuple[int, bytes | memoryview], ...]) -> bytes:
    """The (seq, size) index of a BLOCKS or SHARES message, checked."""
    _check_blocks([(seq, len(data)) for seq, data in blocks])
    return b"".join(_BLOCK.pack(seq, len(data)) for seq, data in blocks)


def encode_blocks(msg: Blocks) -> list[bytes | memoryview]:
    """The frames of a BLOCKS message: the index, then each block as it is."""
    index = _index(msg.blocks)
    head = _header(MsgType.BLOCKS, msg.origin, msg.destination, len(msg.blocks))
    return [head + index, *(data for _, data in msg.blocks)]


def encode_shares(msg: Shares) -> list[bytes | memoryview]:
    """The frames of a SHARES message: the index (after the nonce and share number), then
    each share as it is."""
    _check_share(msg.index, msg.count)
    index = _index(msg.blocks)
    head = _header(MsgType.SHARES, msg.origin, msg.destination, len(msg.blocks))
    return [head + _SHARE.pack(msg.nonce, msg.index, msg.count) + index,
            *(data for _, data in msg.blocks)]


def _check_share(index: int, count: int) -> None:
    if not 1 <= count <= MAX_PATHS or not 0 <= index < count:
        raise RelayWireError(f"share {index} of {count}: a block has 1 to {MAX_PATHS} "
                             f"shares, numbered from 0")


def encode_ack(msg: Ack) -> list[bytes]:
    head = _header(MsgType.ACK, msg.origin, msg.destination, len(msg.results))
    return [head + b"".join(_ACK.pack(seq, int(st)) for seq, st in msg.results)]


def _check_blocks(index: list[tuple[int, int]]) -> None:
    if not 0 < len(index) <= MAX_RELAY_BLOCKS:
        raise RelayWireError(f"a BLOCKS message carries 1 to {MAX_RELAY_BLOCKS} blocks, "
                             f"not {len(index)}")
    last = -1
    total = 0
    for seq, size in index:
        if not last < seq <= MAX_SEQ:
            raise RelayWireError(f"block numbers must ascend within 0..{MAX_SEQ}: {seq} "
                                 f"after {last}")
        if not MIN_GLOBAL_BLOCK <= size <= MAX_GLOBAL_BLOCK:
            raise RelayWireError(f"block {seq}: size {size} outside {MIN_GLOBAL_BLOCK}.."
                                 f"{MAX_GLOBAL_BLOCK}")
        last = seq
        total += size
    if total > max(MAX_RELAY_MESSAGE, max(s for _, s in index)):
        raise RelayWireError(f"{total} B of blocks in one message (at most "
                             f"{MAX_RELAY_MESSAGE})")


def _indexed_blocks(name: str, count: int, body: bytes, frames: list[bytes | memoryview]
                    ) -> tuple[tuple[int, bytes | memoryview], ...]:
    """(seq, bytes) of a BLOCKS or SHARES message whose index is ``body``."""
    if len(body) != count * _BLOCK.size:
        raise RelayWireError(f"{name} index of {len(body)} B for {count} blocks")
    index = [_BLOCK.unpack_from(body, i * _BLOCK.size) for i in range(count)]
    _check_blocks(index)
    if len(frames) != 1 + count:
        raise RelayWireError(f"{name} of {count} blocks has {1 + count} frames, got "
                             f"{len(frames)}")
    for (seq, size), data in zip(index, frames[1:], strict=True):
        if len(data) != size:
            raise RelayWireError(f"block {seq} is {len(data)} B, the index says {size} B")
    return tuple((seq, data) for (seq, _), data in zip(index, frames[1:], strict=True))


def parse(frames: list[bytes | memoryview]
          ) -> Blocks | Shares | Ack | Reserve | Reserved:
    """One relay message from its frames; RelayWireError says why it is refused."""
    if not frames or len(frames[0]) < _HEADER.size:
        raise RelayWireError("message shorter than its header")
    head = bytes(frames[0])
    magic, version, kind, origin, destination, count = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise RelayWireError("not a relay message (bad magic)")
    if version != VERSION:
        raise RelayWireError(f"relay message version {version}, this node speaks {VERSION}")
    if not (0 < origin <= MAX_NODE_ID and 0 < destination <= MAX_NODE_ID):
        raise RelayWireError("node id 0 in header")
    body = head[_HEADER.size:]
    if kind == MsgType.SHARES:
        if len(body) < _SHARE.size:
            raise RelayWireError("SHARES shorter than its share header")
        nonce, share, shares = _SHARE.unpack_from(body)
        _check_share(share, shares)
        blocks = _indexed_blocks("SHARES", count, body[_SHARE.size:], frames)
        return Shares(origin, destination, nonce, share, shares, blocks)
    if kind == MsgType.BLOCKS:
        return Blocks(origin, destination, _indexed_blocks("BLOCKS", count, body, frames))
    if kind == MsgType.ACK:
        if len(frames) != 1:
            raise RelayWireError(f"ACK has 1 frame, got {len(frames)}")
        if not 0 < count <= MAX_RELAY_BLOCKS or len(body) != count * _ACK.size:
            raise RelayWireError(f"ACK of {len(body)} B for {count} results")
        results = []
        for i in range(count):
            seq, st = _ACK.unpack_from(body, i * _ACK.size)
            try:
                results.append((seq, AckStatus(st)))
            except ValueError:
                raise RelayWireError(f"unknown ACK status {st}") from None
        return Ack(origin, destination, tuple(results))
    if kind in (MsgType.RESERVE, MsgType.RESERVED) and len(frames) != 1:
        raise RelayWireError(f"{MsgType(kind).name} has 1 frame, got {len(frames)}")
    if kind == MsgType.RESERVE:
        return _parse_reserve(origin, destination, count, body)
    if kind == MsgType.RESERVED:
        if count != 1 or len(body) != _RESERVED.size:
            raise RelayWireError("RESERVED of the wrong size")
        rseq, st = _RESERVED.unpack(body)
        try:
            return Reserved(origin, destination, rseq, ReserveStatus(st))
        except ValueError:
            raise RelayWireError(f"unknown RESERVED status {st}") from None
    raise RelayWireError(f"unknown relay message type {kind}")


def parse_batch(frames: list[bytes | memoryview]
                ) -> list[Blocks | Shares | Ack | Reserve | Reserved]:
    """The messages one multipart message carries: several RESERVE (or RESERVED) frames,
    each a whole message, or one message of any type. Refused whole, as ``parse``."""
    if len(frames) > 1 and len(frames[0]) >= _HEADER.size:
        kind = _HEADER.unpack_from(frames[0])[2]
        if kind in (MsgType.RESERVE, MsgType.RESERVED):
            if len(frames) > MAX_RESERVE_BATCH:
                raise RelayWireError(f"{len(frames)} reservation frames in one message "
                                     f"(at most {MAX_RESERVE_BATCH})")
            out = [parse([f]) for f in frames]
            if any(type(m) is not type(out[0]) for m in out):
                raise RelayWireError("RESERVE and RESERVED frames mixed in one message")
            return out
    return [parse(frames)]


def receive_status(held: bytes | None, incoming: bytes | memoryview) -> AckStatus:
    """What the destination answers for one block, given what it already holds."""
    if held is None:
        return AckStatus.STORED
    return AckStatus.DUPLICATE if held == bytes(incoming) else AckStatus.CONFLICT
