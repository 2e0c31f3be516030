"""qkdctl doctor: every check passes on a machine set up by `make setup`, a missing piece is
reported with its fix, and no scratch namespace outlives a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from rich.console import Console

from control.tools import doctor
from dataplane.bpf import syscall
from tests.nsutil import QKDCTL

NAMES = ["root privileges", "TUN", "network namespaces", "veth", "BPF syscall",
         "kernel headers", "bcc", "XDP multi-buffer", "nftables", "iperf3 and ip"]


def scratch_left() -> set[str]:
    """Scratch namespaces as `ip netns list` shows them (first word of each line)."""
    lines = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return {w[0] for w in (ln.split() for ln in lines) if w and w[0].startswith("qkdoc-")}


@pytest.fixture(scope="module")
def checks():
    before = scratch_left()
    result = doctor.run_checks()
    assert scratch_left() == before, "a scratch namespace outlived the run"
    return result


@pytest.mark.netns
def test_every_check_passes_here(checks):
    assert [c.name for c in checks] == NAMES
    assert [c.required for c in checks] == [True] * 7 + [False, True, False]
    for c in checks:
        assert c.ok, f"{c.name}: {c.detail} (fix: {c.fix})"
        assert c.fix == ""
    assert doctor.passed(checks)
    xdp = checks[NAMES.index("XDP multi-buffer")]
    assert xdp.info["mode"] in ("native", "generic")
    assert xdp.info["mode"] in xdp.detail
    assert checks[NAMES.index("bcc")].info["compile_ms"] > 0


@pytest.mark.netns
def test_xdp_falls_back_to_generic_mode(monkeypatch):
    monkeypatch.setattr(syscall, "XDP_FLAGS_DRV_MODE", 1 << 31)  # refused: EINVAL
    with doctor.scratch_netns() as ns:
        c = doctor.check_xdp(ns)
    assert c.ok and c.info["mode"] == "generic", c.detail
    assert ns not in scratch_left()


@pytest.mark.netns
def test_child_errors_come_back_and_a_missing_namespace_is_not_created():
    with doctor.scratch_netns() as ns, pytest.raises(RuntimeError, match="by zero"):
        doctor.in_netns(ns, lambda: 1 // 0)
    missing = doctor.scratch_name()
    with pytest.raises(RuntimeError):
        doctor.in_netns(missing, lambda: 1)
    assert not {ns, missing} & scratch_left()


@pytest.mark.netns
def test_cli_json_exit_zero_and_nothing_left():
    before = scratch_left()
    r = subprocess.run([QKDCTL, "doctor", "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert [c["name"] for c in got] == NAMES
    assert all(c["ok"] for c in got)
    assert scratch_left() == before


@pytest.mark.netns
@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv")
def test_cli_without_root_fails_with_fixes():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        QKDCTL, "doctor", "--json"], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 1 and "Permission denied" in r.stderr:
        pytest.skip("the venv is not readable by nobody")
    assert r.returncode == 1, r.stdout + r.stderr
    got = {c["name"]: c for c in json.loads(r.stdout)}
    assert not got["root privileges"]["ok"]
    assert got["root privileges"]["fix"] == doctor.FIX_ROOT
    assert not got["network namespaces"]["ok"] and got["network namespaces"]["fix"]


def test_nft_missing_is_a_required_failure_with_its_fix(monkeypatch):
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)
    c = doctor.check_nft("qkdoc-unused")
    assert not c.ok and c.required and c.fix == doctor.FIX_NFT
    assert "nft not on PATH" in c.detail and "apt-get install nftables" in c.fix


def test_headers_missing_names_the_script(tmp_path):
    c = doctor.check_headers(tmp_path)
    assert not c.ok and c.required
    assert "link-kernel-headers.sh" in c.fix and "Makefile" in c.detail
    (tmp_path / "build").mkdir()
    (tmp_path / "build/Makefile").write_text("include /elsewhere/Makefile\n")
    c = doctor.check_headers(tmp_path)
    assert not c.ok and "kconfig.h" in c.detail and "link-kernel-headers.sh" in c.fix
    (tmp_path / "source/include/linux").mkdir(parents=True)
    (tmp_path / "source/include/linux/kconfig.h").write_text("")
    assert doctor.check_headers(tmp_path).ok


def test_headers_of_another_kernel_are_said_so(tmp_path):
    """Debian's headers linked in for a kernel without its own (make setup does it): fine
    for the guard, and doctor says whose they are."""
    mod = tmp_path / "6.18.44-fc-v1300"
    (mod / "build/include/generated").mkdir(parents=True)
    (mod / "build/Makefile").write_text("")
    (mod / "build/include/linux").mkdir()
    (mod / "build/include/linux/kconfig.h").write_text("")
    uts = mod / "build/include/generated/utsrelease.h"
    uts.write_text('#define UTS_RELEASE "6.1.0-57-amd64"\n')
    c = doctor.check_headers(mod)
    assert c.ok and "headers of 6.1.0-57-amd64, not of the running 6.18.44-fc-v1300" in c.detail
    uts.write_text('#define UTS_RELEASE "6.18.44-fc-v1300"\n')
    assert "not of the running" not in doctor.check_headers(mod).detail


def test_kernel_version_parsing():
    assert doctor.kernel_version("6.1.0-56-amd64") == (6, 1)
    assert doctor.kernel_version("5.18.0") >= doctor.MIN_XDP_FRAGS_KERNEL
    assert doctor.kernel_version("5.4.0-150-generic") < doctor.MIN_XDP_FRAGS_KERNEL
    assert doctor.kernel_version("weird") == (0, 0)


def test_render_shows_failures_and_their_fixes():
    checks = [doctor.Check("root privileges", True, "effective uid 0"),
              doctor.Check("bcc", False, "import bcc failed", doctor.FIX_BCC),
              doctor.Check("XDP multi-buffer", False, "kernel 5.10", doctor.FIX_XDP_KERNEL,
                           required=False)]
    con = Console(width=200, record=True)
    con.print(doctor.render(checks))
    con.print(doctor.summary(checks))
    text = con.export_text()
    assert "✓" in text and "✗" in text and "link-bcc.sh" in text
    assert "1 required check(s) failed: bcc" in text
    assert "without the XDP guard" in text
    assert not doctor.passed(checks)
    assert doctor.passed(checks[:1] + checks[2:])  # an optional failure does not fail


def test_not_root_reported():
    assert doctor.check_root().ok == (os.geteuid() == 0)
