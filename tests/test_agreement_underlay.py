"""The agreement channel against an attacker on the underlay who sees its TCP stream and
sends forged segments (no link key, so no authentic frame): a reset that makes the
leader's decisions miss the follower, and a few bytes that desynchronise the stream. Two
real key managers in namespaces; the attack costs a new session, never key."""

from __future__ import annotations

import subprocess

import pytest

from control.core import paths
from control.lkm.link_end import PEER_SILENT_S
from control.lkm.messages import AUTH_KEY_LEN, NONCE_LEN, FrameCodec, Have
from control.tools import emulation
from tests.conftest import write_topology
from tests.nsutil import InNetns, wait_until
from tests.tcp_forge import inject_after, reset_after
from tests.test_agreement_channel import lkm

pytestmark = pytest.mark.netns
BLOCK = 64 << 10  # write_topology's block size
# The least a follower's report of blocks takes on the wire (a heartbeat names none).
HAVE_ONE = len(FrameCodec(bytes(AUTH_KEY_LEN), b"F", bytes(NONCE_LEN), bytes(NONCE_LEN))
               .seal(Have(1, ((1, 1),), (0, 0))))


def _up(tmp_path, prefix, rate: float = 100):
    topo = write_topology(tmp_path, prefix, rate=rate, capacity="64MiB")
    emulation.net_up(topo)
    wait_until(lambda: all((s := lkm(prefix, n)) and s["agreement"]["synced"]
                           and s["key"]["bytes_stored_ab"] > (1 << 20) for n in "AB"),
               60, "both ends to agree and store key")
    lk = topo.links[0]
    return (str(lk.underlay_a.ip), str(lk.underlay_b.ip), topo.ports.agreement + lk.index)


def _skipped(prefix: str) -> dict[str, tuple[int, int]]:
    return {n: (lkm(prefix, n)["key"]["bytes_skipped_ab"],
                lkm(prefix, n)["key"]["bytes_skipped_ba"]) for n in "AB"}


def _next_session(prefix: str, resyncs: int, why: str, within: float = 60) -> None:
    wait_until(lambda: (a := lkm(prefix, "A"))["agreement"]["resyncs"] > resyncs
               and a["agreement"]["synced"] and lkm(prefix, "B")["agreement"]["synced"],
               within, why)


def _hold_leaders_frames(ns: str, port: int, hold: bool) -> None:
    """An on-path attacker holding back what the leader sends on the agreement channel
    (a table of the test's own in the leader's namespace)."""
    cmd = (f"add table inet tforge; add chain inet tforge out {{ type filter hook output "
           f"priority 0; }}; add rule inet tforge out tcp sport {port} drop" if hold
           else "delete table inet tforge")
    subprocess.run(["ip", "netns", "exec", ns, "nft", cmd], check=True)


def _decided(prefix: str) -> int:
    rings = lkm(prefix, "A")["rings"]
    return rings["ab"]["write_pos"] + rings["ba"]["write_pos"]


def test_decisions_lost_under_a_forged_reset_are_sent_again_not_wiped(tmp_path, prefix):
    """The leader's decisions held back on the underlay, then a forged reset to the
    follower (in window: its next expected byte is known from what it sends): those
    decisions never reach it. They are sent again at the next session, so nothing is
    skipped (such a reset wiped a ring's stored key at both ends, about 100 MiB a packet
    in an audit on a 100 Mb/s link)."""
    a, b, port = _up(tmp_path, prefix, rate=20)  # key flows all along: 64 MiB rings
    na = paths.netns_name(prefix, "A")
    skipped = _skipped(prefix)
    for _ in range(2):
        resyncs, decided = lkm(prefix, "A")["agreement"]["resyncs"], _decided(prefix)
        _hold_leaders_frames(na, port, True)
        try:
            wait_until(lambda: _decided(prefix) > decided + 3 * BLOCK, 30,  # noqa: B023
                       "the leader to decide blocks whose decisions are held back")
            assert InNetns(na, reset_after, "ul0", b, a, port, HAVE_ONE).result(60)
        finally:
            _hold_leaders_frames(na, port, False)
        _next_session(prefix, resyncs, "a new session after the reset")
    assert lkm(prefix, "A")["agreement"]["decisions_replayed"] > 0
    assert _skipped(prefix) == skipped
    stored = lkm(prefix, "B")["key"]["bytes_stored_ab"]
    wait_until(lambda: lkm(prefix, "B")["key"]["bytes_stored_ab"] > stored + (1 << 20), 30,
               "key to flow on")


def test_forged_bytes_in_the_stream_end_the_session_within_its_silence_limit(
        tmp_path, prefix):
    """Four forged bytes after one of the follower's frames: the leader reads them as the
    length of a 1 MiB frame and waits for it, taking in every genuine frame after them;
    the follower's TCP acknowledged bytes the leader never sent. Nothing authentic is
    heard any more, so the session ends within ``PEER_SILENT_S`` and a new one starts
    (the key stopped for many minutes before), and nothing is skipped."""
    a, b, port = _up(tmp_path, prefix, rate=10)  # rings of 64 MiB fill in 100 s
    nb = paths.netns_name(prefix, "B")
    skipped = _skipped(prefix)
    resyncs = lkm(prefix, "A")["agreement"]["resyncs"]
    assert InNetns(nb, inject_after, "ul0", b, a, port, b"\x00\x10\x00\x00").result(60)
    _next_session(prefix, resyncs, "a new session")  # (60 s: PEER_SILENT_S and more)
    said = "".join(f.read_text() for f in paths.log_dir(prefix).glob("node-*.log"))
    assert f"nothing authentic heard for {PEER_SILENT_S:.0f} s" in said
    assert _skipped(prefix) == skipped
    stored = lkm(prefix, "B")["key"]["bytes_stored_ab"]
    wait_until(lambda: lkm(prefix, "B")["key"]["bytes_stored_ab"] > stored + (1 << 20), 30,
               "key to flow on")
