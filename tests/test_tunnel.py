"""The OTP tunnel dataplane end to end: real namespaces, veths, TUN devices, worker pools,
key managers and routers (issue 2/6)."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import random
import signal
import struct
import subprocess
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bench import topology
from control.core import paths
from control.core.config import parse_topology
from control.tools import emulation
from dataplane import wire
from dataplane.bpf.guard import DROP_REASONS
from dataplane.limits import LINK_DEAD_S
from dataplane.ring import CONTROL_LANE, KeyRing
from dataplane.tun import VNET_HDR_LEN
from dataplane.worker import AUDIT_ACCEPTED, AUDIT_CLAIM, AUDIT_SENT, read_audit
from tests.nsutil import (
    QKDCTL,
    ROUTES_S,
    InNetns,
    add_address,
    link_stats,
    ping,
    router_state,
    routes_complete,
    run_in_netns,
    set_link,
    tcp_sink,
    tcp_source,
    tunnel_state,
    udp_collect,
    udp_send_all,
    wait_until,
)

pytestmark = pytest.mark.netns

def net_text(prefix: str, *, triangle: bool = False, two: bool = False, ring: str = "32MiB",
             key_wait_ms: int | None = 100, gkm: str | None = None, key_rate: int = 400,
             extra: str = "", guard: str | None = "auto") -> str:
    """TOML of A - B - C (``two``: A - B; ``triangle``: A-C too), each link an unthrottled
    AES-CTR emulator and its underlay in 10.211.<i>.0/30, two workers per link end;
    ``gkm``: the [gkm] section's TOML (by default no global key); ``extra``: TOML appended
    (SAEs, [api]); ``key_wait_ms``, ``guard``: None leaves the setting out."""
    source = {"generator": "aes-ctr"}
    graph = (topology.triangle(211, source=source) if triangle
             else topology.line("AB" if two else "ABC", 211, source=source))
    dataplane = {"workers": 2, "key_wait_ms": key_wait_ms, "guard": guard,
                 "chunk_size": "256KiB"}
    net = topology.network(
        "test-otp", prefix,
        defaults={"key_rate_mbps": key_rate, "block_size": "256KiB", "ring_capacity": ring},
        ports={"agreement": 7401},
        dataplane={k: v for k, v in dataplane.items() if v is not None},
        gkm=tomllib.loads(gkm) if gkm is not None else {"pairs": []})
    return topology.render(net, graph) + extra


def make_net(tmp_path: Path, prefix: str, triangle: bool = False, two: bool = False,
             ring: str = "32MiB", key_wait_ms: int = 100, gkm: str | None = None,
             key_rate: int = 400, extra: str = "", guard: str = "auto"):
    """Bring up ``net_text``'s network and wait for every node's routes."""
    text = net_text(prefix, triangle=triangle, two=two, ring=ring, key_wait_ms=key_wait_ms,
                    gkm=gkm, key_rate=key_rate, extra=extra, guard=guard)
    path = tmp_path / f"{prefix}.toml"
    path.write_text(text)
    topo = parse_topology(text, path)
    man = emulation.net_up(topo)
    wait_until(lambda: routes_complete(prefix, list(topo.nodes)), ROUTES_S,
               "routes at every node")
    return topo, man


def ns(prefix: str, node: str) -> str:
    return paths.netns_name(prefix, node)


def addr(topo, node: str) -> str:
    return str(topo.node(node).address)


def send_tcp(topo, src: str, dst: str, data: bytes, port: int = 5001) -> dict:
    p = topo.prefix
    sink = InNetns(ns(p, dst), tcp_sink, addr(topo, dst), port, 30.0)
    try:
        run_in_netns(ns(p, src), tcp_source, addr(topo, src), addr(topo, dst), port, data,
                     30.0, timeout=60)
        return sink.result(60)
    finally:
        sink.kill()


# ---- traffic ---------------------------------------------------------------------------

def test_ping_and_tcp_through_one_link_and_via_a_relay(tmp_path, prefix):
    topo, _ = make_net(tmp_path, prefix)
    assert router_state(prefix, "A")["routes"]["C"]["via"] == "A-B"  # the only way
    assert ping(ns(prefix, "A"), addr(topo, "B"), src=addr(topo, "A"))
    assert ping(ns(prefix, "A"), addr(topo, "C"), src=addr(topo, "A"))  # via B
    # Forwarding only between tunnels: not from the underlay; node addresses without a
    # tunnel route are unreachable, never sent in clear along another route.
    assert run_in_netns(ns(prefix, "B"), _read_proc, "sys/net/ipv4/conf/ul0/forwarding") == "0"
    assert run_in_netns(ns(prefix, "B"), _read_proc, "sys/net/ipv4/conf/otp0/forwarding") == "1"
    assert "unreachable 10.88.0.0/24" in subprocess.run(
        ["ip", "netns", "exec", ns(prefix, "A"), "ip", "route"], capture_output=True,
        text=True).stdout
    relay_before = tunnel_state(prefix, "B", "B-C")["counters"]["tx_bytes"]
    for dst in ("B", "C"):
        data = os.urandom(6 << 20)
        got = send_tcp(topo, "A", dst, data)
        assert got["bytes"] == len(data), f"A->{dst}: bytes lost"
        assert got["sha256"] == hashlib.sha256(data).hexdigest(), f"A->{dst}: corrupted"
        assert got["peer"] == addr(topo, "A")
    # The relay decrypted with the A-B key and encrypted again with the B-C key.
    wait_until(lambda: tunnel_state(prefix, "B", "B-C")["counters"]["tx_bytes"]
               >= relay_before + (6 << 20), 5, "relay counters")
    a = tunnel_state(prefix, "A", "A-B")["counters"]
    assert a["tx_key"] >= a["tx_bytes"] + 32 * a["tx_pkts"]  # pad + one-time MAC key each
    # qkdctl status shows the tunnels and the routes.
    res = subprocess.run([QKDCTL, "status", str(topo.path), "--json"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    snap = json.loads(res.stdout)
    tun = snap["nodes"]["A"]["tunnels"]["A-B"]
    assert tun["up"] and tun["counters"]["tx_pkts"] > 0
    assert snap["nodes"]["A"]["router"]["routes"]["C"]["dev"] == "otp0"


def _read_proc(rel: str) -> str:
    return Path("/proc", rel).read_text().strip()


def _pcap_payloads(data: bytes, udp_only: bool = True) -> list[bytes]:
    """UDP payloads (or whole frames) of an Ethernet pcap file."""
    out = []
    off = 24
    while off + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < 14 + 20 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        if udp_only and frame[14 + 9] == 17:
            out.append(frame[14 + ihl + 8:])
        elif not udp_only:
            out.append(frame)
    return out


class Capture:
    def __init__(self, netns: str, ifname: str, path: Path, filt: str = ""):
        self.path = path
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "tcpdump", "-i", ifname, "-U", "-s", "0", "-n",
             "-B", "65536", "-w", str(path), *filt.split()], stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "listening on ..."
        assert "listening" in line, line
        time.sleep(0.5)  # it says so a moment before it really captures

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        return self.path.read_bytes()


def test_underlay_never_carries_the_plaintext(tmp_path, prefix):
    topo, _ = make_net(tmp_path, prefix, two=True)
    pattern = b"QKDNET-KNOWN-PLAINTEXT-PATTERN!!"  # 32 bytes
    ul = Capture(ns(prefix, "A"), "ul0", tmp_path / "ul.pcap")
    tun = Capture(ns(prefix, "A"), "otp0", tmp_path / "tun.pcap")
    got = send_tcp(topo, "A", "B", pattern * (1 << 15))  # 1 MiB of the pattern
    assert got["bytes"] == 32 << 15
    assert ping(ns(prefix, "A"), addr(topo, "B"), count=3, pattern=pattern[:16].hex(),
                size=1000)
    time.sleep(0.3)
    under, inside = ul.stop(), tun.stop()
    # The control: inside the tunnel the pattern is there in clear, so the test can fail.
    assert inside.count(pattern) > 1000
    assert pattern[:16] in inside.replace(pattern, b"")  # the ping's payload
    assert min(len(under), len(inside)) > (512 << 10), "the captures saw too little"
    assert pattern[:16] not in under and pattern[16:] not in under
    # Every tunnel datagram on the underlay is in the wire format, naming its key.
    for d in _pcap_payloads(under):
        hdr = wire.parse(d, len(d), link=0, direction=wire.HEADER.unpack_from(d)[2])
        assert hdr.pos >= hdr.release


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (by a signal) now, or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "T"


def test_a_pad_running_into_wiped_key_is_never_sent(tmp_path, prefix):
    """Key wiped inside a worker's held range, a little above what it has used (a bug's
    trace: a dead chunk's give-up once wiped key like this): the packet whose pad runs
    into it starts on key, so its one-time MAC key is fine, but the rest of it would be
    XORed with zeros, in clear on the underlay. The worker checks both ends of every pad:
    that packet is dropped, the range given up, and the stream goes on."""
    topo, _ = make_net(tmp_path, prefix, two=True)
    na, nb = ns(prefix, "A"), ns(prefix, "B")
    wait_until(lambda: all((tunnel_state(prefix, n, "A-B") or {}).get("up") for n in "AB"),
               30, "the link up at both ends")
    downs = {n: tunnel_state(prefix, n, "A-B")["liveness"]["downs"] for n in "AB"}
    pattern = b"QKDNET-KNOWN-PLAINTEXT-PATTERN!!"  # 32 bytes
    ul = Capture(na, "ul0", tmp_path / "ul.pcap")
    packet, count = pattern * 62, 6_000  # 1,984 B every 0.5 ms or so: 3-6 s
    listener = InNetns(nb, udp_collect, addr(topo, "B"), 9999, 15.0)
    sender = InNetns(na, udp_send_all, addr(topo, "A"), addr(topo, "B"), 9999,
                     [packet] * count, 0.0005)
    ahead = 12 << 10  # beyond the pad a worker may be using (about 2 KB)
    workers = [w["pid"] for w in tunnel_state(prefix, "A", "A-B")["workers"]]
    assert workers
    ring = KeyRing.attach(paths.ring_name(prefix, "A", "A-B", "ab"))
    try:
        def long_range() -> tuple[int, int] | None:
            """A held range with room for the margin and a few pads: (wipe from, end)."""
            for lane in range(CONTROL_LANE):
                _, used, end = ring.chunk_of(lane)
                if end - used >= ahead + (8 << 10):
                    return used + ahead, end
            return None

        def wipe_in_a_held_range() -> tuple[int, int] | None:
            if long_range() is None:
                return None
            # Held still, a worker uses no key beyond its range's published used mark
            # but the one pad it may be sealing (marked after use). The ring lock first
            # (a worker stopped while it held it would hold it for good), then no claim
            # or give-up moves until it is let go.
            ring._lock()
            try:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                wait_until(lambda: all(_stopped(pid) for pid in workers), 10,
                           "A's workers to stop", step=0.001)
                found = long_range()
                if found is not None:
                    ring._wipe(*found)
                return found
            finally:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
                ring._unlock()
        wiped = wait_until(wipe_in_a_held_range, 10, "a worker holding a long range",
                           step=0.005)
        wait_until(lambda: ring.claim_pos > wiped[1] and ring.release_pos >= wiped[1], 10,
                   "the range with wiped key given up")
    finally:
        ring.close()
    assert sender.result(60) == count
    got = listener.result(40)
    under = ul.stop()
    assert len(under) > (6 << 20), "the capture saw too little"
    assert pattern not in under and pattern[:16] not in under
    assert len(got) > count // 2 and set(got) == {packet}
    for n in "AB":
        st = tunnel_state(prefix, n, "A-B")
        assert st["liveness"]["downs"] == downs[n], (n, st["liveness"])
    said = "".join(f.read_text() for f in paths.log_dir(prefix).glob("*.log"))
    assert "wiped key at position" in said


# ---- an active attacker in the underlay ---------------------------------------------------

def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    total = 20 + 8 + len(payload)
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, random.randrange(65536), 0, 64, 17, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    s = sum(struct.unpack(">10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hdr = hdr[:10] + struct.pack(">H", ~s & 0xFFFF) + hdr[12:]
    return hdr + struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


def _seal_with_real_key(ring: KeyRing, lane: int, packets: list[bytes]) -> list[bytes]:
    """Datagrams A could send: key from one chunk of A's ENC ring claimed on a lane of our
    own. The caller gives the chunk up (retire) only when done: until then A's release
    point, and so B's, stays below it."""
    total = sum(wire.pad_len(len(p)) for p in packets)
    pos, take = ring.claim_chunk(lane, total)
    assert take == total, "no key at A"
    out = []
    for pkt in packets:
        need = wire.pad_len(len(pkt))
        buf = np.zeros(wire.datagram_len(len(pkt)), dtype=np.uint8)
        buf[wire.HEADER_LEN:wire.HEADER_LEN + len(pkt)] = np.frombuffer(pkt, np.uint8)
        n = wire.seal(buf, len(pkt), ring.read(pos, need).copy(), link=0, direction=0,
                      lane=lane, pos=pos, release=ring.release_pos)
        out.append(buf[:n].tobytes())
        pos += need
    return out


