"""TUN devices through the kernel's ioctl interface: a persistent multi-queue device per
QKD link, and one queue fd per OTP worker (each queue can live in its own process)."""

from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
FLAGS = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE


class TunError(Exception):
    pass


def _ifreq(name: str, flags: int) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < 16:
        raise TunError(f"interface name {name!r} must be 1-15 bytes")
    return struct.pack("16sH", raw, flags)


def open_queue(name: str, nonblocking: bool = True) -> int:
    """Open one queue of multi-queue TUN ``name`` (created if missing); returns its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | (os.O_NONBLOCK if nonblocking else 0))
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, FLAGS))
    except OSError as e:
        os.close(fd)
        raise TunError(f"cannot attach a queue to TUN {name}: {e.strerror}") from None
    return fd


def create_persistent(name: str) -> None:
    """Make ``name`` a persistent multi-queue TUN, so it outlives worker restarts."""
    fd = open_queue(name, nonblocking=False)
    try:
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)
