"""What an attacker on the underlay, or any process that can send from the peer's
underlay address, cannot do to a running link (threat model in docs/design.md)."""

from __future__ import annotations

import errno
import ipaddress
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import struct
import subprocess
import time

import pytest

from bench.flood import ahead_datagram, flood_control
from control.core import paths
from dataplane.ring import CONTROL_LANE, KeyRing
from dataplane.tunnel import tun_name
from tests.nsutil import InNetns, router_state, tunnel_state, wait_until
from tests.test_tunnel import addr, make_net, ns, send_tcp

pytestmark = pytest.mark.netns


def flood_ahead(src: str, dst: str, port_lo: int, workers: int, link: int, ring: str,
                seconds: float, stop) -> int:
    """From the peer's own underlay address: well-formed datagrams naming key just beyond
    what the receiver has stored, on every lane, following its ring, until ``stop`` is
    set (at most ``seconds``). Returns how many."""
    r = KeyRing.attach(ring)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    sent, end = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < end and not stop.is_set():
            w = r.write_pos
            for lane in range(CONTROL_LANE):
                s.sendto(ahead_datagram(200, link, 0, lane, w + 4096 * (1 + lane)),
                         (dst, port_lo + 1 + lane % workers))
                sent += 1
            time.sleep(0.005)
    finally:
        r.close()
    return sent


@pytest.mark.parametrize("guard", ["auto", "off"])
def test_datagrams_naming_key_ahead_of_the_ring_do_not_stall_the_workers(tmp_path, prefix,
                                                                        guard):
    """Each such datagram used to hold a worker for key_wait_ms before it could be checked:
    a trickle of them from the peer's address stopped the link. Now they are parked."""
    topo, man = make_net(tmp_path, prefix, two=True, key_rate=100, guard=guard)
    link = topo.link("A-B")
    wait_until(lambda: (tunnel_state(prefix, "B", "A-B") or {}).get("up")
               and tunnel_state(prefix, "A", "A-B")["enc_available"] > 16 << 20, 60,
               "the link up with key for the transfer")
    # No new key meanwhile: the room A's traffic frees in B's ring stays empty, so the
    # forged positions just beyond B's key are ones the agreement could still fill (B
    # cannot tell them from genuine datagrams that came before their key).
    emulator = man.pids["emulator:A-B"]
    os.kill(emulator, signal.SIGSTOP)
    def refused() -> int:
        """By the workers, and by the guard: beyond its budget for datagrams naming key
        not stored yet (it cannot tell the rest from genuine ones)."""
        st = tunnel_state(prefix, "B", "A-B")
        guard = st["guard"].get("counts", {}).get("ahead", {}).get("packets", 0)
        return guard + sum(v for k, v in st["counters"].items() if k.startswith("drop_rx_"))

    before = refused()
    stop = mp.get_context("fork").Event()  # (InNetns forks: the flood shares it)
    flood = InNetns(ns(prefix, "A"), flood_ahead, str(link.underlay_a.ip),
                    str(link.underlay_b.ip), topo.ports.tunnel, topo.dataplane.workers,
                    link.index, paths.ring_name(prefix, "B", "A-B", "ab"), 60.0, stop)
    try:
        time.sleep(1.0)  # the flood at full rate first
        t0 = time.monotonic()
        data = os.urandom(8 << 20)
        got = send_tcp(topo, "A", "B", data)
        took = time.monotonic() - t0
        stop.set()  # (the flood ran all through the transfer)
        sent = flood.result(60)
    finally:
        flood.kill()
        os.kill(emulator, signal.SIGCONT)
    assert got["bytes"] == len(data)
    assert sent > 400 * (1 + took), f"the flood did not run through the transfer: {sent}"
    assert took < 10.0, f"8 MiB took {took:.1f} s under the flood"
    # Dropped at once while B's ring is full (beyond what it can hold: ahead), else parked
    # and dropped when their key never came (nokey) or came and their MAC failed. (The
    # counters reach the status file a flush later.)
    wait_until(lambda: refused() - before > sent // 2, 30,
               lambda: f"the forged datagrams refused: {refused() - before} of {sent}; B's "
                       f"counters {tunnel_state(prefix, 'B', 'A-B')['counters']}")