@pytest.mark.parametrize("guard", ["auto", "off"], ids=["xdp-guard", "no-bpf"])
def test_forged_replayed_reordered_truncated_flipped_datagrams_never_reach_the_tun(
        tmp_path, prefix, guard):
    """With the XDP guard, what it can judge from the header (foreign source, bad framing,
    a position already passed) never reaches a worker; without BPF the workers drop the
    same datagrams. Either way only the one fresh authentic datagram reaches the TUN."""
    topo, _ = make_net(tmp_path, prefix, two=True, guard=guard)
    na, nb = ns(prefix, "A"), ns(prefix, "B")
    ul_a, ul_b = str(topo.link("A-B").underlay_a.ip), str(topo.link("A-B").underlay_b.ip)
    port0 = topo.ports.tunnel + 1  # B's worker 0
    state = wait_until(lambda: (tunnel_state(prefix, "B", "A-B") or {}).get("guard"), 10,
                       "B's guard state")
    if guard == "off":
        assert state["state"] == "off" and "topology" in state["reason"]
    else:
        assert state["state"] == "on" and state["mode"] in ("native", "generic"), state
        assert state["interface"] == "ul0"
    # Genuine traffic, captured on the wire at B.
    cap = Capture(nb, "ul0", tmp_path / "b.pcap", f"udp and src host {ul_a}")
    assert ping(na, addr(topo, "B"), count=10, size=600)
    time.sleep(0.3)
    genuine = [d for d in _pcap_payloads(cap.stop()) if d[3] != CONTROL_LANE]
    assert len(genuine) >= 2  # tcpdump may miss the first few
    time.sleep(0.5)

    def b_counters() -> dict:
        return tunnel_state(prefix, "B", "A-B")["counters"]

    def b_guard() -> dict:
        return {r: c["packets"] for r, c in
                (tunnel_state(prefix, "B", "A-B")["guard"].get("counts") or {}).items()}

    lane = 62  # a lane no worker of A uses; 62 % 2 == 0: B's worker 0 takes it
    listener = InNetns(nb, udp_collect, addr(topo, "B"), 9999, 4.0)
    time.sleep(0.3)
    no_offload = bytes(VNET_HDR_LEN)  # the virtio_net_hdr every tunnel payload starts with
    pkts = [no_offload + _ipv4_udp(addr(topo, "A"), addr(topo, "B"), 4000, 9999,
                                   f"legit {i}".encode()) for i in range(5)]
    pkts[4] = b"\x00\x01" + pkts[4][2:]  # asks for segmentation: refused even if authentic
    enc_a = KeyRing.attach(paths.ring_name(prefix, "A", "A-B", "ab"))
    d1, d2, d3, d4, d5 = _seal_with_real_key(enc_a, lane, pkts)
    flip_body = bytearray(d3)
    flip_body[40] ^= 0x01
    flip_tag = bytearray(d3)
    flip_tag[-1] ^= 0x80
    flip_pos = bytearray(d3)
    flip_pos[15] ^= 0x01  # the position: another pad, so another MAC key
    forged = bytearray(d4)
    forged[wire.HEADER_LEN:-wire.TAG_LEN] = os.urandom(len(d4) - wire.OVERHEAD)
    forged[-wire.TAG_LEN:] = os.urandom(wire.TAG_LEN)
    other_link = bytearray(d4)
    other_link[5] = 7
    foreign = "10.254.254.1"  # an address on A's underlay veth that is not the peer's
    run_in_netns(na, add_address, "ul0", foreign)
    before_tun = run_in_netns(nb, link_stats, "otp0")
    before, before_guard = b_counters(), b_guard()
    for d in genuine:  # replayed from the wire, each to the worker of its own lane
        run_in_netns(na, udp_send_all, ul_a, ul_b, topo.ports.tunnel + 1 + d[3] % 2, [d], 0)
    attack = [
        d2,                    # fresh and genuine: delivered (and d1 is now behind it)
        d1,                    # reordered: older than what its lane accepted
        d2,                    # replayed
        d3[:-1],               # truncated
        d3[:30],               # shorter than a header
        bytes(flip_body),      # bit flips
        bytes(flip_tag),
        bytes(flip_pos),
        bytes(forged),         # forged body and tag
        bytes(other_link),     # moved to another link
        d5,                    # authentic, but with a virtio_net_hdr we never accept
    ]
    run_in_netns(na, udp_send_all, ul_a, ul_b, port0, attack, 0.02)
    # Fresh and genuine, but not from the peer's underlay address: refused before parsing.
    run_in_netns(na, udp_send_all, foreign, ul_b, port0, [d4], 0.0)
    time.sleep(1.0)
    enc_a.retire(lane)
    enc_a.close()
    received = listener.result(10)
    after_tun = run_in_netns(nb, link_stats, "otp0")
    time.sleep(0.6)  # the guard's counters in B's status
    after, after_guard = b_counters(), b_guard()
    assert received == [b"legit 1"], "only the one fresh genuine datagram may be delivered"
    assert after_tun["rx_packets"] - before_tun["rx_packets"] == 1
    delta = {k[len("drop_rx_"):]: after[k] - before[k] for k in after if k.startswith("drop_rx")}
    xdp = {r: after_guard.get(r, 0) - before_guard.get(r, 0) for r in DROP_REASONS}
    seen = {r: delta[r] + xdp.get(r, 0) for r in delta}  # by the guard or the workers
    stale = delta["replay"] + delta["old"] + xdp.get("stale", 0)
    assert stale >= len(genuine) + 2
    assert delta["mac"] >= 3  # body flip, tag flip, forged: only the MAC check can tell
    assert delta["vnet"] == 1
    if guard == "off":
        assert not any(xdp.values()) and not after_guard
        assert delta["length"] >= 1 and delta["short"] >= 1 and delta["link"] >= 1
        assert delta["source"] == 1
    else:  # judged from the header alone: never reached a worker
        assert xdp["source"] == 1 and delta["source"] == 0
        assert xdp["malformed"] >= 3  # truncated, short, moved to another link
        assert delta["length"] == delta["short"] == delta["link"] == 0
        assert xdp["stale"] >= len(genuine) - 2  # (the worker's floor lags a flush behind)
    dropped = sum(delta.values()) + sum(xdp.values())
    assert dropped == len(genuine) + len(attack) - 1 + 1, (delta, xdp)
    assert seen["mac"] >= 3


