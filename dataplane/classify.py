"""Which packets from a TUN queue are control traffic, served key before bulk (pure).

Key on a real QKD link is scarce: a global key fill or a user's bulk stream can use all
of it. The traffic that keeps the network working must still get key: relay
acknowledgements and reservations (the global key managers mark their sockets with
DSCP CS6, "network control") and bare TCP acknowledgements (a few dozen bytes each,
without which every stream through the tunnel stalls and retransmits, which costs key
twice). Workers let such packets use the ring's control reserve, which bulk packets leave
alone. Everything else is bulk.

The packet starts with the virtio_net_hdr (:data:`dataplane.tun.VNET_HDR_LEN` bytes),
then IPv4. Reading a few header bytes is all this costs per packet.
"""

from __future__ import annotations

from dataplane.tun import VNET_HDR_LEN

DSCP_CS6 = 48  # "network control" (RFC 2474, RFC 4594)
TOS_CONTROL = DSCP_CS6 << 2  # the IP_TOS / ZMQ_TOS value control sockets set
_IP = VNET_HDR_LEN
_TCP = 6
_SYN_FIN_RST = 0x07


def is_control(packet, n: int) -> bool:
    """True for a DSCP CS6 (or above) IPv4 packet, or a bare TCP acknowledgement (no
    payload, no SYN, FIN or RST: those start or end connections and go as bulk)."""
    if n < _IP + 20 or packet[_IP] >> 4 != 4:
        return False
    if packet[_IP + 1] >> 2 >= DSCP_CS6:
        return True  # (a memoryview or bytes gives ints: cheaper than numpy items)
    if packet[_IP + 9] != _TCP:
        return False
    ihl = (packet[_IP] & 0x0F) * 4
    tcp = _IP + ihl
    if ihl < 20 or n < tcp + 20:
        return False
    total = (int(packet[_IP + 2]) << 8) | int(packet[_IP + 3])
    doff = (packet[tcp + 12] >> 4) * 4
    return bool(total == ihl + doff and not packet[tcp + 13] & _SYN_FIN_RST)
