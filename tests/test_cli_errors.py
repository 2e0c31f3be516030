"""qkdctl's answers to ordinary mistakes: one clear line naming what is wrong and a
non-zero exit status, never a traceback; and lines that are not cut when piped."""

from __future__ import annotations

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
