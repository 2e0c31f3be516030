"""Who may speak on the global key relay: CurveZMQ on every relay socket, and the ZAP
decision of the destination's ROUTER, without I/O.

Every key manager has one CURVE keypair (``control.gkm.relay_keys``). Its DEALERs connect
with that keypair and the destination's public key, so the handshake proves both ends:
the destination knows the client holds an origin's secret key, the origin knows it talks
to the destination's key manager (ACK and RESERVED come back authenticated). Every
message after the handshake is encrypted and authenticated (crypto_box, with nonces that
refuse replays). The destination's ROUTER is the CURVE server; ZeroMQ asks its ZAP
handler (``zap_reply``, served from the key manager's own poll loop) about each client
key, and the handler accepts only the nodes that originate global key for this node,
each from its own node address, naming the node as the connection's User-Id. Messages
are attributed by that User-Id, never by what they claim.

ZAP (ZeroMQ RFC 27): request frames version "1.0", request id, domain, address,
identity, mechanism, then the credentials (CURVE: the client's 32-byte public key);
reply frames version, request id, status code ("200" or "400"), status text, user id,
metadata.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import zmq

from control.gkm.relay_keys import RelayKeys
from dataplane.limits import MAX_RELAY_FRAME, MAX_RELAY_REPLY_FRAME

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks, in the server's context
ZAP_VERSION = b"1.0"
DOMAIN = b"qkdnet-relay"


@dataclass(frozen=True)
class ZapDecision:
    reply: list[bytes]
    node: str | None  # the authenticated node; None: refused
    reason: str       # why refused ("" when accepted)


def zap_reply(frames: list[bytes], origins: dict[bytes, tuple[str, str]]) -> ZapDecision:
    """The answer to one ZAP request. ``origins``: raw public key -> (node, its node
    address) for every node that may send to this one."""
    request_id = frames[1] if len(frames) > 1 else b""

    def refuse(why: str, code: bytes = b"400") -> ZapDecision:
        return ZapDecision([ZAP_VERSION, request_id, code, why.encode()[:200], b"", b""],
                           None, why)

    if len(frames) < 6 or frames[0] != ZAP_VERSION:
        return refuse("malformed ZAP request", b"500")
    domain, address, mechanism, creds = frames[2], frames[3], frames[5], frames[6:]
    peer = address.decode(errors="replace")
    if domain != DOMAIN:
        return refuse(f"ZAP domain {domain[:40]!r} is not the relay's")
    if mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
        return refuse(f"a connection from {peer} without a CURVE key")
    known = origins.get(creds[0])
    if known is None:
        return refuse(f"a connection from {peer} with a key of no node that sends here")
    node, node_address = known
    if peer != node_address:
        return refuse(f"node {node}'s key from {peer}, not from its node address "
                      f"{node_address}")
    return ZapDecision([ZAP_VERSION, request_id, b"200", b"OK", node.encode(), b""], node, "")


def secure_router(sock: zmq.Socket, keys: RelayKeys) -> None:
    """Make ``sock`` (before it binds) the CURVE server of this node's relay, whose
    clients the ZAP handler in the same context admits, and cap its frames."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN)
    # Without a ZAP handler libzmq would admit every client key: refuse instead (libzmq
    # 4.3 and newer; the handler is bound before the ROUTER anyway).
    with contextlib.suppress(AttributeError, zmq.ZMQError):
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_RELAY_FRAME)


def secure_dealer(sock: zmq.Socket, keys: RelayKeys, server: str) -> None:
    """Make ``sock`` (before it connects) a CURVE client of node ``server``'s relay."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.peers[server])
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_RELAY_REPLY_FRAME)