def test_a_flood_of_forged_keepalives_takes_no_link_down(tmp_path, prefix):
    """20,000 a second of control-lane datagrams from the peer's address, each naming key
    the receiver holds (so neither the guard nor the framing can refuse them: only the
    MAC): reading 64 a loop turn, the tunnel manager lost the genuine keepalives among
    them in a full socket queue, called the peer silent and withdrew the link's routes
    for as long as the flood lasted. Now it drains the queue within a time budget, and
    authenticated data counts as a sign of life; nothing of the flood is accepted."""
    topo, _ = make_net(tmp_path, prefix, two=True, key_rate=50)
    link = topo.link("A-B")
    wait_until(lambda: all((tunnel_state(prefix, n, "A-B") or {}).get("up") for n in "AB"),
               30, "the link up at both ends")
    wait_until(lambda: tunnel_state(prefix, "B", "A-B")["liveness"]["gap_mean_s"] > 0, 30,
               "B to have timed A's keepalives")
    before = tunnel_state(prefix, "B", "A-B")
    seconds = 5.0
    flood = InNetns(ns(prefix, "A"), flood_control, str(link.underlay_a.ip),
                    str(link.underlay_b.ip), topo.ports.tunnel, link.index, 0,
                    paths.ring_name(prefix, "B", "A-B", "ab"), 20000.0, seconds)
    try:
        # Keepalives alone first: the flood checked for longer than a peer may be silent.
        mac0 = before["control_drops"].get("mac", 0)
        wait_until(lambda: tunnel_state(prefix, "B", "A-B")["control_drops"].get("mac", 0)
                   - mac0 > 20000, 30, "B's manager to have checked a second of the flood")
        data = os.urandom(2 << 20)
        got = send_tcp(topo, "A", "B", data)
        sent = flood.result(seconds + 30)
    finally:
        flood.kill()
    assert got["bytes"] == len(data)
    # At 10,000 a second the old code lost keepalives but not yet the link; a machine
    # 2-3x slower may not send the whole 20,000 from Python.
    assert sent["pps"] > 10000, f"the flood fell short: {sent}"
    wait_until(lambda: tunnel_state(prefix, "B", "A-B")["updated"] > time.time() - 0.2
               and tunnel_state(prefix, "B", "A-B")["updated"] > before["updated"] + seconds,
               10, "B's status after the flood")
    after = tunnel_state(prefix, "B", "A-B")
    assert after["up"], after["reason"]
    assert after["liveness"]["downs"] == before["liveness"]["downs"], \
        f"B called A silent under the flood: {after['liveness']}"
    # The forgeries reached the manager and were refused by their MAC, most of them (it
    # read 15 % of them before).
    refused = after["control_drops"].get("mac", 0) - before["control_drops"].get("mac", 0)
    assert refused > sent["sent"] // 2, f"only {refused} of {sent['sent']} checked"


def _via_underlay(ns_name: str, src: str, dst: str, gateway: str) -> None:
    """In ``ns_name``: packets from ``src`` to ``dst`` go out over the underlay to
    ``gateway`` (a neighbour that routes node addresses the wrong way)."""
    subprocess.run(["ip", "-n", ns_name, "route", "add", f"{dst}/32", "via", gateway,
                    "table", "77"], check=True, capture_output=True)
    rules = subprocess.run(["ip", "-n", ns_name, "rule", "show", "pref", "5"],
                           check=True, capture_output=True, text=True).stdout
    if "lookup 77" not in rules:
        subprocess.run(["ip", "-n", ns_name, "rule", "add", "from", src, "lookup", "77",
                        "pref", "5"], check=True, capture_output=True)


def _ping(ns_name: str, src: str, dst: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", ns_name, "ping", "-n", "-q", "-c", "2",
                           "-i", "0.2", "-W", "1", "-I", src, dst],
                          capture_output=True).returncode == 0


