"""One-time Poly1305 tags, through OpenSSL's EVP_MAC interface with a reused context.

`cryptography`'s Poly1305 builds a fresh key object per call, about 6 us even for a
60-byte ACK; calling the system's OpenSSL 3 (libcrypto.so.3, always on Debian) directly
with one context per process costs about 4 us, and is faster on 64 KiB too (AVX2). Where
that library is missing, the `cryptography` implementation is used. Both give the same
tags (RFC 8439); the tests check them against each other and the RFC's vector.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import constant_time
from cryptography.hazmat.primitives.poly1305 import Poly1305

KEY_LEN = 32
TAG_LEN = 16


class _EvpPoly1305:
    def __init__(self) -> None:
        lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.EVP_MAC_fetch.restype = vp
        lib.EVP_MAC_fetch.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
        lib.EVP_MAC_CTX_new.restype = vp
        lib.EVP_MAC_CTX_new.argtypes = [vp]
        lib.EVP_MAC_init.argtypes = [vp, vp, sz, vp]
        lib.EVP_MAC_update.argtypes = [vp, vp, sz]
        lib.EVP_MAC_final.argtypes = [vp, vp, vp, sz]
        mac = lib.EVP_MAC_fetch(None, b"POLY1305", None)
        if not mac:
            raise OSError("OpenSSL has no POLY1305")
        self.ctx = lib.EVP_MAC_CTX_new(mac)
        if not self.ctx:
            raise OSError("EVP_MAC_CTX_new failed")
        self._init, self._update, self._final = lib.EVP_MAC_init, lib.EVP_MAC_update, \
            lib.EVP_MAC_final
        self._out = np.zeros(TAG_LEN, dtype=np.uint8)
        self._outp = self._out.ctypes.data
        self._outl = ctypes.c_size_t()
        self._outlp = ctypes.addressof(self._outl)

    def tag_into(self, key_addr: int, data_addr: int, n: int, out_addr: int) -> None:
        ctx = self.ctx
        if (self._init(ctx, key_addr, KEY_LEN, None) != 1
                or self._update(ctx, data_addr, n) != 1
                or self._final(ctx, out_addr, self._outlp, TAG_LEN) != 1):
            raise OSError("OpenSSL Poly1305 failed")

    def tag(self, key: np.ndarray, data: np.ndarray) -> bytes:
        if (key.dtype != np.uint8 or data.dtype != np.uint8 or len(key) != KEY_LEN
                or not key.flags.c_contiguous or not data.flags.c_contiguous):
            raise ValueError("key and data must be contiguous uint8 arrays, key 32 bytes")
        ctx = self.ctx
        if (self._init(ctx, key.ctypes.data, KEY_LEN, None) != 1
                or self._update(ctx, data.ctypes.data, len(data)) != 1
                or self._final(ctx, self._outp, self._outlp, TAG_LEN) != 1):
            raise OSError("OpenSSL Poly1305 failed")
        return self._out.tobytes()


class _CryptographyPoly1305:
    @staticmethod
    def tag(key: np.ndarray, data: np.ndarray) -> bytes:
        return Poly1305.generate_tag(key, data)


def _load() -> _EvpPoly1305 | _CryptographyPoly1305:
    try:
        return _EvpPoly1305()
    except (OSError, AttributeError):
        return _CryptographyPoly1305()


_impl = _load()
BACKEND = "openssl-evp" if isinstance(_impl, _EvpPoly1305) else "cryptography"


def tag(key: np.ndarray, data: np.ndarray) -> bytes:
    """The 16-byte Poly1305 tag of ``data`` under the one-time ``key`` (32 bytes)."""
    return _impl.tag(key, data)


HAVE_ADDRESSES = BACKEND == "openssl-evp"


def tag_into(key_addr: int, data_addr: int, n: int, out_addr: int) -> None:
    """Address-level form for the hot path (numpy's ``.ctypes.data`` costs 2 us a call):
    the caller guarantees 32 key bytes at ``key_addr``, ``n`` bytes at ``data_addr`` and
    16 writable bytes at ``out_addr``. Only with HAVE_ADDRESSES."""
    _impl.tag_into(key_addr, data_addr, n, out_addr)  # type: ignore[union-attr]


def verify(key: np.ndarray, data: np.ndarray, expected: bytes) -> None:
    """Raise InvalidSignature unless ``expected`` is the tag (compared in constant time)."""
    if not constant_time.bytes_eq(_impl.tag(key, data), bytes(expected)):
        raise InvalidSignature()