# ---- crashes: no pad position twice -------------------------------------------------------

def _audits(d: Path, tag: str) -> dict[str, list[tuple[int, int, int]]]:
    return {p.name: read_audit(p) for p in d.glob(f"A-B-{tag}-*.audit")}


def _assert_disjoint(ranges: list[tuple[int, int]], what: str) -> None:
    ranges = sorted(ranges)
    for (s1, n1), (s2, _) in zip(ranges, ranges[1:], strict=False):
        assert s1 + n1 <= s2, f"{what}: [{s1}, {s1 + n1}) overlaps one at {s2}"


def test_killed_worker_and_node_never_reuse_a_pad_position(tmp_path, prefix, monkeypatch):
    audit = tmp_path / "audit"
    monkeypatch.setenv("QKDNET_AUDIT_DIR", str(audit))
    topo, man = make_net(tmp_path, prefix, two=True)
    na = ns(prefix, "A")

    def traffic(n: int) -> None:
        for _ in range(n):
            got = send_tcp(topo, "A", "B", os.urandom(1 << 20))
            assert got["bytes"] == 1 << 20

    traffic(2)
    st = tunnel_state(prefix, "A", "A-B")
    victim = st["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (s := tunnel_state(prefix, "A", "A-B"))
               and s["workers"][0]["restarts"] >= 1 and s["workers"][0]["alive"]
               and s["workers"][0]["pid"] != victim, 10, "the worker to be restarted")
    traffic(2)
    # Kill -9 the whole node, mid-stream, and start it again.
    stream = InNetns(ns(prefix, "B"), tcp_sink, addr(topo, "B"), 5002, 20.0)
    pusher = InNetns(na, tcp_source, addr(topo, "A"), addr(topo, "B"), 5002,
                     os.urandom(64 << 20), 20.0)
    time.sleep(0.5)
    os.kill(man.pids["node:A"], signal.SIGKILL)
    wait_until(lambda: not any(
        b"node run" in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
        for p in emulation._pids_in_netns(na) if Path(f"/proc/{p}").exists()),
        15, "node A's processes to exit")
    pusher.kill()
    stream.kill()
    man.pids["node:A"] = emulation._spawn(
        ["node", "run", "--config", str(topo.path), "--node", "A", "--netns", na],
        paths.log_dir(prefix) / "node-A-restarted.log")
    man.save()
    wait_until(lambda: (s := tunnel_state(prefix, "A", "A-B")) and s["up"]
               and s["pid"] != st["pid"], 30, "node A's tunnel to come back")
    wait_until(lambda: ping(na, addr(topo, "B"), count=1), 15,
               "node A's new router to route again")
    traffic(2)
    time.sleep(0.3)

    sender = _audits(audit, "ab")    # A encrypts a->b
    receiver = _audits(audit, "ba")  # B's workers: their accepts are of a->b datagrams
    assert len(sender) >= 4, f"expected records of several worker lifetimes: {list(sender)}"
    claims = [(p, n) for recs in sender.values() for k, p, n in recs if k == AUDIT_CLAIM]
    sent = [(p, n) for recs in sender.values() for k, p, n in recs if k == AUDIT_SENT]
    accepted = [(p, n) for recs in receiver.values() for k, p, n in recs
                if k == AUDIT_ACCEPTED]
    assert len(sent) > 100 and len(accepted) > 100
    # Claims may overlap: the rest of the last claim is handed back unused and claimed
    # again. What must never overlap is what was sent, and all of it was claimed.
    _assert_disjoint(sent, "two sent datagrams")
    _assert_disjoint(accepted, "two accepted datagrams")
    sent_set = set(sent)
    assert all(a in sent_set for a in accepted), "accepted a datagram nobody sent"
    for p, n in sent:
        assert any(s <= p and p + n <= s + m for s, m in claims), \
            f"datagram at {p} outside every claim"


