"""The XDP guard (dataplane/bpf/guard.py): its pure parts, and the real program attached to
the underlay of a running node: passes legitimate traffic, replaced after a crash, gone
after the node stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from control.core.config import parse_topology
from dataplane.bpf import guard as g
from dataplane.bpf import syscall
from tests.nsutil import (
    QKDCTL,
    add_address,
    ping,
    run_in_netns,
    tunnel_state,
    udp_send_all,
    wait_until,
)
from tests.test_tunnel import addr, make_net, net_text, ns


def _ld_map(fd: int, dst: int = 1) -> bytes:
    """A BPF 64-bit load of a map descriptor: two instruction slots."""
    return struct.pack("=BBhi", g.LD_IMM64, (g.PSEUDO_MAP_FD << 4) | dst, 0, fd) + bytes(8)


def test_map_references_are_found_and_rewritten_with_our_descriptors():
    mov = struct.pack("=BBhi", 0xb7, 0, 0, 5)  # r0 = 5 (imm 5 must not be taken for a map)
    plain_ld = struct.pack("=BBhi", g.LD_IMM64, 2, 0, 5) + bytes(8)  # 64-bit constant 5
    insns = mov + _ld_map(5) + plain_ld + _ld_map(9, dst=3) + mov
    refs = g.find_map_refs(insns, {5: "floors", 9: "counters"})
    assert refs == [(1, "floors"), (5, "counters")]
    out = g.relocate(insns, refs, {"floors": 41, "counters": 42})
    assert struct.unpack_from("=i", out, 8 + 4)[0] == 41
    assert struct.unpack_from("=i", out, 5 * 8 + 4)[0] == 42
    assert out[:8] == mov and out[24:40] == plain_ld and len(out) == len(insns)
    with pytest.raises(g.GuardError, match="unknown map"):
        g.find_map_refs(_ld_map(7), {5: "floors"})


def test_config_value_is_the_c_struct_with_the_address_as_the_packet_holds_it():
    spec = g.GuardSpec(peer_ip="10.1.2.3", port_lo=7000, workers=3, link=4, direction=1,
                       node_net="10.88.0.0/24", tunnel_net="10.89.0.0/16")
    peer, port, workers, link, d, net, mask, tnet, tmask = g.CONFIG.unpack(
        spec.config_value())
    assert peer.to_bytes(4, sys.byteorder) == socket.inet_aton("10.1.2.3")
    assert (port, workers, link, d) == (7000, 3, 4, 1)
    assert net.to_bytes(4, sys.byteorder) == socket.inet_aton("10.88.0.0")
    assert mask.to_bytes(4, sys.byteorder) == socket.inet_aton("255.255.255.0")
    assert tnet.to_bytes(4, sys.byteorder) == socket.inet_aton("10.89.0.0")
    assert tmask.to_bytes(4, sys.byteorder) == socket.inet_aton("255.255.0.0")


def test_every_reason_has_a_counter_pair_and_drops_are_reasons():
    flags = dict(f[2:].split("=") for f in g.cflags())
    assert int(flags["N_REASONS"]) == len(g.REASONS)
    assert sorted(int(flags[f"R_{r.upper()}"]) for r in g.REASONS) == list(range(len(g.REASONS)))
    assert set(g.DROP_REASONS) < set(g.REASONS) and "pass" not in g.DROP_REASONS


def test_a_cached_build_is_used_only_if_no_other_user_could_have_written_it(tmp_path,
                                                                          monkeypatch):
    """What the cache holds is loaded into the kernel as root: a build in a file or a
    directory others may write is never used (the build is made anew, and kept private)."""
    builds = []

    def build() -> dict:
        builds.append(1)
        return {"insns": "AAAAAAAAAAA=", "refs": [[3, "cfg"]]}

    cache = tmp_path / "bpf"
    monkeypatch.setattr(g, "CACHE_DIR", cache)
    monkeypatch.setattr(g, "_build", build)
    monkeypatch.setattr(g, "build_key", lambda: "k")
    assert g.program() == (bytes(8), [(3, "cfg")]) and len(builds) == 1
    path = cache / "guard-k.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert g.program() == (bytes(8), [(3, "cfg")]) and len(builds) == 1  # from the cache
    planted = {"insns": "/////////w==", "refs": []}  # another user's "build"
    path.write_text(json.dumps(planted))
    path.chmod(0o644)
    assert g.program() == (bytes(8), [(3, "cfg")]) and len(builds) == 2
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text(json.dumps(planted))  # ours, but in a directory others may write in
    cache.chmod(0o777)
    assert g.program() == (bytes(8), [(3, "cfg")]) and len(builds) == 3


def test_support_says_why_not_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in g.support()


def test_array_map_round_trip_and_per_cpu_sum():
    m = syscall.ArrayMap(syscall.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 4), 4)
    try:
        m.set(3, 1 << 40)
        assert m.values() == [0, 0, 0, 1 << 40]
        other = syscall.ArrayMap.by_id(syscall.obj_id(m.fd), 4)  # as `qkdctl stats` opens it
        assert other.get(3) == 1 << 40
        other.close()
    finally:
        m.close()
    pc = syscall.ArrayMap(syscall.map_create(syscall.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 2), 2,
                          percpu=True)
    assert pc.values() == [0, 0] and pc.ncpu >= os.cpu_count()
    pc.close()


# ---- on a running node --------------------------------------------------------------------

def qkdctl(*args: str, width: int = 200) -> str:
    r = subprocess.run([QKDCTL, *args],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": str(width)})
    assert r.returncode == 0, r.stderr
    return r.stdout


def xdp_prog_id(ifname: str) -> int:
    """The XDP program attached to an interface of the namespace this runs in (0: none)."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        xdp = ip.get_links(ifname=ifname)[0].get_attr("IFLA_XDP")
        return (xdp.get_attr("IFLA_XDP_PROG_ID") or 0) if xdp is not None else 0


