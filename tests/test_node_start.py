"""A node's start-up order, for real in a namespace: ``node_net`` is unreachable before the
node address exists and before any module runs, and a node whose route cannot be
installed does not start at all."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading

import pytest
from pyroute2 import netns as pnetns

from control.core import paths
from control.tools import emulation
from tests.conftest import write_topology
from tests.nsutil import QKDCTL, wait_until

pytestmark = pytest.mark.netns


class Monitor:
    """``ip monitor route address`` in a namespace, its lines collected as they come."""

    def __init__(self, ns: str):
        self.ns = ns
        self.lines: list[str] = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "ip", "-o", "monitor",
                                      "route", "address"], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        # Listening once an event of our own shows up (no fixed sleep); one made before
        # it listened is lost, so make them until one is seen.
        self._probes = 0
        wait_until(self._probe, 60, "ip monitor", step=0.5)

    def _probe(self) -> bool:
        if self.first("192.0.2.") is not None:
            return True
        self._probes += 1
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "route", "add", "unreachable",
                        f"192.0.2.{self._probes}/32"], check=True)
        return False

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def first(self, *words: str) -> int | None:
        return next((i for i, line in enumerate(self.lines)
                     if all(w in line for w in words)), None)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_node_net_is_unreachable_before_the_node_address_and_any_module(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix)
    man = emulation.net_up(topo, start=False)
    mon = Monitor(paths.netns_name(prefix, "A"))
    try:
        emulation.start_processes(topo, man)
        address = f"{topo.node('A').address}/32"
        wait_until(lambda: mon.first("inet", address) is not None, 40, "A's node address")
        route = mon.first("unreachable", str(topo.node_net))
        assert route is not None and route < mon.first("inet", address), mon.lines
    finally:
        mon.close()
    # And the supervisor started no module before the namespace was ready.
    log = paths.log_dir(prefix) / "node-A.log"
    wait_until(lambda: log.exists() and "started router" in log.read_text(), 30,
               "the modules to start")
    msgs = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    ready = next(i for i, m in enumerate(msgs) if "unreachable" in m)
    assert ready < next(i for i, m in enumerate(msgs) if "started" in m), msgs


def test_a_node_whose_route_cannot_be_installed_does_not_start(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix)
    emulation.net_up(topo, start=False)
    ns = paths.netns_name(prefix, "A")
    # In a user namespace of its own the node has no CAP_NET_ADMIN over its network
    # namespace: the kernel refuses the route (and everything else that needs it).
    res = subprocess.run(["ip", "netns", "exec", ns, "unshare", "-Ur", QKDCTL, "node", "run",
                          "--config", str(topo.path), "--node", "A"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "cannot install the unreachable route for node_net" in res.stderr, res.stderr
    assert "the node does not start" in res.stderr
    assert "started" not in res.stderr  # no module ran
    assert not list(paths.node_dir(prefix, "A").glob("*.json"))
    addrs = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "addr", "show", "lo"],
                           capture_output=True, text=True).stdout
    assert str(topo.node("A").address) not in addrs


def test_a_node_whose_secrets_cannot_be_read_does_not_start_nor_make_a_namespace(tmp_path,
                                                                                 prefix):
    """A missing or unsafe secret is found before any module runs (each module alone
    would restart every few seconds for good, the rest of the node half up); a mistyped
    namespace is refused, not made."""
    topo = write_topology(tmp_path, prefix)
    emulation.net_up(topo, start=False)
    key = paths.link_key_path(prefix, "A-B")
    key.chmod(0o644)
    res = subprocess.run([QKDCTL, "node", "run", "--config", str(topo.path), "--node", "A",
                          "--netns", paths.netns_name(prefix, "A")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "link authentication key" in res.stderr and "chmod 600" in res.stderr, res.stderr
    assert "the node does not start" in res.stderr and "started" not in res.stderr
    key.chmod(0o600)
    typo = f"{prefix}-typo"
    res = subprocess.run([QKDCTL, "node", "run", "--config", str(topo.path), "--node", "A",
                          "--netns", typo], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and f"no network namespace {typo!r}" in res.stderr, res.stderr
    assert typo not in pnetns.listnetns()


def test_a_second_supervisor_of_a_running_node_is_refused_and_the_first_runs_on(tmp_path,
                                                                                prefix):
    """Two instances of one node would fight for its TUN queues, ports, XDP programs and
    rings (a restart racing a start still under way did that): a second supervisor is
    refused at once, naming the first, and changes nothing. Once the first is killed, a
    new one waits for every module of the old one to end, then starts."""
    topo = write_topology(tmp_path, prefix)
    man = emulation.net_up(topo)
    state = paths.node_dir(prefix, "A") / "state.json"
    log = paths.log_dir(prefix) / "node-A-again.log"

    def modules() -> dict[str, int]:
        with contextlib.suppress(OSError, ValueError):
            return {m["name"]: m["pid"] for m in json.loads(state.read_text())["modules"]
                    if m["alive"]}
        return {}
    wait_until(lambda: "router" in modules(), 60, "A's modules")
    before, first = modules(), man.pids["node:A"]
    cmd = [QKDCTL, "node", "run", "--config", str(topo.path), "--node", "A",
           "--netns", paths.netns_name(prefix, "A")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"it runs already (supervisor pid {first})" in res.stderr, res.stderr
    assert modules() == before
    # A module that cannot end yet (stopped) keeps the node taken after its supervisor
    # is killed: the new supervisor waits, and starts nothing meanwhile.
    held = before["router"]
    os.kill(held, signal.SIGSTOP)
    os.kill(first, signal.SIGKILL)
    with open(log, "wb") as out:
        again = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    emulation._record(man, "node:A", again.pid)
    try:
        wait_until(lambda: "waiting for the processes of its previous run" in
                   log.read_text(), 60, "the new supervisor to wait for the old router")
        assert "started" not in log.read_text()
    finally:
        os.kill(held, signal.SIGCONT)  # its pending SIGTERM (its parent's death) ends it
    wait_until(lambda: "router" in modules() and modules()["router"] != held, 60,
               "A started again")
    assert again.poll() is None