# ---- routing around a cut link ------------------------------------------------------------

def test_cut_link_reroutes_via_the_third_node_and_comes_back(tmp_path, prefix):
    topo, _ = make_net(tmp_path, prefix, triangle=True)
    na = ns(prefix, "A")
    # Routes settle on the direct links once every link is up.
    wait_until(lambda: router_state(prefix, "A")["routes"]["B"]["via"] == "A-B", 10,
               "the direct route")
    assert ping(na, addr(topo, "B"))
    t0 = time.monotonic()
    run_in_netns(na, set_link, "ul0", False)  # cut the A-B underlay
    wait_until(lambda: router_state(prefix, "A")["routes"].get("B", {}).get("via") == "A-C"
               and router_state(prefix, "B")["routes"].get("A", {}).get("via") == "B-C",
               LINK_DEAD_S + 4, "routes around the cut")
    rerouted = time.monotonic() - t0
    assert rerouted <= LINK_DEAD_S + 2.5, f"rerouting took {rerouted:.1f} s"
    assert not tunnel_state(prefix, "A", "A-B")["up"]
    assert ping(na, addr(topo, "B"), src=addr(topo, "A"))  # via C
    data = os.urandom(2 << 20)
    got = send_tcp(topo, "A", "B", data)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    wait_until(lambda: tunnel_state(prefix, "C", "A-C")["counters"]["rx_bytes"] > (2 << 20),
               3, "the detour's counters at C")
    run_in_netns(na, set_link, "ul0", True)  # restore it
    wait_until(lambda: router_state(prefix, "A")["routes"].get("B", {}).get("via") == "A-B"
               and router_state(prefix, "B")["routes"].get("A", {}).get("via") == "A-B",
               LINK_DEAD_S + 6, "the direct route back")
    assert ping(na, addr(topo, "B"), src=addr(topo, "A"))


