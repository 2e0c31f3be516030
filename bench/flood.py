"""The forged-datagram flood of `qkdctl bench guard`, run inside the attacker's namespace:
``python -m bench.flood --seconds S --dst IP --port-lo P --ports N --peer IP``.

Three kinds in turn, as an attacker on the underlay could send them to a link end's tunnel
ports: from its own (foreign) address; from the peer's address (spoofed, raw socket) with
a malformed header; from the peer's address with a well-formed header naming a key position
the receiver has long passed (a replay of old traffic). With ``--ahead-ring``, one kind
instead: well-formed, from the peer's address, naming key just beyond what the receiver
has stored (positions an attacker reads off the underlay, where headers are clear): a
worker that waited for such key would stall. Prints one JSON line: what it sent.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import time

import numpy as np

from dataplane import wire

IP_HDR = struct.Struct("!BBHHHBBH4s4s")
UDP_HDR = struct.Struct("!HHHH")


def spoofed(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4+UDP packet for a raw socket (the kernel fills the IP checksum and id; a
    zero UDP checksum means none, which IPv4 allows)."""
    udp = UDP_HDR.pack(sport, dport, UDP_HDR.size + len(payload), 0)
    total = IP_HDR.size + len(udp) + len(payload)
    ip = IP_HDR.pack(0x45, 0, total, 0, 0, 64, socket.IPPROTO_UDP, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return ip + udp + payload


def stale_datagram(size: int, link: int, direction: int, lane: int) -> bytes:
    """Well-formed framing at position 0 (long released) with a random tag."""
    return ahead_datagram(size, link, direction, lane, 0)


def ahead_datagram(size: int, link: int, direction: int, lane: int, pos: int,
                   flags: int = 0) -> bytes:
    """Well-formed framing naming key at ``pos`` with a random tag (``flags``:
    wire.FLAG_CONTROL for a keepalive's)."""
    n = max(0, size - wire.OVERHEAD)
    buf = np.zeros(wire.datagram_len(n), dtype=np.uint8)
    wire.HEADER.pack_into(buf, 0, wire.VERSION, flags, direction, lane, link, 0, pos, 0, n, 0)
    buf[wire.HEADER_LEN + n:] = np.frombuffer(os.urandom(wire.TAG_LEN), np.uint8)
    return buf.tobytes()


def flood_control(src: str, dst: str, port: int, link: int, direction: int, ring: str,
                  pps: float, seconds: float, size: int = 112, stop=None) -> dict:
    """From the peer's own address (``src``, bound in the caller's namespace): control-lane
    datagrams naming fresh positions inside the key the receiver has stored (its DEC
    ``ring``), above its control lane's floor: nothing but the MAC can refuse them, so the
    guard lets every one through to the tunnel manager. ``pps`` a second for ``seconds``
    (or until ``stop`` is set); returns what was sent and how fast."""
    from dataplane.ring import CONTROL_LANE, KeyRing

    r = KeyRing.attach(ring)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    body = bytearray(ahead_datagram(size, link, direction, CONTROL_LANE, 0,
                                    wire.FLAG_CONTROL))
    sent = errors = 0
    t0 = time.monotonic()
    end = t0 + seconds
    try:
        while (now := time.monotonic()) < end and not (stop is not None and stop.is_set()):
            lo = max(r.lane_next(CONTROL_LANE), r.release_pos)
            span = r.write_pos - 4096 - lo  # what a keepalive may still name, less a margin
            target = int((now - t0) * pps)
            while sent + errors < target:
                pos = lo + 4096 + (sent * 97) % max(1, span) if span > 0 else lo
                wire.HEADER.pack_into(body, 0, wire.VERSION, wire.FLAG_CONTROL, direction,
                                      CONTROL_LANE, link, 0, pos, 0, size - wire.OVERHEAD, 0)
                try:
                    s.sendto(body, (dst, port))
                    sent += 1
                except OSError:  # ENOBUFS under load: counted, the flood goes on
                    errors += 1
            time.sleep(0.0005)
    finally:
        r.close()
        s.close()
    took = time.monotonic() - t0
    return {"sent": sent, "errors": errors, "seconds": round(took, 2),
            "pps": round(sent / took) if took else 0}


def flood_ahead(a, raw: socket.socket, ports: list[int]) -> dict:
    """Datagrams naming the key just beyond the receiving ring's write position, on every
    lane of every worker port, following the ring as key is stored."""
    from dataplane.ring import CONTROL_LANE, KeyRing

    ring = KeyRing.attach(a.ahead_ring)
    lanes = [(lane, ports[lane % len(ports)]) for lane in range(CONTROL_LANE)]
    built: list = [-1, []]  # (write position, its batch): built once per position, so the
    # flood's own CPU stays small

    def batch() -> list[bytes]:
        w = ring.write_pos
        if w != built[0]:
            built[:] = [w, [spoofed(a.peer, a.dst, 40000, port,
                                    ahead_datagram(a.size, a.link, a.direction, lane,
                                                   w + 4096 * (1 + k)))
                            for k, (lane, port) in enumerate(lanes)]]
        return built[1]

    try:
        sent, errors = _paced(a, raw, batch)
    finally:
        ring.close()
    return {"sent": {"ahead": sent}, "errors": errors}


def flood_stale(a, raw: socket.socket, ports: list[int]) -> dict:
    """Well-formed replays of released key positions only, paced like the flood naming key
    ahead: the guard drops each at first sight, so this is what a flood of that rate costs
    the machine (the flood process, A's forwarding, the XDP program) without any of the
    workers' handling: the control beside the ahead point."""
    stale = [spoofed(a.peer, a.dst, 40000, port, stale_datagram(a.size, a.link, a.direction, i))
             for i, port in enumerate(ports)]
    sent, errors = _paced(a, raw, lambda: stale * max(1, 16 // len(stale)))
    return {"sent": {"stale": sent}, "errors": errors}


def _paced(a, raw: socket.socket, batch) -> tuple[int, int]:
    """Send ``batch()`` again and again for ``a.seconds``, at most ``a.pps`` a second;
    (sent, send errors)."""
    sent, errors = 0, 0
    start = time.monotonic()
    end = start + a.seconds
    while (now := time.monotonic()) < end:
        if a.pps and sent > (now - start) * a.pps:
            time.sleep(0.001)
            continue
        for data in batch():
            try:
                raw.sendto(data, (a.dst, 0))
            except OSError:  # ENOBUFS under load: counted, the flood goes on
                errors += 1
                continue
            sent += 1
    return sent, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--src", required=True, help="the attacker's own address")
    ap.add_argument("--peer", required=True, help="the address to spoof (the link's peer)")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--port-lo", type=int, required=True)
    ap.add_argument("--ports", type=int, required=True, help="worker ports after port-lo")
    ap.add_argument("--link", type=int, default=0)
    ap.add_argument("--direction", type=int, default=0)
    ap.add_argument("--size", type=int, default=128, help="UDP payload bytes")
    ap.add_argument("--ahead-ring", help="the receiver's DEC ring: flood key just beyond it")
    ap.add_argument("--pps", type=float, default=0.0, help="at most this many a second (0: "
                                                          "as fast as it can)")
    ap.add_argument("--stale-only", action="store_true",
                    help="only replays of released positions (paced by --pps)")
    a = ap.parse_args()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind((a.src, 0))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    ports = [a.port_lo + 1 + i for i in range(a.ports)]
    if a.ahead_ring:
        out = flood_ahead(a, raw, ports)
        print(json.dumps({**out, "seconds": a.seconds, "size": a.size}))
        return
    if a.stale_only:
        out = flood_stale(a, raw, ports)
        print(json.dumps({**out, "seconds": a.seconds, "size": a.size}))
        return
    junk = os.urandom(a.size)
    kinds = []
    for i, port in enumerate(ports):
        kinds.append(("foreign", (junk, (a.dst, port))))
        kinds.append(("malformed", (spoofed(a.peer, a.dst, 40000, port, junk), (a.dst, 0))))
        stale = stale_datagram(a.size, a.link, a.direction, i)
        kinds.append(("stale", (spoofed(a.peer, a.dst, 40000, port, stale), (a.dst, 0))))
    sent = dict.fromkeys(("foreign", "malformed", "stale"), 0)
    errors = 0
    end = time.monotonic() + a.seconds
    plain_send, raw_send = plain.sendto, raw.sendto
    while time.monotonic() < end:
        for kind, (data, to) in kinds:
            for _ in range(64):
                try:
                    (plain_send if kind == "foreign" else raw_send)(data, to)
                except OSError:  # ENOBUFS under load: counted, the flood goes on
                    errors += 1
                    continue
                sent[kind] += 1
    print(json.dumps({"sent": sent, "errors": errors, "seconds": a.seconds,
                      "size": a.size}))


if __name__ == "__main__":
    main()
