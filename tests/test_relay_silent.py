"""Silent connections to the global key manager's relay port, from a process in the node's
namespace: each holds a descriptor of the key manager until libzmq gives up on its
handshake. They cost the key manager nothing it needs."""

from __future__ import annotations

import json
import resource
import selectors
import socket
import time

import pytest

from control.core import paths
from control.gkm.manager import RELAY_HANDSHAKE_MS
from tests.nsutil import module_pid, run_in_netns, wait_until
from tests.test_gkm import GKM_TWO, client_call, full, make_net

pytestmark = pytest.mark.netns
MIB = 1 << 20
HIGH = 8 * MIB  # GKM_TWO's high watermark
SAE = """
[[saes]]
id = "a1"
node = "A"
"""
SOFT = 512  # the node started under this soft limit on open files
SILENT = 2 * SOFT  # connections opened, more than it


def _silent(dst: str, port: int, n: int, wait_s: float) -> tuple[int, float | None]:
    """Open ``n`` connections to ``dst``:``port`` that never say a thing. (How many
    opened, seconds from then until the server had closed them all, or None.)"""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the test's soft limit may be low
    resource.setrlimit(resource.RLIMIT_NOFILE, (4 * SILENT, hard))  # (the test checked)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            try:
                socks.append(socket.create_connection((dst, port), timeout=10))
            except OSError:
                break
        t0 = time.monotonic()
        with selectors.DefaultSelector() as sel:  # epoll: descriptors above 1,024
            for s in socks:
                sel.register(s, selectors.EVENT_READ)
            while sel.get_map() and time.monotonic() - t0 < wait_s:
                for key, _ in sel.select(0.5):
                    try:
                        if key.fileobj.recv(1 << 12):  # libzmq's greeting
                            continue
                    except OSError:
                        pass
                    sel.unregister(key.fileobj)
            left = len(sel.get_map())
        return len(socks), None if left else time.monotonic() - t0
    finally:
        for s in socks:
            s.close()


def test_silent_connections_to_the_relay_port_neither_crash_nor_stay(tmp_path, prefix):
    """Started under a soft limit of 512 open files, A's key manager crashed on the next
    file it opened (a status file, EMFILE) once 1,024 silent connections were open on its
    relay port, and libzmq held each for 30 s. Every node process now raises its soft
    limit to the hard one, and a connection that has not finished its handshake is closed
    after RELAY_HANDSHAKE_MS: the key manager keeps running and relaying."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * SILENT:
        pytest.skip(f"the hard limit on open files ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, hard))
    try:  # the nodes, and every module they fork, start under it
        topo, _ = make_net(tmp_path, prefix, GKM_TWO, two=True, extra=SAE)  # (a key API)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: full(prefix, [("A", "B")], HIGH), 120, "A's store for B filled")
    gkm = module_pid(prefix, "A", "gkm")
    modules = json.loads((paths.node_dir(prefix, "A") / "state.json").read_text())["modules"]
    assert "api" in {m["name"] for m in modules}
    for m in modules:  # each module runs at the raised limit, not the one it started under
        assert resource.prlimit(m["pid"], resource.RLIMIT_NOFILE)[0] > SOFT, m["name"]
    opened, took = run_in_netns(paths.netns_name(prefix, "A"), _silent,
                                str(topo.node("A").address), topo.ports.relay, SILENT,
                                4 * RELAY_HANDSHAKE_MS / 1000, timeout=300)
    assert opened == SILENT
    assert module_pid(prefix, "A", "gkm") == gkm, "A's key manager restarted"
    assert took is not None, "silent connections still open"
    assert took < 1.5 * RELAY_HANDSHAKE_MS / 1000, f"closed after {took:.0f} s"  # was 30
    # Still relaying: what A's SAEs take is filled again.
    client_call(prefix, "A", "take_enc", "B", 24, 256 << 10)
    wait_until(lambda: full(prefix, [("A", "B")], HIGH), 120, "A's store for B refilled")
    assert module_pid(prefix, "A", "gkm") == gkm
