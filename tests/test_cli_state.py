"""qkdctl's reading of a network's state by someone who may not (a network's state is its
user's alone): a clear refusal, not a traceback."""

from __future__ import annotations

from typer.testing import CliRunner

from control.tools import cli, emulation


def test_status_of_a_network_one_may_not_read_says_so(monkeypatch):
    def denied() -> list[str]:
        raise PermissionError(13, "Permission denied", "/run/qkdnet/tri")

    monkeypatch.setattr(emulation, "known_prefixes", denied)
    runner = CliRunner()
    for args in (["status"], ["net", "status"]):
        res = runner.invoke(cli.app, args, env={"COLUMNS": "300"})
        assert res.exit_code == 1, res.output
        assert "cannot read /run/qkdnet/tri" in res.output and "run this as root" in res.output
        assert "Traceback" not in res.output


def test_net_down_waits_out_a_nodes_whole_shutdown_before_killing_it():
    """net down's wait for a node's supervisor covers the supervisor's own stop budget
    (the key API's graceful shutdown and its workers' hands, then the other modules): it
    used to be shorter, and the supervisor was killed while it was still stopping them."""
    from pathlib import Path

    from api.server import STOP_EXTRA_S
    from control.core.config import load_topology
    from control.node.supervisor import STOP_GRACE_S

    path = Path(__file__).resolve().parent.parent / "examples" / "triangle.toml"
    topo = load_topology(path)
    assert topo.saes
    needed = topo.api.graceful_shutdown_s + STOP_EXTRA_S + 2 + STOP_GRACE_S
    assert emulation._grace_of(str(path)) > needed


def test_a_module_its_node_keeps_restarting_shows_in_status():
    import io

    from rich.console import Console

    from control.node.status import render, restarted_modules

    def node(modules: list[dict]) -> dict:
        return {"supervisor": {"modules": modules, "stopping": False, "updated": 0.0},
                "links": {}, "tunnels": {}, "router": None, "gkm": None, "api": None}

    snap = {"network": "n", "prefix": "tt", "time": 100.0, "nodes": {
        "A": node([{"name": "lkm:A-B", "alive": False, "restarts": 7, "last_exit": 1,
                    "last_restart": 95.0},
                   {"name": "router", "alive": True, "restarts": 0, "last_exit": None,
                    "last_restart": None}]),
        "B": node([])}}
    assert [(n, m["name"]) for n, m in restarted_modules(snap)] == [("A", "lkm:A-B")]
    buf = io.StringIO()
    Console(file=buf, width=200).print(render(snap))
    line = next(ln for ln in buf.getvalue().splitlines() if "lkm:A-B" in ln)
    assert line.split() == ["A", "lkm:A-B", "no", "7", "1", "5", "s", "ago"]
    snap["nodes"]["A"]["supervisor"]["modules"][0]["restarts"] = 0
    buf = io.StringIO()
    Console(file=buf, width=200).print(render(snap))
    assert "restarted by their node" not in buf.getvalue()  # nothing to say: no table


def test_a_stray_folder_in_the_run_root_is_no_network(tmp_path, monkeypatch):
    from control.core import paths

    monkeypatch.setattr(paths, "RUN_ROOT", tmp_path)
    for name in ("Tri", "ok1", "x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "net.json").write_text("{}")
    assert emulation.known_prefixes() == ["ok1"]


def test_nodes_and_emulators_start_without_the_current_directory_on_their_import_path(
        tmp_path, monkeypatch):
    """net up runs as root, often from a directory others may write to (/tmp): a
    ``control`` package planted there ran as root in every node and emulator it started
    (``python -m`` puts the current directory first on the import path; a helper's audit
    did it). They start with ``-P`` now."""
    import contextlib
    import os

    from tests.nsutil import wait_until

    planted = tmp_path / "control"
    planted.mkdir()
    marker = tmp_path / "planted-code-ran"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    log = tmp_path / "logs" / "spawned.log"
    monkeypatch.chdir(tmp_path)
    pid = emulation._spawn(["--help"], log)
    wait_until(lambda: "Usage" in log.read_text(), 60, "qkdctl's help from the child")
    with contextlib.suppress(ChildProcessError):  # (reaped already)
        os.waitpid(pid, 0)
    assert not marker.exists(), "code planted in the current directory ran in the child"