def _connects(src: str, dst: str, port: int) -> bool:
    s = socket.socket()
    s.settimeout(2.0)
    s.bind((src, 0))
    try:
        s.connect((dst, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.parametrize("guard", ["auto", "off"])
def test_node_addresses_are_not_reachable_over_the_underlay(tmp_path, prefix, guard):
    """A neighbour that sends to a node address over the underlay (not through the tunnel)
    reaches nothing: the XDP guard drops it where it runs, a policy rule of the node's
    namespace in any case. Through the tunnel the same address answers."""
    topo, _ = make_net(tmp_path, prefix, two=True, guard=guard)
    na, link = ns(prefix, "A"), topo.link("A-B")
    a_ul, b_ul, b_node = str(link.underlay_a.ip), str(link.underlay_b.ip), addr(topo, "B")
    assert _ping(na, addr(topo, "A"), b_node)  # through the tunnel: fine
    _via_underlay(na, a_ul, b_node, b_ul)
    assert _ping(na, a_ul, b_ul)  # the underlay itself works
    assert not _ping(na, a_ul, b_node), "a node address answered over the underlay"
    # Nor do the tunnels' own addresses: what they answer would go back through a tunnel
    # and spend its key (an audit's forged 60,000-byte pings cost 60 KB of key each).
    b_tun = str(topo.dataplane.tunnel_addresses(link.index)[1])
    _via_underlay(na, a_ul, b_tun, b_ul)
    assert not _ping(na, a_ul, b_tun), "a tunnel address answered over the underlay"
    # Nor does B answer a node address as the source of a packet over the underlay: its
    # answer would go back through the tunnel (where A would get it: a ping that works).
    subprocess.run(["ip", "-n", na, "route", "add", f"{b_ul}/32", "dev", "ul0", "table",
                    "78"], check=True, capture_output=True)
    subprocess.run(["ip", "-n", na, "rule", "add", "from", addr(topo, "A"), "to", b_ul,
                    "lookup", "78", "pref", "6"], check=True, capture_output=True)
    assert not _ping(na, addr(topo, "A"), b_ul), \
        "B answered a node address's packet that came over the underlay"
    port = topo.metrics.port  # B's metrics endpoint listens on its node address
    assert InNetns(na, _connects, addr(topo, "A"), b_node, port).result(30) is True
    assert InNetns(na, _connects, a_ul, b_node, port).result(30) is False
    g = (tunnel_state(prefix, "B", "A-B") or {}).get("guard") or {}
    if guard == "auto" and g.get("state") == "on":
        wait_until(lambda: tunnel_state(prefix, "B", "A-B")["guard"]["counts"]["node"]
                   ["packets"] >= 6, 5, "the guard to count the dropped packets")


NOBODY = 65534
IP_UNICAST_IF = 50  # linux/in.h: the output interface of a socket's unicast packets


def _as_nobody(checks: list[tuple[str, str, str, int, str]]) -> dict[str, str]:
    """As uid/gid 65534 (no privileges, not the node's user): each (label, proto, address,
    port, how) tried once, where ``how`` picks the output device the ways an unprivileged
    socket can ("" = the routes; "bind:DEV" = SO_BINDTODEVICE; "if:DEV" = IP_UNICAST_IF;
    "mcast:ADDR" = IP_MULTICAST_IF; "bcast" = SO_BROADCAST); what it met, "ok" or the
    error's name. UDP datagrams are marked as control traffic (DSCP CS6) too."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    met = {}
    for label, proto, dst, port, how in checks:
        s = socket.socket(socket.AF_INET,
                          socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(5.0)
        try:
            kind, _, arg = how.partition(":")
            if kind == "bind":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, arg.encode())
            elif kind == "if":
                s.setsockopt(socket.IPPROTO_IP, IP_UNICAST_IF,
                             struct.pack("!I", socket.if_nametoindex(arg)))
            elif kind == "mcast":
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(arg))
            elif kind == "bcast":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            elif kind == "join":  # the kernel reports the membership (IGMP) for us
                group = socket.inet_aton(dst) + socket.inet_aton(arg)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
                s.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, group)
                met[label] = "ok"
                continue
            if proto == "tcp":
                s.connect((dst, port))
            else:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0xC0)
                s.sendto(b"spend the link's key", (dst, port))
            met[label] = "ok"
        except OSError as e:
            met[label] = errno.errorcode.get(e.errno or 0, str(e))
        finally:
            s.close()
    return met


def _filter_counts(ns_name: str) -> list[int]:
    """Packets each rule of the node's nftables table refused in ``ns_name`` (multicast,
    then other users'); [] while the table is not there."""
    out = subprocess.run(["ip", "netns", "exec", ns_name, "nft", "list", "table", "inet",
                          "qkdnet"], capture_output=True, text=True).stdout
    return [int(n) for n in re.findall(r"counter packets (\d+)", out)]


def _tun_tx_packets(ns_name: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns_name, "-s", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def test_a_process_of_another_user_in_the_namespace_cannot_send_through_the_tunnels(
        tmp_path, prefix):
    """Anything sent into a tunnel spends the link's key: another user's process in the
    node's namespace is refused on the way out (nftables, by the socket's owner), however
    it picks the device, so it spends none, while it still reaches the node's own
    services; root's traffic and the relaying are untouched."""
    topo, _ = make_net(tmp_path, prefix)  # A - B - C: C only via B
    na = ns(prefix, "A")
    port = topo.metrics.port  # every node's metrics endpoint listens on its node address
    a_node, b_node, c_node = addr(topo, "A"), addr(topo, "B"), addr(topo, "C")
    link = topo.link("A-B")
    a_tun, b_tun = (str(a) for a in topo.dataplane.tunnel_addresses(link.index))
    dev = tun_name(link)
    tries = [("own node, tcp", "tcp", a_node, port, ""),
             ("peer node, tcp", "tcp", b_node, port, ""),
             ("node via a relay, tcp", "tcp", c_node, port, ""),
             ("peer node, udp", "udp", b_node, 9, ""),
             ("peer tunnel address, udp", "udp", b_tun, 9, ""),
             ("device bound, udp", "udp", "192.0.2.1", 9, f"bind:{dev}"),
             ("unicast interface, udp", "udp", "192.0.2.1", 9, f"if:{dev}"),
             ("tunnel broadcast, udp", "udp",
              str(ipaddress.IPv4Network(f"{a_tun}/30", strict=False).broadcast_address), 9,
              "bcast"),
             ("multicast, udp", "udp", "239.1.2.3", 9, f"mcast:{a_tun}")]
    owner = _filter_counts(na)[1]
    tx = _tun_tx_packets(na, dev)
    met = InNetns(na, _as_nobody, tries).result(120)
    assert met == {label: "ok" if label.startswith("own") else
                   "EHOSTUNREACH" if proto == "tcp" else "EPERM"
                   for label, proto, *_ in tries}, met
    # Refused by the filter (not a route): all but the node's own service and the
    # multicast datagram (dropped whole, by the rule before).
    assert _filter_counts(na)[1] >= owner + len(tries) - 2
    # A group joined on the tunnel address: the kernel's membership reports, which carry
    # no user's socket, are dropped by the multicast rule.
    mcast = _filter_counts(na)[0]
    joined = InNetns(na, _as_nobody, [("join", "udp", "239.1.2.4", 0, f"join:{a_tun}")])
    assert joined.result(60) == {"join": "ok"}
    wait_until(lambda: _filter_counts(na)[0] > mcast, 30, "the IGMP reports dropped")
    assert _tun_tx_packets(na, dev) == tx, "something of another user's left the tunnel"
    # Root, in the same namespace: through the tunnel, and on via B to C.
    assert InNetns(na, _connects, a_node, b_node, port).result(30) is True
    assert InNetns(na, _connects, a_node, c_node, port).result(30) is True
    # A host firewall's reload flushes every table: the router puts the filter back.
    subprocess.run(["ip", "netns", "exec", na, "nft", "flush", "ruleset"], check=True)
    assert _filter_counts(na) == []
    wait_until(lambda: len(_filter_counts(na)) == 2, 60, "the filter put back")
    wait_until(lambda: router_state(prefix, "A").get("filter_restored") == 1, 30,
               "the router to count it")
    assert "owner filter (nftables table inet qkdnet) was gone; put back" in \
        (paths.log_dir(prefix) / "node-A.log").read_text()