def test_a_stall_of_both_link_ends_takes_no_link_down(tmp_path, prefix):
    """Both tunnel managers of a link held for 2.5 s (what an overloaded machine does to
    them, and a SIGSTOP): neither end declares the other silent, because each excuses
    the time it did not run itself; a fixed 1-s rule took the link down on waking."""
    topo, _ = make_net(tmp_path, prefix, two=True)
    ends = [("A", "A-B"), ("B", "A-B")]
    wait_until(lambda: all((tunnel_state(prefix, n, lk) or {}).get("up") for n, lk in ends),
               30, "the link up at both ends")
    before = {n: tunnel_state(prefix, n, lk)["liveness"] for n, lk in ends}
    pids = [tunnel_state(prefix, n, lk)["pid"] for n, lk in ends]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        stalled_at = time.time()
        time.sleep(2.5)  # the fault injected is a time span
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # Both have run for a while since (a fresh status written 1.5 s after waking).
    wait_until(lambda: all((tunnel_state(prefix, n, lk) or {}).get("updated", 0)
                           > stalled_at + 4.0 for n, lk in ends), 30, "status after waking")
    for n, lk in ends:
        st = tunnel_state(prefix, n, lk)
        assert st["up"], f"{n}'s end: {st['reason']}"
        assert st["liveness"]["downs"] == before[n]["downs"], f"{n} took its peer for dead"
        assert st["liveness"]["stalls"] > before[n]["stalls"]
        assert st["liveness"]["stalled_s"] >= before[n]["stalled_s"] + 1.5


