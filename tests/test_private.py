"""Secrets at rest and what the node trusts on disk: every file and directory a running
node makes is its owner's alone; files planted under a node's names (by another user, or
as links) are refused, not used; a recorded pid that now names another process is not
signalled."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest

from control.core import paths
from control.core.procs import process_identity
from control.core.statefile import write_json
from control.tools import emulation
from dataplane.private import NotPrivateError, open_private, private_dir
from dataplane.ring import ROLE_ENC, SHM_DIR, CursorFile, KeyRing, RingError
from dataplane.stats import SIZE, LinkStats
from tests.nsutil import wait_until

OTHER_UID = 65534  # nobody


@pytest.fixture
def shm_name():
    n = f"qkdnet-test{os.getpid()}-{uuid4().hex[:8]}"
    yield n
    (SHM_DIR / n).unlink(missing_ok=True)


def _plant(path: Path, size: int = 0, uid: int = OTHER_UID, mode: int = 0o666) -> None:
    """A file another user made under one of the node's names, before the node did."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.chown(path, uid, -1)
    os.chmod(path, mode)


# ---- files planted in /dev/shm and the run directory ------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to plant another "
                                                          "user's file")


@needs_root
@pytest.mark.parametrize("uid,mode,words", [(OTHER_UID, 0o600, "owned by uid 65534"),
                                            (OTHER_UID, 0o666, "owned by uid 65534"),
                                            (0, 0o644, "has mode 0644")])
def test_a_ring_file_planted_before_the_node_is_refused(shm_name, tmp_path, uid, mode, words):
    path = SHM_DIR / shm_name
    _plant(path, uid=uid, mode=mode)
    with pytest.raises(RingError, match=words):
        KeyRing.create_or_attach(shm_name, 1 << 16, 4096, ROLE_ENC,
                                 CursorFile(tmp_path / "c"))
    with pytest.raises(RingError, match=words):
        KeyRing.attach(shm_name)
    assert path.stat().st_size == 0  # nothing written into it
    assert path.stat().st_uid == uid


