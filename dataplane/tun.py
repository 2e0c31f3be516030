"""TUN devices through the kernel's ioctl interface: a persistent multi-queue device per
QKD link, and one queue fd per OTP worker (each queue can live in its own process).

Checksum offload: the TUN carries a 10-byte ``virtio_net_hdr`` before every packet
(IFF_VNET_HDR) and offers TUN_F_CSUM, so TCP hands it packets without computing their
checksum (``NEEDS_CSUM`` with its start and offset) and the receiving end writes them back
the same way, where the kernel takes them as checked. The one-time MAC protects every
packet far better than a checksum; the two passes over each 64 KiB packet it saves are
worth 25% of direct throughput here. The header travels inside the encrypted payload.
No segmentation offload (TSO) is offered, so no packet exceeds the MTU.
"""

from __future__ import annotations

import fcntl
import os
import struct

from dataplane.wire import MAX_PAYLOAD

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
VNET_HDR_LEN = 10  # struct virtio_net_hdr before every packet read or written
FLAGS = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR
VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID = 0x01, 0x02
VNET_GSO_NONE = 0


MAX_MTU = MAX_PAYLOAD - VNET_HDR_LEN  # the largest packet one datagram carries


def vnet_header_ok(payload) -> bool:
    """A peer's virtio_net_hdr we write to our TUN: checksum flags only, no segmentation
    (never asked for, so never accepted)."""
    return (len(payload) > VNET_HDR_LEN and int(payload[1]) == VNET_GSO_NONE
            and not int(payload[0]) & (0xFF ^ (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID)))


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
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
    finally:
        os.close(fd)
