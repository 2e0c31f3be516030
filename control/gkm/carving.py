"""Carving application keys out of global key blocks, without I/O.

Global key travels between two nodes in numbered blocks: block ``seq`` of the ordered pair
(origin -> destination) holds the same bytes in the origin's ENC store (grown from the
block's seed) and in the destination's DEC store. An application key is a slice of one
block, and its key ID says which: both nodes find the identical bytes from the key ID
alone, with no table to share.

Key ID: an RFC 9562 version-8 UUID (the version for custom layouts), 122 free bits:

    bits     field
    2        layout (0)
    16       origin node id
    16       destination node id
    40       block sequence number of the pair
    24       offset of the key in the block (blocks are at most 16 MiB)
    24       key size in bytes (keys are at most 16 MiB)

Slices of a pair's blocks are handed out in order by a cursor (block, offset) that only
moves forward; a key never spans two blocks (a rest too small for the asked size is
skipped, never reused), so no byte goes into two keys.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import cached_property

LAYOUT = 0
MAX_NODE_ID = (1 << 16) - 1
MAX_SEQ = (1 << 40) - 1
MAX_BLOCK = 1 << 24  # bytes; offsets and sizes fit 24 bits
_FIELDS = ((2, "layout"), (16, "origin"), (16, "destination"), (40, "seq"), (24, "offset"),
           (24, "size"))


class CarveError(ValueError):
    """A request or key ID refused whole; nothing changed."""


class NotEnoughKey(CarveError):
    """Fewer usable bytes than the keys asked for; nothing was cut."""


@dataclass(frozen=True)
class KeySlice:
    origin: int
    destination: int
    seq: int
    offset: int
    size: int

    def __post_init__(self) -> None:
        for name, limit in (("origin", MAX_NODE_ID), ("destination", MAX_NODE_ID),
                            ("seq", MAX_SEQ)):
            v = getattr(self, name)
            if not 0 <= v <= limit:
                raise CarveError(f"{name} {v} outside 0..{limit}")
        if not 0 < self.size <= MAX_BLOCK - 1 or not 0 <= self.offset < MAX_BLOCK:
            raise CarveError(f"key of {self.size} B at {self.offset} does not fit a block")
        if self.offset + self.size > MAX_BLOCK:
            raise CarveError("a key never spans blocks")

    # The key ID is worked out once per slice: a take of a thousand keys names each key
    # several times (its reservation, its record, the answer), and a UUID costs microseconds.
    @cached_property
    def _id_int(self) -> int:
        value = 0
        for bits, name in _FIELDS:
            value = (value << bits) | (LAYOUT if name == "layout" else getattr(self, name))
        # Spread the 122 bits around the version (4 bits) and variant (2 bits) fields.
        hi48 = value >> 74
        mid12 = (value >> 62) & 0xFFF
        lo62 = value & ((1 << 62) - 1)
        return (hi48 << 80) | (0x8 << 76) | (mid12 << 64) | (0b10 << 62) | lo62

    @cached_property
    def key_id(self) -> uuid.UUID:
        """The key ID (a version-8 UUID)."""
        return uuid.UUID(int=self._id_int)

    @cached_property
    def id_bytes(self) -> bytes:
        """The key ID's 16 bytes, as the relay carries and the stores key it."""
        return self._id_int.to_bytes(16, "big")


def id_text(raw: bytes) -> str:
    """A key ID's 16 bytes as its UUID's text (``str(uuid.UUID(bytes=raw))``, without
    making the UUID)."""
    if len(raw) != 16:
        raise ValueError(f"a key ID is 16 bytes, not {len(raw)}")
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def decode(key_id: str | uuid.UUID | bytes) -> KeySlice:
    """The slice a key ID names (its text, its UUID, or its 16 bytes); CarveError for
    anything that is not one of ours."""
    if isinstance(key_id, bytes):
        if len(key_id) != 16:
            raise CarveError(f"not a key ID: {len(key_id)} bytes")
        raw = int.from_bytes(key_id, "big")
    else:
        try:
            u = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(str(key_id))
        except (ValueError, AttributeError, TypeError):
            raise CarveError(f"not a UUID: {key_id!r}") from None
        raw = u.int
    if (raw >> 76) & 0xF != 8 or (raw >> 62) & 0b11 != 0b10:
        raise CarveError("not a key ID of this network (UUID version 8 expected)")
    value = ((raw >> 80) << 74) | (((raw >> 64) & 0xFFF) << 62) | (raw & ((1 << 62) - 1))
    fields = {}
    for bits, name in reversed(_FIELDS):
        fields[name] = value & ((1 << bits) - 1)
        value >>= bits
    if fields.pop("layout") != LAYOUT:
        raise CarveError("unknown key ID layout")
    return KeySlice(**fields)


@dataclass(frozen=True)
class Cursor:
    """Where a pair's next key starts: block ``seq`` at ``offset``."""

    seq: int
    offset: int


def carve(cursor: Cursor, block_sizes: dict[int, int], number: int, size: int, *,
          origin: int, destination: int) -> tuple[list[KeySlice], Cursor]:
    """Cut ``number`` keys of ``size`` bytes from the pair's usable blocks, in order.

    ``block_sizes`` maps the sequence numbers of the blocks usable now (acknowledged by
    the destination, invariant 4) to their sizes. Either every key is cut and the new
    cursor returned, or NotEnoughKey says there is not enough key and nothing changes.
    """
    if number < 1 or size < 1:
        raise CarveError("number and size must be positive")
    out: list[KeySlice] = []
    seq, offset = cursor.seq, cursor.offset
    for _ in range(number):
        while True:
            if seq not in block_sizes:
                later = [s for s in block_sizes if s > seq]
                if not later:
                    raise NotEnoughKey(f"not enough key: {len(out)} of {number} keys of "
                                     f"{size} B available")
                seq, offset = min(later), 0
                continue
            if offset + size <= block_sizes[seq]:
                break
            seq, offset = seq + 1, 0  # the rest of this block is too small: skipped
        out.append(KeySlice(origin, destination, seq, offset, size))
        offset += size
    return out, Cursor(seq, offset)