def test_a_link_at_a_ring_name_is_refused(shm_name, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    os.symlink(victim, SHM_DIR / shm_name)
    with pytest.raises(RingError, match="symbolic link"):
        KeyRing.create_or_attach(shm_name, 1 << 16, 4096, ROLE_ENC,
                                 CursorFile(tmp_path / "c"))
    with pytest.raises(RingError, match="symbolic link"):
        KeyRing.attach(shm_name)
    assert victim.stat().st_size == 0
    # A hard link to a file of ours elsewhere on the same file system: refused too.
    (SHM_DIR / shm_name).unlink()
    other = SHM_DIR / f"{shm_name}-other"
    try:
        other.write_bytes(b"")
        os.chmod(other, 0o600)
        os.link(other, SHM_DIR / shm_name)
        with pytest.raises(RingError, match="2 hard links"):
            KeyRing.create_or_attach(shm_name, 1 << 16, 4096, ROLE_ENC,
                                     CursorFile(tmp_path / "c"))
    finally:
        other.unlink(missing_ok=True)


@needs_root
def test_a_planted_stats_file_is_refused_so_its_pids_are_never_signalled(shm_name):
    """The tunnel manager kills the workers whose identities the stats file records: a
    file another user wrote must never be read as ours."""
    _plant(SHM_DIR / shm_name, size=SIZE)
    with pytest.raises(NotPrivateError, match="owned by uid 65534"):
        LinkStats(shm_name, create=True)
    with pytest.raises(NotPrivateError):
        LinkStats(shm_name)


def test_a_ring_of_ours_is_created_private_and_attached_again(shm_name, tmp_path):
    r = KeyRing.create_or_attach(shm_name, 1 << 16, 4096, ROLE_ENC, CursorFile(tmp_path / "c"))
    try:
        st = (SHM_DIR / shm_name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        again = KeyRing.create_or_attach(shm_name, 1 << 16, 4096, ROLE_ENC,
                                         CursorFile(tmp_path / "c"))
        assert again.epoch == r.epoch  # a survivor (process crash) is attached, not remade
        again.close()
    finally:
        r.close()


def test_status_files_are_never_written_through_a_planted_link(tmp_path):
    d = private_dir(tmp_path / "node")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = d / "lkm-A-B.json"
    os.symlink(victim, d / f".{target.name}.{os.getpid()}.tmp")  # at the temporary name
    write_json(target, {"ok": 1})
    assert victim.read_text() == "precious"
    assert json.loads(target.read_text()) == {"ok": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    os.symlink(victim, d / "tun-A-B.json")  # at the final name: the link is replaced
    write_json(d / "tun-A-B.json", {"ok": 2})
    assert victim.read_text() == "precious"
    assert not (d / "tun-A-B.json").is_symlink()


def test_private_dirs(tmp_path):
    d = tmp_path / "a" / "b"
    assert private_dir(d) == d and stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o755)
    private_dir(d)  # readable by others: narrowed
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o777)
    with pytest.raises(NotPrivateError, match="others may write"):
        private_dir(d)  # writable by others: refused, left alone
    assert stat.S_IMODE(d.stat().st_mode) == 0o777
    os.symlink(d, tmp_path / "link")
    with pytest.raises(NotPrivateError, match="symbolic link"):
        private_dir(tmp_path / "link")
    with pytest.raises(FileNotFoundError):
        open_private(tmp_path / "absent")


# ---- recorded process ids ------------------------------------------------------------------

def _sleeper(*extra: str) -> subprocess.Popen:
    """A process that looks like qkdnet's (its command line names control.tools.cli)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             "control.tools.cli", "node", "run", *extra])


@pytest.mark.netns
def test_net_down_never_signals_a_recorded_pid_that_names_another_process(prefix):
    unrelated, ours = _sleeper(), _sleeper()
    try:
        wait_until(lambda: process_identity(unrelated.pid) and process_identity(ours.pid),
                   10, "both processes to start")
        real = process_identity(unrelated.pid)
        # The process recorded under this pid has exited and the kernel gave its pid to
        # an unrelated process (same pid, another start time).
        stale = ((real >> 24) - 1) << 24 | unrelated.pid
        man = emulation.Manifest(prefix=prefix, config="/nonexistent/net.toml",
                                 namespaces=[], pids={"node:A": unrelated.pid,
                                                      "node:B": ours.pid},
                                 created=time.time(),
                                 idents={"node:A": stale, "node:B": process_identity(ours.pid)})
        man.save()
        removed = emulation.net_down(prefix)
        assert ours.wait(10) is not None  # the recorded process itself is stopped
        assert unrelated.poll() is None, "an unrelated process was signalled"
        assert f"process {unrelated.pid}" not in removed
    finally:
        for p in (unrelated, ours):
            p.kill()
            p.wait()


# ---- everything a running node made ------------------------------------------------------

GKM = """block_size = "256KiB"
low_watermark = "1MiB"
high_watermark = "2MiB"
window = "1MiB"
pairs = [["A", "B"]]"""
SAES = """
[api]
workers = 1
[[saes]]
id = "a1"
node = "A"
[[saes]]
id = "b1"
node = "B"
"""


def _gkm_dec_stored(prefix: str) -> int:
    try:
        st = json.loads((paths.node_dir(prefix, "B") / "gkm.json").read_text())
        return st["peers"]["A"]["dec"]["stored"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0


@pytest.mark.netns
def test_everything_a_running_node_made_is_its_owners_alone(tmp_path, prefix):
    from tests.test_tunnel import make_net

    topo, _ = make_net(tmp_path, prefix, two=True, gkm=GKM, key_rate=200, extra=SAES)
    wait_until(lambda: _gkm_dec_stored(prefix) > 0, 60, "global key stored at B")
    run = paths.network_dir(prefix)
    made = [run, *run.rglob("*"), *(SHM_DIR / n for n in paths.ring_names_of_network(prefix))]
    kinds = {"dir": 0, "file": 0, "socket": 0}
    loose = []
    for p in made:
        try:
            st = os.lstat(p)
        except FileNotFoundError:  # a status file's temporary twin, renamed over it since
            continue               # it was listed (write_private: a temporary, then rename)
        if stat.S_ISDIR(st.st_mode):
            kinds["dir"] += 1
        elif stat.S_ISSOCK(st.st_mode):
            kinds["socket"] += 1
        elif stat.S_ISREG(st.st_mode):
            kinds["file"] += 1
        else:
            loose.append(f"{p}: neither file, directory nor socket")
            continue
        public = p.suffix == ".crt"  # certificates: others may read, never write
        if st.st_uid != os.geteuid() or st.st_mode & (0o022 if public else 0o077):
            loose.append(f"{p}: uid {st.st_uid} mode {stat.S_IMODE(st.st_mode):04o}")
    assert not loose, "\n".join(loose)
    # It did look at everything: rings, RocksDB, state, keys, certificates, sockets, logs.
    names = {p.name for p in made}
    assert {"gkm.sock", "state.json", "CURRENT", "a1.key", "A.key", "A-B.key"} <= names, \
        sorted(names)
    assert any(n.endswith("-ab") for n in names) and kinds["socket"] >= 3
    # The CA key is not among the files the nodes read.
    assert not (topo.api.pki / "ca.key").exists()
    assert (run / "pki-ca" / "ca.key").exists()


def test_a_secret_is_read_only_from_a_file_of_ours_alone_never_through_a_link(tmp_path):
    from dataplane.private import secret_file

    key = tmp_path / "node.key"
    key.write_bytes(b"secret")
    key.chmod(0o600)
    with secret_file(key, "TLS key") as checked:
        assert Path(checked).read_bytes() == b"secret"  # the checked descriptor's file
    key.chmod(0o640)
    with pytest.raises(NotPrivateError, match="refusing TLS key .*mode 0640.*chmod 600"), \
            secret_file(key, "TLS key"):
        pass
    key.chmod(0o600)
    (tmp_path / "link.key").symlink_to(key)
    with pytest.raises(NotPrivateError, match="symbolic link"), \
            secret_file(tmp_path / "link.key", "TLS key"):
        pass


def test_a_trust_anchor_may_be_read_by_all_but_written_by_its_owner_alone(tmp_path):
    from dataplane.private import check_trusted

    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----")
    ca.chmod(0o644)
    check_trusted(ca, "CA file")
    ca.chmod(0o664)
    with pytest.raises(NotPrivateError, match="refusing CA file .*mode 0664.*chmod go-w"):
        check_trusted(ca, "CA file")