def _guard(prefix: str, node: str) -> dict:
    return (tunnel_state(prefix, node, "A-B") or {}).get("guard") or {}


@pytest.mark.netns
def test_guard_passes_traffic_is_replaced_after_a_crash_and_gone_after_stop(tmp_path, prefix):
    topo, man = make_net(tmp_path, prefix, two=True)
    nb = ns(prefix, "B")
    st = wait_until(lambda: _guard(prefix, "B").get("state") == "on" and _guard(prefix, "B"),
                    15, "B's guard on")
    first = st["ids"]["prog"]
    assert run_in_netns(nb, xdp_prog_id, "ul0") == first
    passed = st["counts"]["pass"]["packets"]
    assert ping(ns(prefix, "A"), addr(topo, "B"), count=5, size=1200)
    wait_until(lambda: _guard(prefix, "B")["counts"]["pass"]["packets"] >= passed + 5, 5,
               "legitimate datagrams counted as passed")
    assert all(_guard(prefix, "B")["counts"][r]["packets"] == 0 for r in g.DROP_REASONS)

    # A forged datagram from a foreign address, then what `qkdctl stats` and `status` say.
    run_in_netns(ns(prefix, "A"), add_address, "ul0", "10.254.254.2")
    run_in_netns(ns(prefix, "A"), udp_send_all, "10.254.254.2",
                 str(topo.link("A-B").underlay_b.ip), topo.ports.tunnel + 1, [bytes(100)] * 3, 0)
    snap = json.loads(qkdctl("stats", "--prefix", prefix, "--json"))
    b_end = next(e for e in snap["ends"] if e["node"] == "B")
    assert b_end["guard"] == f"{st['mode']} on ul0"
    assert b_end["guard_counts"]["source"] == {"packets": 3, "bytes": 3 * (100 + 42)}
    assert b_end["guard_counts"]["pass"]["packets"] >= passed + 5  # live from the map
    assert b_end["workers"]["rx_pkts"] >= 5 and b_end["workers"]["drop_rx_source"] == 0
    text = qkdctl("stats", "--prefix", prefix)
    assert "xdp" in text and "source" in text and "workers" in text
    watch = subprocess.Popen([QKDCTL, "stats",
                              "--prefix", prefix, "--watch", "--interval", "0.3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "COLUMNS": "200"})
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(watch.stderr), daemon=True)
    reader.start()
    wait_until(lambda: any("Ctrl-C to stop" in line for line in said), 60,
               "stats --watch to be refreshing")
    time.sleep(1.0)  # a few refreshes
    watch.send_signal(signal.SIGINT)  # Ctrl-C: a clean end, no traceback
    w_out = watch.stdout.read()
    watch.wait(10)
    reader.join(10)
    w_err = "".join(said)
    assert watch.returncode == 0 and "Traceback" not in w_err, w_err
    assert "pkt/s" in w_out and "dropped" in w_out
    assert f"{st['mode']}, 3 dropped" in qkdctl("status", "--prefix", prefix, width=250)

    # A crash (kill -9 of the tunnel manager): the kernel detaches its program with it, the
    # restarted manager attaches a new one; never two.
    victim = tunnel_state(prefix, "B", "A-B")["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: (tunnel_state(prefix, "B", "A-B") or {}).get("pid") not in (None, victim)
               and _guard(prefix, "B").get("state") == "on", 20, "a new tunnel manager")
    second = _guard(prefix, "B")["ids"]["prog"]
    assert second != first
    wait_until(lambda: run_in_netns(nb, xdp_prog_id, "ul0") == second, 5, "the new program")
    # the link was down while no manager ran: traffic again once routes are back
    wait_until(lambda: ping(ns(prefix, "A"), addr(topo, "B"), count=1, size=1200), 30,
               "traffic through the tunnel under the new guard")
    assert _guard(prefix, "B")["ids"]["prog"] == second

    # A clean stop of the node: nothing left attached (the namespace is still there).
    os.kill(man.pids["node:B"], signal.SIGTERM)
    wait_until(lambda: run_in_netns(nb, xdp_prog_id, "ul0") == 0, 15, "the guard detached")
    assert _guard(prefix, "B")["state"] == "off"


def test_required_guard_that_cannot_run_keeps_the_tunnel_down(tmp_path, prefix):
    """``guard = "require"`` where BPF is refused: the tunnel manager exits with the reason
    instead of running unguarded."""
    from dataplane.tunnel import TunnelConfig, TunnelManager

    text = net_text(prefix, key_wait_ms=None, guard="require")
    topo = parse_topology(text, tmp_path / "net.toml")
    assert topo.dataplane.guard == "require"
    cfg = TunnelConfig.from_topology(topo, "A", topo.link("A-B"), guard_off="not root (test)")
    with pytest.raises(SystemExit, match="required.*not root"):
        TunnelManager(cfg)._start_guard()


def test_the_bench_flood_forges_what_each_drop_reason_names():
    """bench/flood.py's datagrams: the stale one is well-framed (only its position is
    wrong), the spoofed packet carries the peer's address and a UDP length that fits."""
    from bench.flood import IP_HDR, UDP_HDR, spoofed, stale_datagram
    from dataplane import wire

    d = stale_datagram(128, link=3, direction=1, lane=2)
    hdr = wire.parse(d, len(d), link=3, direction=1)
    assert (hdr.pos, hdr.release, hdr.lane, len(d)) == (0, 0, 2, 128)
    pkt = spoofed("10.0.0.1", "10.0.0.2", 40000, 7001, d)
    ip = IP_HDR.unpack_from(pkt)
    assert ip[2] == len(pkt) and ip[8] == socket.inet_aton("10.0.0.1")
    assert UDP_HDR.unpack_from(pkt, IP_HDR.size)[1:3] == (7001, UDP_HDR.size + len(d))


def _send_from(ns: str, sources: list[str], dst: str, port: int) -> None:
    from pyroute2 import netns as pnetns

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            pnetns.setns(ns, flags=0)
            for src in sources:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((src, 0))
                s.sendto(bytes(60000), (dst, port))
                s.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _guard_against(peer_ns: str, native_flag: int) -> dict:
    """Runs in the guarded namespace: the guard on ``ga`` (peer 10.77.0.2 behind it, in
    ``peer_ns``), one 60 kB datagram from the peer and one from another address there."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        a = ip.link_lookup(ifname="ga")[0]
    g.syscall.XDP_FLAGS_DRV_MODE = native_flag
    guard = g.Guard(g.GuardSpec("10.77.0.2", 7100, 1, 0, 0), a, "ga")
    try:
        _send_from(peer_ns, ["10.77.0.2", "10.77.0.9"], "10.77.0.1", 7101)
        time.sleep(0.2)
        return {"mode": guard.mode, "counts": guard.counts()}
    finally:
        guard.close()


@pytest.mark.netns
def test_where_native_xdp_is_refused_the_guard_runs_in_generic_mode(prefix):
    """A driver without native XDP (here: the native flag replaced by one the kernel
    refuses) gets the guard in generic mode, which judges the same way."""
    from pyroute2 import IPRoute
    from pyroute2 import netns as pnetns

    guarded, peer = f"{prefix}-ga", f"{prefix}-gb"
    for n in (guarded, peer):
        pnetns.create(n)
    try:
        with IPRoute(netns=guarded) as ip:
            ip.link("add", ifname="ga", kind="veth", peer={"ifname": "gb", "net_ns_fd": peer})
            idx = ip.link_lookup(ifname="ga")[0]
            ip.link("set", index=idx, mtu=65535, state="up")
            ip.addr("add", index=idx, address="10.77.0.1", prefixlen=24)
        with IPRoute(netns=peer) as ip:
            idx = ip.link_lookup(ifname="gb")[0]
            ip.link("set", index=idx, mtu=65535, state="up")
            for addr in ("10.77.0.2", "10.77.0.9"):
                ip.addr("add", index=idx, address=addr, prefixlen=24)
        out = run_in_netns(guarded, _guard_against, peer, 1 << 30)
    finally:
        for n in (guarded, peer):
            pnetns.remove(n)
    assert out["mode"] == "generic"
    assert out["counts"]["source"]["packets"] == 1  # from 10.77.0.9
    assert out["counts"]["malformed"]["packets"] == 1  # from the peer, but not our framing
