"""The agreement channel under a connection flood from the follower's own address: two
real key managers in namespaces; connections that cannot authenticate (closed at once,
garbage, frames under a wrong key, silent) change nothing: same session, no resync, no
key skipped, key keeps flowing. A genuine reconnection still replaces the session."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path

import pytest

from control.core import paths
from control.lkm.link_end import load_link_key
from control.lkm.messages import AUTH_KEY_LEN, NONCE_LEN, FrameCodec, Hello, ProtocolError
from control.tools import emulation
from tests.conftest import write_topology
from tests.nsutil import InNetns, run_in_netns, set_link, wait_until


def lkm(prefix: str, node: str) -> dict | None:
    try:
        return json.loads((paths.node_dir(prefix, node) / "lkm-A-B.json").read_text())
    except (OSError, ValueError):
        return None


def flood(src: str, dst: str, port: int, seconds: float) -> dict:
    """Connections from ``src`` (the follower's underlay address) to the leader's
    agreement port, of every kind an attacker without the link key can make."""
    counts = {"closed": 0, "garbage": 0, "forged": 0, "silent": 0}
    held: list[socket.socket] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        kind = ("closed", "garbage", "forged", "silent")[i % 4]
        i += 1
        s = socket.socket()
        s.settimeout(2.0)
        try:
            s.bind((src, 0))
            s.connect((dst, port))
            if kind == "garbage":
                s.sendall(os.urandom(200))
            elif kind == "forged":  # well-formed, sealed under a key that is not the link's
                theirs = s.recv(NONCE_LEN)
                mine = secrets.token_bytes(NONCE_LEN)
                codec = FrameCodec(secrets.token_bytes(32), b"F", mine, theirs)
                s.sendall(mine + codec.seal(Hello(1, (1 << 40, 1 << 40), (0, 0))))
            elif kind == "silent":  # holds a slot until it times out (or is pushed out)
                held.append(s)
                if len(held) > 40:
                    held.pop(0).close()
                counts[kind] += 1
                continue
            counts[kind] += 1
        except OSError:
            pass
        s.close()
    for s in held:
        s.close()
    return counts


def test_frames_of_another_connection_or_direction_are_refused():
    """What makes a candidate's first frame proof of the peer: it must be sealed under
    the link key for this connection's nonces, in the follower's direction, in order."""
    key = secrets.token_bytes(32)
    lead_n, foll_n = secrets.token_bytes(NONCE_LEN), secrets.token_bytes(NONCE_LEN)
    hello = Hello(1, (5, 6), (0, 0))
    follower = FrameCodec(key, b"F", foll_n, lead_n)
    frame = follower.seal(hello)
    assert FrameCodec(key, b"L", lead_n, foll_n).feed(frame) == [hello]
    cases = {
        "replayed into a new connection": FrameCodec(key, b"L", secrets.token_bytes(16),
                                                     foll_n),
        "under another key": FrameCodec(secrets.token_bytes(32), b"L", lead_n, foll_n),
        "reflected to its sender": FrameCodec(key, b"F", foll_n, lead_n),
    }
    for what, codec in cases.items():
        with pytest.raises(ProtocolError, match="authentication failed"):
            codec.feed(frame)
            pytest.fail(what)
    leader = FrameCodec(key, b"L", lead_n, foll_n)
    leader.feed(frame)
    with pytest.raises(ProtocolError, match="authentication failed|counter"):
        leader.feed(frame)  # the same frame again on the same connection


def test_a_link_key_file_others_could_read_or_a_link_to_one_is_refused(tmp_path):
    path = tmp_path / "ab.key"
    key = secrets.token_bytes(AUTH_KEY_LEN)
    path.write_bytes(key)
    path.chmod(0o644)
    with pytest.raises(SystemExit, match="mode 0644 .*chmod 600"):
        load_link_key(path)
    path.chmod(0o600)
    assert load_link_key(path) == key
    link = tmp_path / "link.key"
    link.symlink_to(path)
    with pytest.raises(SystemExit, match="symbolic link"):
        load_link_key(link)
    with pytest.raises(SystemExit, match="not a regular file"):
        load_link_key(Path("/dev/null"))
    path.write_bytes(key + b"\n")
    with pytest.raises(SystemExit, match="exactly 32 bytes, has 33"):
        load_link_key(path)
    with pytest.raises(SystemExit, match="missing"):
        load_link_key(tmp_path / "none.key")


@pytest.mark.netns
def test_a_connection_flood_from_the_peers_address_changes_nothing(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix, rate=100, capacity="64MiB")
    emulation.net_up(topo)
    wait_until(lambda: all((s := lkm(prefix, n)) and s["agreement"]["synced"]
                           and s["key"]["bytes_stored_ab"] > 0 for n in "AB"),
               40, "both ends to agree and store key")
    before = {n: lkm(prefix, n) for n in "AB"}
    lk = topo.links[0]
    job = InNetns(paths.netns_name(prefix, "B"), flood, str(lk.underlay_b.ip),
                  str(lk.underlay_a.ip), topo.ports.agreement + lk.index, 6.0)
    counts = job.result(60)
    assert sum(counts.values()) > 100 and all(counts.values()), counts
    wait_until(lambda: lkm(prefix, "A")["agreement"]["refused_connections"]
               >= sum(counts.values()) - 50, 20, "the leader to refuse the connections")
    # Key still flows, in the same session, and nothing was skipped at either end.
    wait_until(lambda: lkm(prefix, "B")["key"]["bytes_stored_ab"]
               > before["B"]["key"]["bytes_stored_ab"] + (1 << 20), 20, "key to flow")
    for n in "AB":
        was, now = before[n], lkm(prefix, n)
        assert now["agreement"]["connected"] and now["agreement"]["synced"], now
        assert now["agreement"]["session"] == was["agreement"]["session"]
        assert now["agreement"]["resyncs"] == was["agreement"]["resyncs"]
        for d in ("ab", "ba"):
            assert now["key"][f"bytes_skipped_{d}"] == was["key"][f"bytes_skipped_{d}"]
            assert now["rings"][d]["write_pos"] >= was["rings"][d]["write_pos"]
    # The follower's key manager restarts: its new connection authenticates and takes
    # over at once (the leader accepts it among the refused ones).
    os.kill(before["B"]["pid"], signal.SIGKILL)
    wait_until(lambda: (s := lkm(prefix, "B")) and s["pid"] != before["B"]["pid"]
               and s["agreement"]["synced"]
               and lkm(prefix, "A")["agreement"]["resyncs"]
               > before["A"]["agreement"]["resyncs"], 30,
               "a new session after the follower's restart")


def test_the_follower_keeps_its_loop_while_the_leader_is_unreachable(tmp_path, prefix):
    """The leader's underlay down and the follower's key manager restarted: its
    connection attempts get no answer. They wait in its selector loop, not in a blocking
    connect (2 s a try, tried again at once: the loop's whole time), so it goes on
    publishing its status twice a second; the session comes back when the cut ends."""
    topo = write_topology(tmp_path, prefix, rate=100, capacity="64MiB")
    emulation.net_up(topo)
    wait_until(lambda: all((s := lkm(prefix, n)) and s["agreement"]["synced"] for n in "AB"),
               40, "both ends to agree")
    na = paths.netns_name(prefix, "A")
    old = lkm(prefix, "B")["pid"]
    run_in_netns(na, set_link, "ul0", False)
    try:
        os.kill(old, signal.SIGKILL)  # its node starts a new one, which must connect
        wait_until(lambda: (s := lkm(prefix, "B")) and s["pid"] != old
                   and "peer A" in s["agreement"]["error"], 30,
                   "the new follower's first attempt to fail")
        seen = set()
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            s = lkm(prefix, "B")
            if s and not s["agreement"]["connected"]:
                seen.add(s["updated"])
            time.sleep(0.05)
        # 16 at 0.5 s each; 6 while each try blocked the loop (measured before the change).
        assert len(seen) >= 10, f"{len(seen)} status updates in 8 s while unreachable"
    finally:
        run_in_netns(na, set_link, "ul0", True)
    wait_until(lambda: all((s := lkm(prefix, n)) and s["agreement"]["synced"] for n in "AB"),
               30, "the session back once the leader is reachable")