# ---- key exhaustion -----------------------------------------------------------------------

def test_no_key_drops_packets_counts_them_and_takes_the_link_down(tmp_path, prefix):
    topo, man = make_net(tmp_path, prefix, two=True, ring="4MiB", key_wait_ms=5)
    na, nb = ns(prefix, "A"), ns(prefix, "B")
    sizes = topo.link("A-B").sizes
    # What is left once drops begin: the control traffic's reserve, less than one more
    # packet's pad, and at most the unused rest of the last chunk claimed, which its
    # worker hands back to the ring once it idles (ring.give_back_idle; only the chunk at
    # the top of the claims, and every chunk claimed was used for a packet, so no more
    # than one). One run in about ten handed back 55 KB, where the bound had no room.
    most = sizes.reserve_bulk + wire.pad_len(VNET_HDR_LEN + 8000 + 28) + sizes.chunk
    assert most < sizes.ring_capacity // 4  # far from a ring left full
    emulator = man.pids["emulator:A-B"]
    os.kill(emulator, signal.SIGSTOP)  # no more key made on this link
    try:
        seen: list[tuple | None] = []

        def ring() -> tuple[int, int]:
            """A's sending ring: (written, left unclaimed)"""
            enc = KeyRing.attach(paths.ring_name(prefix, "A", "A-B", "ab"))
            try:
                return enc.write_pos, enc.write_pos - enc.claim_pos
            finally:
                enc.close()

        def lkm(node: str) -> dict:
            return json.loads((paths.node_dir(prefix, node) / "lkm-A-B.json").read_text())

        lefts: list[int] = []

        def still() -> bool:
            """Neither link end has a block in agreement or reads more, and A's ring is
            not written, over three looks."""
            written, left = ring()
            lefts.append(left)
            try:
                a, b = lkm("A"), lkm("B")
            except (OSError, ValueError):
                return False
            quiet = not a["agreement"]["pending_blocks"] and \
                not b["agreement"]["pending_blocks"]
            seen.append((written, a["key"]["bytes_in"], b["key"]["bytes_in"])
                        if quiet else None)
            return len(seen) > 2 and seen[-1] is not None and seen[-1] == seen[-2] == seen[-3]

        def settle() -> int:
            seen.clear()
            wait_until(still, 60, lambda: f"A-B's key to stop arriving: {seen[-3:]}",
                       step=1.0)
            return seen[-1][0]

        # Key made before the stop still waits in the sources' sockets (megabytes: a full
        # ring stops its key manager reading), and a burst that frees room lets it in, on
        # a busy machine after the burst's drops too (290 KB and 720 KB more than the
        # bound were left so in two full runs of the suite). Key that arrives only adds
        # to what is left, so a burst that leaves less than the bound proves the drops
        # were exhaustion; one that leaves more proves it only if nothing arrived. Else
        # the key that came is used up by the next burst. (A first burst may drop
        # nothing: the sockets' key can be more than the burst's excess over the ring.)
        before = tunnel_state(prefix, "A", "A-B")["counters"]
        sent_all: list[bytes] = []
        got_all: list[bytes] = []
        written = settle()
        for _ in range(4):
            wait_until(lambda: routes_complete(prefix, ["A", "B"]), 30, "the route to B")
            listener = InNetns(nb, udp_collect, addr(topo, "B"), 9999, 4.0)
            time.sleep(0.3)
            burst = [os.urandom(8000) for _ in range(800)]  # 6.4 MB > 4 MiB of key
            run_in_netns(na, udp_send_all, addr(topo, "A"), addr(topo, "B"), 9999, burst,
                         0.0005)
            got = listener.result(10)
            assert set(got) <= set(burst), "a packet arrived altered"
            sent_all += burst
            got_all += got
            was, written = written, settle()
            left = lefts[-1]
            if left < most or written == was:
                break
        else:
            pytest.fail("key kept arriving after four bursts with no key made")
        wait_until(lambda: tunnel_state(prefix, "A", "A-B")["counters"]["drop_tx_nokey"]
                   > before["drop_tx_nokey"], 30, "no-key drops to be counted")
        assert 0 < len(got_all) < len(sent_all)
        assert sizes.reserve_bulk // 2 <= left < most, f"{left} B left, none arrived"
        # Without key beyond that reserve the link is down for routing.
        wait_until(lambda: tunnel_state(prefix, "A", "A-B")["reason"] == "no key", 30,
                   "the link to be reported without key")
        wait_until(lambda: "B" not in router_state(prefix, "A")["routes"], 30,
                   "the route over the keyless link to go")
    finally:
        os.kill(emulator, signal.SIGCONT)
    wait_until(lambda: tunnel_state(prefix, "A", "A-B")["up"], 60, "key and the link back")
    wait_until(lambda: routes_complete(prefix, ["A", "B"]), 30, "the route back")
    assert ping(na, addr(topo, "B"), src=addr(topo, "A"))
