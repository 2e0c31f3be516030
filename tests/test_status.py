"""`qkdctl status` of a network that is not (all) running, and at 80 columns: a line per
node that is down, its rows blank rather than its last figures shown as live, an exit
status that says so, and tables that stay readable on a narrow terminal."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from control.core import paths
from control.core.statefile import write_json
from control.node.status import EXIT_NODE_DOWN, EXIT_NOT_UP, EXIT_RUNNING, exit_status, render
from control.tools import cli, emulation
from tests.conftest import write_topology
from tests.nsutil import QKDCTL, wait_until
from tests.test_metrics import NOW, snapshot


def _node(running: bool = True, age: float = 0.0) -> dict:
    """A node as collect_node gives it, every module fresh; its supervisor last
    published ``age`` seconds before NOW."""
    n = snapshot()
    for kind in ("links", "tunnels"):
        for st in n[kind].values():
            st["stale"] = False
    n["links"]["A-B"].update(role="leader", agreement={"synced": True, "session": 1})
    n["router"].update(address="10.88.0.1", stale=False,
                       routes={"B": {"address": "10.88.0.2", "via": "A-B", "dev": "otp0"}})
    for kind in ("gkm", "api"):
        n[kind]["stale"] = False
    n["supervisor"]["updated"] = NOW - age
    n["running"] = running
    return n


def _snap(**nodes: dict) -> dict:
    return {"network": "metro", "prefix": "tm", "time": NOW, "nodes": nodes,
            "emulated": True}


def _text(snap: dict, width: int = 200) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(snap))
    return console.export_text()


def _rows(text: str, node: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.split()[:2] in (["A-B", node], [node])]


def test_a_dead_node_gets_a_line_blank_rows_and_exit_status_1():
    """B's supervisor killed: its last figures (src up, key rates, workers 2/2, routes,
    "api running yes") were shown as live, and status exited 0."""
    snap = _snap(A=_node(), B=_node(running=False, age=16))
    text = _text(snap)
    assert "node B: not running (supervisor dead; last update 16 s ago)" in text
    assert "node A:" not in text
    b_rows = _rows(text, "B")
    assert b_rows and all("node down" in r for r in b_rows), b_rows
    for live_looking in ("Gb/s", "Mb/s", "MiB", "1/2", "B 10.88", "serving", "degraded",
                         "yes", "native"):
        assert not any(live_looking in r for r in b_rows), (live_looking, b_rows)
    assert any("Gb/s" in r for r in _rows(text, "A"))  # A's rows as they were
    assert exit_status(snap) == EXIT_NODE_DOWN
    assert exit_status(_snap(A=_node(), B=_node())) == EXIT_RUNNING


def test_a_network_with_no_node_running_says_it_is_not_up_and_exits_3():
    snap = _snap(A=_node(running=False, age=20), B=_node(running=False, age=16))
    text = " ".join(_text(snap).split())
    assert "node A: not running (supervisor dead; last update 20 s ago)" in text
    assert "network metro (tm) is not up: no node of it runs here" in text
    assert "local key per link end" not in text  # no table of blank rows
    assert exit_status(snap) == EXIT_NOT_UP
    never = _snap(A={**_node(running=False), "supervisor": None})
    assert "node A: not running (no status here" in _text(never)
    assert exit_status(never) == EXIT_NOT_UP


def test_a_stopped_module_of_a_running_node_shows_no_figures():
    a = _node()
    a["links"]["A-B"]["stale"] = a["tunnels"]["A-B"]["stale"] = True
    row = next(r for r in _text(_snap(A=a)).splitlines() if "stopped" in r and "lead" in r)
    assert "Gb/s" not in row and "MiB" not in row and " up " not in row
    assert exit_status(_snap(A=a)) == EXIT_RUNNING  # the node runs (and restarts it)


def test_a_deployed_nodes_peers_without_status_on_this_host_do_not_count():
    """One node per host: the others publish their status on their own hosts."""
    snap = _snap(A=_node(), B={**_node(running=False), "supervisor": None})
    snap["emulated"] = False
    assert exit_status(snap) == EXIT_RUNNING
    assert "node B: no status on this host" in _text(snap)
    snap["emulated"] = True
    assert exit_status(snap) == EXIT_NODE_DOWN


def test_the_tables_are_readable_at_80_columns():
    """At 80 columns nearly every cell was cut to an ellipsis and the tunnels table's
    "XDP guard" column vanished: tables too wide are split, repeating link and node."""
    a = _node()
    a["tunnels"]["A-B"]["counters"].update(tx_bytes=2_160_000, rx_bytes=2_150_000)
    snap = _snap(A=a, B=_node(running=False, age=16))
    wide, narrow = _text(snap, 250), _text(snap, 80)
    assert "…" not in narrow and max(len(ln.rstrip()) for ln in narrow.splitlines()) <= 80
    for header in ("XDP guard", "discarded", "balance", "last fill", "refused", "key used",
                   "keepalives", "last restart"):
        assert header in wide and header in narrow, header
    assert "native, 5 dropped" in narrow and "2.06 MiB" in narrow
    assert "(continued)" in narrow and "(continued)" not in wide


def _states(tmp_path, monkeypatch, **ages: float | None):
    """A network's run directory with a state.json per node, ``ages`` seconds old
    (None: no file), and its topology file."""
    monkeypatch.setattr(paths, "RUN_ROOT", tmp_path / "run")
    topo = write_topology(tmp_path, "tstat1")
    for node, age in ages.items():
        if age is not None:
            d = paths.node_dir(topo.prefix, node)
            d.mkdir(parents=True)
            write_json(d / "state.json",
                       {"node": node, "pid": 1, "updated": time.time() - age,
                        "stopping": False, "modules": []})
    return topo


@pytest.mark.parametrize(("ages", "code", "says"), [
    ({"A": 0.0, "B": 0.0}, 0, None),
    ({"A": 0.0, "B": 30.0}, 1, "node B: not running (supervisor dead; last update 30 s"),
    ({"A": 0.0, "B": None}, 0, "node B: no status on this host"),  # (no manifest)
    ({"A": 40.0, "B": 30.0}, 3, "is not up"),
    ({"A": None, "B": None}, 3, "is not up"),
])
def test_status_exit_status_says_whether_every_node_runs(tmp_path, monkeypatch, ages, code,
                                                         says):
    topo = _states(tmp_path, monkeypatch, **ages)
    for args in ([], ["--json"]):
        res = CliRunner().invoke(cli.app, ["status", str(topo.path), *args],
                                 env={"COLUMNS": "200"})
        assert res.exit_code == code, res.output
        assert isinstance(res.exception, SystemExit) or res.exception is None, res.exception
        if args:
            assert json.loads(res.output)["prefix"] == "tstat1"
        elif says:
            assert says in res.output, res.output


@pytest.mark.netns
def test_status_of_a_network_whose_node_was_killed(tmp_path, prefix):
    """kill -9 of B's supervisor (its modules die with it): status says B is not
    running and exits 1; after net down, that the network is not up, exit 3."""
    topo = write_topology(tmp_path, prefix, rate=50)
    emulation.net_up(topo)

    def status() -> subprocess.CompletedProcess:
        return subprocess.run([QKDCTL, "status", str(topo.path)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})

    wait_until(lambda: status().returncode == 0, 60, "both nodes running")
    b = json.loads((paths.node_dir(prefix, "B") / "state.json").read_text())["pid"]
    os.kill(b, signal.SIGKILL)
    wait_until(lambda: status().returncode == 1, 30, "status to see B down")
    res = status()
    assert "node B: not running (supervisor dead; last update" in res.stdout, res.stdout
    assert "…" not in res.stdout
    emulation.net_down(prefix)
    res = status()
    assert res.returncode == 3 and "is not up" in res.stdout, res.stdout + res.stderr


def test_a_hand_built_snapshot_without_running_flags_renders_as_before():
    """Snapshots of older tests (and other callers) carry no "running": taken as
    running."""
    n = _node()
    del n["running"]
    snap = _snap(A=n)
    del snap["emulated"]
    assert exit_status(snap) == EXIT_RUNNING
    assert "not running" not in _text(copy.deepcopy(snap))


def test_a_supervisor_a_loaded_machine_held_back_still_runs(tmp_path, monkeypatch):
    """A state file older than ``STALE_AFTER_S`` whose supervisor still runs (as that
    node's ``node run``) is a node running late, not a dead one: on a loaded machine a
    supervisor can miss its 0.2 s turn for seconds, and status must not exit 1 for it."""
    import sys

    from control.node.status import collect_node, supervisor_runs

    topo = _states(tmp_path, monkeypatch, A=30.0, B=30.0)
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "node", "run", "--config", str(topo.path), "--node", "B",
                             "--netns", paths.netns_name(topo.prefix, "B")])
    try:  # its command line is there once the exec is done (empty just after Popen)
        wait_until(lambda: b"--node" in Path(f"/proc/{fake.pid}/cmdline").read_bytes(), 30,
                   "the stand-in supervisor to start")
        for node, pid in (("A", os.getpid()), ("B", fake.pid)):
            state = paths.node_dir(topo.prefix, node) / "state.json"
            doc = json.loads(state.read_text())
            write_json(state, {**doc, "pid": pid})
        now = time.time()
        assert not collect_node(topo, "A", now)["running"]  # pytest is no supervisor of A
        assert collect_node(topo, "B", now)["running"]
        assert not supervisor_runs({"pid": fake.pid}, "B", "other")  # another network's B
    finally:
        fake.kill()
        fake.wait()
    assert not collect_node(topo, "B", time.time())["running"]  # and gone, it is not
