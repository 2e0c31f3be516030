"""Emulated networks for real: namespaces, veth, emulator and key manager processes,
shared-memory rings. Needs root."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from bench.topology import line, network, render, saes
from control.core import paths
from control.core.config import Topology, parse_topology
from control.node.status import collect
from control.tools import emulation
from control.tools.emulation import leftovers
from dataplane.limits import PENDING_BLOCK_TIMEOUT_S
from dataplane.ring import KeyRing
from tests.conftest import write_topology
from tests.nsutil import wait_until

pytestmark = pytest.mark.netns
QKDCTL = [sys.executable, "-m", "control.tools.cli"]


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}




def lkm_status(prefix: str, node: str, link: str = "A-B") -> dict | None:
    try:
        return json.loads((paths.node_dir(prefix, node) / f"lkm-{link}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ring_bytes(prefix: str, node: str, direction: str) -> tuple[int, int, bytes]:
    """The key a ring holds that nobody has handed out yet (an ENC ring's claimed bytes
    belong to its encryptors, which wipe them as they use them), read under the ring lock.
    """
    r = KeyRing.attach(paths.ring_name(prefix, node, "A-B", direction))
    r._lock()
    try:
        lo = r.claim_pos if r.is_enc else r.release_pos
        hi = r.write_pos
        return lo, hi, bytes(r.read(lo, hi - lo))
    finally:
        r._unlock()
        r.close()


def test_net_up_and_down_leave_nothing(tmp_path, prefix):
    before = host_links()
    topo = write_topology(tmp_path, prefix)
    emulation.net_up(topo, start=False)
    assert sorted(ns for ns in pnetns.listnetns() if ns.startswith(prefix)) == \
        [f"{prefix}-A", f"{prefix}-B"]
    # The underlay really carries traffic between the two namespaces.
    ping = subprocess.run(["ip", "netns", "exec", f"{prefix}-A", "ping", "-c", "1", "-W", "2",
                           "10.209.1.2"], capture_output=True, text=True)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert host_links() == before, "net up must not add interfaces to the host namespace"
    emulation.net_down(prefix)
    assert leftovers(prefix) == []
    assert host_links() == before


def test_two_networks_coexist(tmp_path, prefix):
    other = prefix[:-1] + ("x" if prefix[-1] != "x" else "y")
    try:
        emulation.net_up(write_topology(tmp_path, prefix), start=False)
        emulation.net_up(write_topology(tmp_path, other), start=False)
        for p in (prefix, other):
            assert {f"{p}-A", f"{p}-B"} <= set(pnetns.listnetns())
        emulation.net_down(prefix)
        assert {f"{other}-A", f"{other}-B"} <= set(pnetns.listnetns())
        assert leftovers(prefix) == []
    finally:
        emulation.net_down(other)
    assert leftovers(other) == []


def test_second_net_up_with_same_prefix_is_refused(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix)
    emulation.net_up(topo, start=False)
    with pytest.raises(emulation.NetError, match="exists already"):
        emulation.net_up(topo, start=False)


def test_killed_net_up_is_cleaned_by_net_down(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix)
    proc = subprocess.Popen([*QKDCTL, "net", "up", str(topo.path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill it once it has made something (namespaces, maybe processes), not before.
    wait_until(lambda: f"{prefix}-A" in pnetns.listnetns(), 20, "net up to create namespaces")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run([*QKDCTL, "net", "down", "--prefix", prefix], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert leftovers(prefix) == []


def test_net_down_takes_a_prefix_never_a_path(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("kept")
    for bad in (str(victim), "../" + victim.name, "UPPER", "a", "x" * 9):
        res = subprocess.run([*QKDCTL, "net", "down", "--prefix", bad], capture_output=True,
                             text=True, timeout=60, env={**os.environ, "COLUMNS": "400"})
        assert res.returncode == 2 and "is not a network prefix" in res.stderr, res.stderr
        with pytest.raises(ValueError, match="not a network prefix"):
            emulation.net_down(bad)
    assert (victim / "file").read_text() == "kept"


def test_namespaces_that_only_share_the_prefix_are_not_ours_to_remove(tmp_path, prefix):
    """A namespace named like the network's (a container runtime's "cni-...", an
    operator's own) is never removed, nor its processes killed: not by net down, and not
    by a net up that finds it in the way."""
    foreign, in_the_way = f"{prefix}-foreign", f"{prefix}-A"
    for ns in (foreign, in_the_way):
        pnetns.create(ns)
    sleepers = [subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])
                for ns in (foreign, in_the_way)]
    try:
        topo = write_topology(tmp_path, prefix)
        with pytest.raises(emulation.NetError, match="exist already and are no qkdnet"):
            emulation.net_up(topo, start=False)
        assert {foreign, in_the_way} <= set(pnetns.listnetns())
        pnetns.remove(in_the_way)
        emulation.net_up(topo, start=False)
        emulation.net_down(prefix)
        assert foreign in pnetns.listnetns() and f"{prefix}-A" not in pnetns.listnetns()
        assert sleepers[0].poll() is None, "net down killed a process it did not start"
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        for ns in (foreign, in_the_way):
            if ns in pnetns.listnetns():
                pnetns.remove(ns)


def test_rings_at_both_ends_hold_identical_key(tmp_path, prefix):
    # Rings large enough that neither fills: a full direction would take the spill-over.
    topo = write_topology(tmp_path, prefix, rate=200, capacity="64MiB", ratio="3:1")
    man = emulation.net_up(topo)
    # Key flows until the rings are full (nothing consumes it here).
    wait_until(lambda: all((s := lkm_status(prefix, n)) and s["agreement"]["synced"]
                           and s["key"]["bytes_stored_ba"] > 0 for n in "AB"),
               30, "both ends to agree and store key")
    # Enough key in both directions that "little key left" below means a fault.
    wait_until(lambda: (s := lkm_status(prefix, "A"))
               and min(s["key"]["bytes_stored_ab"], s["key"]["bytes_stored_ba"]) >= 8 << 20,
               60, "8 MiB of key each way")
    os.kill(man.pids["emulator:A-B"], signal.SIGTERM)
    killed = time.time()

    def ring_ends(node: str) -> list[int]:
        out = []
        for d in ("ab", "ba"):
            r = KeyRing.attach(paths.ring_name(prefix, node, "A-B", d))
            out.append(r.write_pos)  # (the position only: no copy of the ring's bytes)
            r.close()
        return out

    def settled() -> bool:
        # Both ends' status written after the source went away, neither holding an
        # undecided block, and the rings themselves (not a status snapshot) at one end.
        sts = [lkm_status(prefix, n) for n in "AB"]
        if not all(s and s["updated"] > killed and s["agreement"]["pending_blocks"] == 0
                   for s in sts):
            return False
        return ring_ends("A") == ring_ends("B")
    # A block only one end got before the source went: undecided until the timeout.
    wait_until(settled, PENDING_BLOCK_TIMEOUT_S + 30, "both ends to apply every decision")
    total = 0
    for d in ("ab", "ba"):
        lo_a, hi_a, a = ring_bytes(prefix, "A", d)
        lo_b, hi_b, b = ring_bytes(prefix, "B", d)
        assert hi_a == hi_b
        # The tunnels' keepalives spend a little key: compare what both ends still hold.
        lo = max(lo_a, lo_b)
        assert hi_a - lo > hi_a // 4, f"little key left in direction {d}"
        assert a[lo - lo_a:] == b[lo - lo_b:], f"direction {d}: the two ends' rings differ"
        total += hi_a - lo
    a_st = lkm_status(prefix, "A")
    ab, ba = a_st["key"]["bytes_stored_ab"], a_st["key"]["bytes_stored_ba"]
    assert ab > ba, "a 3:1 ratio must store more key a->b"
    # The emulator is gone: the node says so and keeps running on the key it has.
    wait_until(lambda: not lkm_status(prefix, "A")["source"]["up"], 10, "source down")
    snap = collect(topo)
    assert snap["nodes"]["A"]["running"] and snap["nodes"]["B"]["running"]
    res = subprocess.run([*QKDCTL, "status", str(topo.path)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0 and "A-B" in res.stdout and "down" in res.stdout


def test_killed_key_manager_is_restarted_and_ends_still_agree(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix, rate=200, capacity="64MiB")
    man = emulation.net_up(topo)
    wait_until(lambda: (s := lkm_status(prefix, "B")) and s["key"]["bytes_stored_ab"] > 0,
               30, "key at B")
    old_pid = lkm_status(prefix, "B")["pid"]
    os.kill(old_pid, signal.SIGKILL)

    def restarted():
        s = lkm_status(prefix, "B")
        return s and s["pid"] != old_pid and s["agreement"]["synced"]
    wait_until(restarted, 20, "the supervisor to restart B's key manager")
    state = json.loads((paths.node_dir(prefix, "B") / "state.json").read_text())
    assert state["modules"][0]["restarts"] == 1
    # Key keeps flowing after the restart, and both ends agree on every byte they hold.
    s0 = lkm_status(prefix, "B")["key"]["bytes_stored_ab"]
    wait_until(lambda: lkm_status(prefix, "B")["key"]["bytes_stored_ab"] > s0, 20,
               "key to flow again")
    os.kill(man.pids["emulator:A-B"], signal.SIGTERM)
    time.sleep(1.5)
    for d in ("ab", "ba"):
        lo_a, hi_a, a = ring_bytes(prefix, "A", d)
        lo_b, hi_b, b = ring_bytes(prefix, "B", d)
        lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
        assert hi > lo
        assert a[lo - lo_a:hi - lo_a] == b[lo - lo_b:hi - lo_b]
    # SIGTERM stops the node and all its modules within seconds.
    node_pid = man.pids["node:B"]
    children = [m["pid"] for m in state["modules"] if m["pid"]]
    t0 = time.monotonic()
    os.kill(node_pid, signal.SIGTERM)
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() and
                               "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]
                               for p in [node_pid, *children]), 10, "node to stop")
    assert time.monotonic() - t0 < 10


def test_a_namespace_net_down_could_not_remove_stays_its_to_remove(tmp_path, prefix,
                                                                     monkeypatch):
    """Its manifest is what says a namespace is the network's: kept while one is left, so
    the next net down still finds (and removes) it."""
    topo = write_topology(tmp_path, prefix)
    emulation.net_up(topo, start=False)
    real_remove = pnetns.remove

    def stuck(ns: str) -> None:
        if ns == f"{prefix}-B":
            raise OSError(16, "Device or resource busy")
        real_remove(ns)

    monkeypatch.setattr(pnetns, "remove", stuck)
    with pytest.raises(emulation.NetError, match=f"{prefix}-B could not be removed"):
        emulation.net_down(prefix)
    assert emulation.Manifest.load(prefix).namespaces == [f"{prefix}-B"]
    monkeypatch.setattr(pnetns, "remove", real_remove)
    emulation.net_down(prefix)
    assert leftovers(prefix) == []


def _with_saes(tmp_path: Path, prefix: str, **sections) -> Topology:
    """A - B with an SAE at each node and the sections given (global key between them)."""
    path = tmp_path / f"{prefix}.toml"
    path.write_text(render(network("test-pre", prefix, ports={"agreement": 7301},
                                   defaults={"key_rate_mbps": 200, "block_size": "64KiB",
                                             "ring_capacity": "4MiB"}, **sections),
                           line("AB", 209, source=None), saes(("SA", "A"), ("SB", "B"))))
    return parse_topology(path.read_text(), path)


def _nothing_made(prefix: str, *dirs: Path) -> None:
    assert not paths.manifest_path(prefix).exists()
    assert leftovers(prefix) == []
    for d in dirs:
        assert not d.exists(), f"{d} was made"


def test_net_up_refuses_rings_larger_than_dev_shm_before_making_anything(
        tmp_path, prefix, monkeypatch):
    topo = write_topology(tmp_path, prefix)
    real = os.statvfs

    def small(path):  # /dev/shm with 1 MiB free of 64 MiB; the rings need 16 MiB
        st = real(path)
        if Path(path) != Path("/dev/shm"):
            return st
        return os.statvfs_result((st.f_bsize, 4096, 16384, 256, 256, *st[5:]))

    monkeypatch.setattr(emulation.os, "statvfs", small)
    with pytest.raises(emulation.NetError) as ei:
        emulation.net_up(topo, start=False)
    assert f"{topo.path}: defaults.ring_capacity: the network's rings need 16.0 MiB" \
        in str(ei.value)
    assert "1.00 MiB free of 64.0 MiB" in str(ei.value)
    _nothing_made(prefix)


def test_net_up_refuses_a_pki_or_relay_key_dir_the_file_names_and_that_does_not_exist(
        tmp_path, prefix):
    """A typo in [api] pki made a new CA (and a -ca dir with its key) there, which net
    down left behind; the SAEs holding the real certificates then got 401."""
    pki, keys = tmp_path / "pki-typo", tmp_path / "relay-typo"
    topo = _with_saes(tmp_path, prefix, api={"pki": str(pki)}, gkm={"keys": str(keys)})
    with pytest.raises(emulation.NetError) as ei:
        emulation.net_up(topo, start=False)
    msg = str(ei.value)
    assert f"{topo.path}: api.pki: {pki} does not exist" in msg
    assert f"'qkdctl pki init {pki} --config {topo.path}'" in msg
    assert f"{topo.path}: gkm.keys: {keys} does not exist" in msg
    _nothing_made(prefix, pki, tmp_path / "pki-typo-ca", keys)


def test_net_up_still_makes_the_pki_and_relay_keys_where_the_file_names_none(
        tmp_path, prefix):
    topo = _with_saes(tmp_path, prefix)
    emulation.net_up(topo, start=False)
    assert (paths.network_dir(prefix) / "pki" / "ca.crt").exists()
    assert (paths.network_dir(prefix) / "relay-keys" / "A.key_secret").exists()
    emulation.net_down(prefix)
    assert leftovers(prefix) == []


def test_net_up_points_a_pki_missing_an_sae_to_pki_issue_not_a_new_ca(tmp_path, prefix):
    from api.pki import init_pki, issue_missing

    pki = tmp_path / "pki"
    init_pki(pki, _with_saes(tmp_path, prefix, api={"pki": str(pki)}))
    ca = (pki / "ca.crt").read_bytes()
    path = tmp_path / "more.toml"
    path.write_text(_with_saes(tmp_path, prefix, api={"pki": str(pki)}).path.read_text()
                    + '\n[[saes]]\nid = "SC"\nnode = "B"\n')
    topo = parse_topology(path.read_text(), path)
    with pytest.raises(emulation.NetError, match=f"run 'qkdctl pki issue {pki} --config"):
        emulation.net_up(topo, start=False)
    assert leftovers(prefix) == []
    issue_missing(pki, topo)
    emulation.net_up(topo, start=False)
    assert (pki / "ca.crt").read_bytes() == ca


def test_net_down_keep_logs_copies_them_privately_and_says_where_they_were(tmp_path, prefix):
    """net down removed the logs with the run dir, so a failed run's were gone before
    anyone read them; --keep-logs copies them first. Without it, nothing is kept."""
    from typer.testing import CliRunner

    from control.tools.cli import app

    def up_with_a_log(text: str) -> Path:
        emulation.net_up(write_topology(tmp_path, prefix), start=False)
        log = paths.log_dir(prefix) / "node-A.log"
        log.parent.mkdir(mode=0o700, exist_ok=True)
        log.write_text(text)
        return log

    log = up_with_a_log('{"message": "link A-B: down (no key)"}\n')
    keep = tmp_path / "kept"
    r = CliRunner().invoke(app, ["net", "down", "--prefix", prefix, "--keep-logs", str(keep)],
                           env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert f"{prefix}: its logs ({log.parent}) are kept in {keep / prefix}" in r.output
    assert (keep / prefix / "node-A.log").read_text() == '{"message": "link A-B: down (no key)"}\n'
    assert stat.S_IMODE((keep / prefix).stat().st_mode) == 0o700
    assert stat.S_IMODE((keep / prefix / "node-A.log").stat().st_mode) == 0o600
    assert leftovers(prefix) == []

    up_with_a_log("second run\n")  # the same prefix again: a new directory beside the first
    emulation.net_down(prefix, keep)
    assert (keep / f"{prefix}.1" / "node-A.log").read_text() == "second run\n"
    assert (keep / prefix / "node-A.log").exists()

    log = up_with_a_log("third\n")
    r = CliRunner().invoke(app, ["net", "down", "--prefix", prefix], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert f"its logs, in {log.parent}, went with it ('net down --keep-logs DIR'" in r.output
    assert leftovers(prefix) == [] and sorted(p.name for p in keep.iterdir()) == \
        [prefix, f"{prefix}.1"]
