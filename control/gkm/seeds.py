"""Global key blocks made from a 32-byte seed each, and kept at their origin as that seed.

A block is the ChaCha20 keystream of its own key, the seed, drawn from ``os.urandom``
(a CSPRNG of the kind the kernel's own generator is, and several times faster here than
``os.urandom`` for every byte; zero nonce and counter: each seed is used for one block
only). The origin must be able to give the same bytes again (a pending block resent
after a restart, keys cut from an acknowledged block), so it stores the seed, not the
bytes: storing the bytes made every key byte of a fill go to the disk twice, once at each
end, and on one disk that was the fill's largest cost. The destination receives and
stores the bytes themselves; a seed never leaves the origin (a relay carries key, which
the OTP tunnels protect byte for byte, never a seed that key could be grown from).
Whoever reads a seed has its block, as whoever read the bytes did: the seed lives and
goes exactly as the block's bytes did (deleted once every key of the block is used).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32
_NONCE = bytes(16)  # ChaCha20's 32-bit block counter and 96-bit nonce, all zero


@dataclass(frozen=True)
class Block:
    """A new block: the seed the origin stores, and the bytes it sends."""

    seed: bytes = field(repr=False)  # key: never in a log or a traceback
    data: bytes = field(repr=False)


def expand(seed: bytes, size: int) -> bytes:
    """The ``size`` bytes of the block grown from ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a block seed is {SEED_BYTES} bytes, not {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, _NONCE), None).encryptor().update(bytes(size))


def new_blocks(count: int, size: int) -> list[Block]:
    """``count`` fresh blocks of ``size`` bytes, each from a seed of its own."""
    out = []
    for _ in range(count):
        seed = os.urandom(SEED_BYTES)
        out.append(Block(seed, expand(seed, size)))
    return out
