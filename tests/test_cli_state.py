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
