"""qkdctl's answers to ordinary mistakes: one clear line naming what is wrong and a
non-zero exit status, never a traceback; and lines that are not cut when piped."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from control.tools import cli

TRIANGLE = Path(__file__).resolve().parent.parent / "examples" / "triangle.toml"


def _invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "300"})


@pytest.mark.parametrize("command", ["pki", "keys"])
def test_init_into_a_file_or_under_a_missing_directory_says_so_in_one_line(tmp_path,
                                                                           command):
    afile = tmp_path / "afile"
    afile.write_text("")
    for target, named, why in (
            (afile, afile, "it exists and is not a directory"),
            (afile / "x", afile / "x", "not a directory"),
            (Path("/proc/nope/x"), Path("/proc/nope"), "no such file or directory")):
        res = _invoke(command, "init", str(target), "--config", str(TRIANGLE))
        assert res.exit_code == 1, res.output
        assert isinstance(res.exception, SystemExit), res.exception  # not a traceback
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and f"{named}: {why}" in lines[0], res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_the_emulator_of_an_unknown_link_is_refused_naming_the_links():
    res = _invoke("emulator", "run", "--config", str(TRIANGLE), "--link", "X-Y")
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    assert res.output.strip() == (f"no link named 'X-Y' in {TRIANGLE} "
                                  f"(links: A-B, B-C, A-C)")


@pytest.mark.parametrize("rate", ["-3", "nan", "-0.5", "2e6"])
def test_a_key_rate_the_emulator_cannot_keep_is_refused(monkeypatch, rate):
    """A negative rate fell into "0 = as fast as possible": the link ran unthrottled."""
    from control.lkm import emulator

    started = []
    monkeypatch.setattr(emulator, "run_emulator", lambda *a, **k: started.append(a))
    res = _invoke("emulator", "run", "--config", str(TRIANGLE), "--link", "A-B",
                  "--rate-mbps", rate)
    assert res.exit_code == 2 and not started, res.output
    assert "--rate-mbps" in res.output and "is not a key rate" in res.output


def test_run_emulator_refuses_a_negative_rate_before_it_serves(tmp_path):
    from control.lkm.emulator import run_emulator

    stop = threading.Event()
    stop.set()
    socks = (tmp_path / "a.sock", tmp_path / "b.sock")
    for bad in (-3.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="key rate"):
            run_emulator(socks, bad, 4096, "urandom", stop, max_blocks=0)
    assert not any(s.exists() for s in socks)


def test_errors_are_not_wrapped_when_stderr_is_not_a_terminal(tmp_path):
    """stderr piped or logged used to be cut at 80 columns, splitting the command an
    error suggested over two lines."""
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "triangle.toml"
    deep.parent.mkdir()
    deep.write_text(TRIANGLE.read_text())
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    res = subprocess.run([sys.executable, "-P", "-m", "control.tools.cli", "node", "run",
                          "--config", str(deep), "--node", "Z"],
                         capture_output=True, text=True, env=env, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 2, res.stderr
    want = f"no node named 'Z' in {deep} (known: A, B, C)"
    assert len(want) > 100 and res.stderr.strip() == want


def test_status_of_a_prefix_that_is_not_up_says_which(tmp_path, monkeypatch):
    from control.core import paths

    monkeypatch.setattr(paths, "RUN_ROOT", tmp_path)
    res = _invoke("status", "--prefix", "nosuch")
    assert res.exit_code != 0
    assert res.output.strip().startswith("no network with prefix 'nosuch' is up")
    res = _invoke("status")
    assert res.exit_code != 0 and "no network is up here" in res.output


def test_net_status_of_a_network_taken_down_says_it_is_not_up(tmp_path, monkeypatch):
    """It printed "P from None" and exited 0."""
    from control.core import paths

    monkeypatch.setattr(paths, "RUN_ROOT", tmp_path)
    res = _invoke("net", "status", "--prefix", "tgone1")
    assert res.exit_code == 1, res.output
    assert res.output.strip().startswith("tgone1: not up") and "None" not in res.output


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    res = _invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"qkdctl (qkdnet) {version('qkdnet')}"


def test_command_summaries_in_the_help_do_not_break_where_the_docstring_does():
    for group, command, ends in (([], "stats", "own counters."),
                                 ([], "demo", "every claim held."),
                                 (["bench"], "routing", "over one path, then as two")):
        res = _invoke(*group, "--help")
        assert res.exit_code == 0, res.output
        row = next(ln for ln in res.output.splitlines() if f" {command} " in ln)
        assert ends in row, row
