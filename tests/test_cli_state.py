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
