"""Tests of dataplane/classify.py: which TUN packets get key before bulk."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from dataplane.classify import TOS_CONTROL, is_control
from dataplane.tun import VNET_HDR_LEN


def ipv4(proto: int, payload: bytes, tos: int = 0, ihl: int = 5) -> bytes:
    total = ihl * 4 + len(payload)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, 1, 0, 64, proto, 0,
                      bytes([10, 88, 0, 1]), bytes([10, 88, 0, 2]))
    return hdr + bytes(ihl * 4 - 20) + payload


def tcp(flags: int, data: bytes = b"", doff: int = 5) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 7200, 1, 2, doff << 4, flags, 65535, 0, 0) \
        + bytes(doff * 4 - 20) + data


def packet(ip: bytes) -> memoryview:
    """As a worker holds it: a memoryview of its buffer, with room after the packet."""
    return memoryview(np.frombuffer(bytes(VNET_HDR_LEN) + ip + bytes(64), np.uint8))


ACK, PSH, SYN, FIN, RST = 0x10, 0x08, 0x02, 0x01, 0x04


@pytest.mark.parametrize("ip,control", [
    (ipv4(6, tcp(ACK)), True),                      # a bare acknowledgement
    (ipv4(6, tcp(ACK, doff=8)), True),              # ... with options (timestamps, SACK)
    (ipv4(6, tcp(ACK, doff=8), ihl=6), True),       # ... and IP options
    (ipv4(6, tcp(ACK | PSH, b"x" * 100)), False),   # data: bulk
    (ipv4(6, tcp(ACK | PSH, b"x")), False),         # one byte of data is still data
    (ipv4(6, tcp(SYN)), False),                     # connection set-up: bulk
    (ipv4(6, tcp(ACK | FIN)), False),
    (ipv4(6, tcp(ACK | RST)), False),
    (ipv4(6, tcp(ACK | PSH, b"x" * 1000), tos=TOS_CONTROL), True),   # marked control
    (ipv4(6, tcp(ACK | PSH, b"x" * 1000), tos=0xE0), True),          # CS7 too
    (ipv4(6, tcp(ACK | PSH, b"x" * 1000), tos=0xB8), False),         # EF is not control
    (ipv4(17, b"\x00" * 8 + b"udp"), False),
    (ipv4(17, b"\x00" * 8, tos=TOS_CONTROL), True),
    (ipv4(1, b"\x08\x00" + bytes(6)), False),       # ping: bulk
])
def test_control_or_bulk(ip, control):
    p = packet(ip)
    assert is_control(p, VNET_HDR_LEN + len(ip)) is control


def test_short_or_foreign_packets_are_bulk():
    ack = ipv4(6, tcp(ACK))
    assert not is_control(packet(ack), VNET_HDR_LEN + 19)       # shorter than an IP header
    assert not is_control(packet(ack), VNET_HDR_LEN + 20 + 10)  # TCP header cut
    v6 = bytearray(packet(ack))
    v6[VNET_HDR_LEN] = 0x60
    assert not is_control(memoryview(bytes(v6)), VNET_HDR_LEN + len(ack))
    bad_ihl = bytearray(packet(ack))
    bad_ihl[VNET_HDR_LEN] = 0x43  # IHL 12 bytes: not a valid header
    assert not is_control(memoryview(bytes(bad_ihl)), VNET_HDR_LEN + len(ack))
