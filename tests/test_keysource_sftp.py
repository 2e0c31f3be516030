"""Key files over SSH/SFTP (control.lkm.source_sftp): the pure parts (names, order, config)
directly, then against real OpenSSH servers started here on loopback, each with its own
host key, authorized_keys and sshd_config: one server per QKD device.

Integration tests check that both ends of a link end up with identical rings, that files
leave the devices once stored, and that a server killed mid-transfer leaves no
half-stored block while the link resumes."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control.core import paths
from control.core.config import ConfigError, parse_topology
from control.lkm.source import SourceUnavailable, make_source
from control.lkm.source_sftp import (
    MAX_ID,
    Backoff,
    Entry,
    SftpSource,
    key_name,
    parse_key_name,
    plan_fetch,
)
from dataplane.ring import KeyRing
from tests.nsutil import wait_until

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
needs_sshd = pytest.mark.skipif(not (os.access(SSHD, os.X_OK) and shutil.which("ssh-keygen")
                                     and os.geteuid() == 0),
                                reason="needs root, sshd and ssh-keygen (make setup "
                                       "installs openssh-server)")

# ---- pure parts -----------------------------------------------------------------------


def test_key_file_names():
    assert parse_key_name("7-42.key") == (7, 42)
    assert parse_key_name("0-0.key") == (0, 0)
    assert parse_key_name(f"{MAX_ID}-{MAX_ID}.key") == (MAX_ID, MAX_ID)
    assert key_name((7, 42)) == "7-42.key"
    for bad in ("7-042.key", "07-1.key", f"{MAX_ID + 1}-0.key", "7-42.key.part",
                ".7-42.key", "7_42.key", "7-42", "-1-2.key", "a-1.key", "7-42.KEY", ""):
        assert parse_key_name(bad) is None, bad


def test_plan_orders_by_number_and_refuses_what_the_link_cannot_take():
    entries = [Entry("1-10.key", 100), Entry("1-9.key", 100), Entry("2-0.key", 100),
               Entry("0-99.key", 100), Entry("1-9.key.tmp", 5), Entry("notes.txt", 5),
               Entry("1-11.key", 0), Entry("1-12.key", 101), Entry("1-13.key", 10, False),
               Entry("1-14.key", 99)]
    plan = plan_fetch(entries, None, 100)
    assert [b for b, _ in plan.fetch] == [(0, 99), (1, 9), (1, 10), (2, 0)]
    assert sorted(e.name for e, _ in plan.refused) == ["1-11.key", "1-12.key", "1-13.key",
                                                       "1-14.key"]
    why = dict((e.name, why) for e, why in plan.refused)
    # Both ends must store blocks of one length: any other size is refused.
    assert why["1-12.key"] == why["1-14.key"].replace("99", "101") == \
        "101 B, not the link's block size (100 B)"
    assert plan.stale == []
    # After (1, 9) was delivered, what sorts at or before it is stale, never fetched.
    plan = plan_fetch(entries, (1, 9), 100)
    assert [b for b, _ in plan.fetch] == [(1, 10), (2, 0)]
    assert [b for b, _ in plan.stale] == [(0, 99), (1, 9)]


def test_backoff_doubles_to_a_limit_and_resets():
    b = Backoff(first=1.0, limit=5.0)
    assert b.ready(0.0)
    delays = []
    for t in range(5):
        b.failed(float(t))
        delays.append(b.delay)
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not b.ready(4.0) and b.ready(9.0)
    b.succeeded()
    assert b.ready(0.0) and b.delay == 0.0


HOST_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
            "device-a")

SFTP_TOPOLOGY = """
[network]
name = "sftp"
prefix = "{prefix}"
[defaults]
block_size = "{block}"
ring_capacity = "{capacity}"
ratio = "1:1"
[ports]
agreement = {port}
[gkm]
pairs = []
[[nodes]]
name = "A"
[[nodes]]
name = "B"
[[links]]
a = "A"
b = "B"
underlay = ["{ul_a}/30", "{ul_b}/30"]
[links.source]
kind = "sftp"
poll_ms = 20
{ends}
"""


def _end(which: str, **kw) -> str:
    lines = [f"[links.source.{which}]"]
    for k, v in kw.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def _topology(tmp_path: Path, ends: str, prefix: str = "tsftp", block: str = "64KiB",
              capacity: str = "4MiB", port: int = 7301,
              underlay: tuple[str, str] = ("10.9.0.1", "10.9.0.2")):
    path = tmp_path / "sftp.toml"
    path.write_text(SFTP_TOPOLOGY.format(prefix=prefix, block=block, capacity=capacity,
                                         port=port, ul_a=underlay[0], ul_b=underlay[1],
                                         ends=ends))
    return parse_topology(path.read_text(), path)


GOOD_A = dict(host="qkd-a.example", port=2222, user="qkd", key_file="keys/a",
              host_key=HOST_KEY, directory="/var/qkd/keys")
GOOD_B = dict(host="10.0.0.7", user="qkd", key_file="/etc/qkd/b",
              known_hosts="known_hosts", directory="keys")


def test_config_takes_per_end_devices(tmp_path):
    topo = _topology(tmp_path, _end("a", **GOOD_A) + _end("b", **GOOD_B))
    src = topo.links[0].source
    assert src.kind == "sftp" and src.a.port == 2222 and src.b.port == 22
    assert src.poll_ms == 20
    a = make_source(topo, "A", topo.links[0])
    b = make_source(topo, "B", topo.links[0])
    assert isinstance(a, SftpSource) and isinstance(b, SftpSource)
    assert a.description == "sftp qkd@qkd-a.example:2222:/var/qkd/keys"
    # Relative paths are taken from the topology file's directory.
    assert a.key_file == tmp_path / "keys/a" and b.known_hosts == tmp_path / "known_hosts"
    assert b.key_file == Path("/etc/qkd/b") and a.max_size == 64 << 10


@pytest.mark.parametrize("a, b, field, words", [
    ({**GOOD_A, "host_key": None}, GOOD_B, "links[0].source.sftp.a",
     "exactly one of known_hosts and host_key"),
    ({**GOOD_A, "known_hosts": "kh"}, GOOD_B, "links[0].source.sftp.a",
     "exactly one of known_hosts and host_key"),
    ({**GOOD_A, "host_key": "ssh-ed25519 not*base64"}, GOOD_B,
     "links[0].source.sftp.a.host_key", "not valid base64"),
    ({**GOOD_A, "host_key": "ssh-dss AAAA"}, GOOD_B, "links[0].source.sftp.a.host_key",
     "expected '<type> <base64 key>'"),
    ({**GOOD_A, "host_key": "ssh-rsa " + HOST_KEY.split()[1]}, GOOD_B,
     "links[0].source.sftp.a.host_key", "not a ssh-rsa key"),
    ({**GOOD_A, "port": 0}, GOOD_B, "links[0].source.sftp.a.port", "greater than"),
    (GOOD_A, {**GOOD_B, "user": "bad user"}, "links[0].source.sftp.b.user",
     "should match pattern"),
    (GOOD_A, {**GOOD_B, "directory": ""}, "links[0].source.sftp.b.directory",
     "at least 1 character"),
    (GOOD_A, {**GOOD_B, "password": "x"}, "links[0].source.sftp.b.password",
     "unknown field"),
    (GOOD_A, {k: v for k, v in GOOD_B.items() if k != "host"},
     "links[0].source.sftp.b.host", "required field is missing"),
])
def test_config_refuses_bad_device_settings(tmp_path, a, b, field, words):
    a = {k: v for k, v in a.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        _topology(tmp_path, _end("a", **a) + _end("b", **b))
    problems = err.value.problems
    assert any(f == field and words in msg for f, msg in problems), problems


def test_the_readme_example_is_a_valid_link_source(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme[readme.index('[links.source]\nkind = "sftp"'):]
    block = block[:block.index("```")]
    text = SFTP_TOPOLOGY.replace("[links.source]\nkind = \"sftp\"\npoll_ms = 20\n{ends}",
                                 block)
    text = text.format(prefix="tsftp", block="1MiB", capacity="4MiB", port=7301,
                       ul_a="10.9.0.1", ul_b="10.9.0.2")
    topo = parse_topology(text, tmp_path / "t.toml")
    src = topo.links[0].source
    assert src.kind == "sftp" and src.a.known_hosts and src.b.host_key and src.b.port == 22


def test_config_refuses_a_missing_end_and_an_unknown_kind(tmp_path):
    with pytest.raises(ConfigError) as err:
        _topology(tmp_path, _end("a", **GOOD_A))
    assert ("links[0].source.sftp.b", "required field is missing") in err.value.problems
    path = tmp_path / "x.toml"
    text = (tmp_path / "sftp.toml").read_text().replace('kind = "sftp"', 'kind = "ftp"')
    with pytest.raises(ConfigError, match="links\\[0\\].source.*'emulator'.*'sftp'"):
        parse_topology(text, path)


# ---- a real OpenSSH server per device ---------------------------------------------------


def _own_port(address: str) -> int:
    """A free port at ``address`` below the kernel's ephemeral range (read, not assumed),
    so no socket the kernel numbers, in any test running beside this one, can take it
    between our pick and the server's bind. The probe bind skips ports a host service
    holds on every address; with a loopback address of our own, two of our picks do not
    meet."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low <= 2048:
        pytest.skip(f"ephemeral ports start at {low}: no room below them for our own")
    while True:
        port = 1024 + int.from_bytes(os.urandom(4), "big") % (low - 1024)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind((address, port))
            return port


def _own_address() -> str:
    """A loopback address for one test device (127.200.0.1 .. 127.249.255.254), apart
    from the links' underlays (127.100-199.x.y)."""
    n = int.from_bytes(os.urandom(3), "big")
    return f"127.{200 + n % 50}.{n // 50 % 256}.{1 + n // 12800 % 254}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd's per-connection children call setsid, so a
    process group would miss them)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class Device:
    """A QKD device as the key manager sees it: an OpenSSH server on loopback serving a
    key directory, with its own host key, one authorised client key and sshd_config."""

    def __init__(self, root: Path, name: str):
        self.root = root / f"device-{name}"
        self.keys = self.root / "keys"
        self.keys.mkdir(parents=True)
        self.addr = _own_address()
        self.port = _own_port(self.addr)
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(self.root / key)], check=True)
        (self.root / "authorized_keys").write_text((self.root / "client_key.pub").read_text())
        pub = (self.root / "host_key.pub").read_text().split()
        self.host_key = f"{pub[0]} {pub[1]}"
        (self.root / "known_hosts").write_text(f"[{self.addr}]:{self.port} {self.host_key}\n")
        (self.root / "sshd_config").write_text(f"""\
Port {self.port}
ListenAddress {self.addr}
HostKey {self.root / 'host_key'}
PidFile {self.root / 'sshd.pid'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
        self.proc: subprocess.Popen | None = None
        self.log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - closed in stop()

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privsep directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "sshd.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.addr, self.port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        raise AssertionError(f"sshd on port {self.port} did not start")

    def kill(self) -> None:
        """Kill the server and every session it runs, at once (a device that dies)."""
        if self.proc is None:
            return
        # Freeze the tree before listing it, so no session forks after it was listed.
        stopped = {self.proc.pid}
        os.kill(self.proc.pid, signal.SIGSTOP)
        while new := set(_descendants(self.proc.pid)) - stopped:
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped |= new
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        self.log.close()

    def end_config(self) -> dict:
        return dict(host=self.addr, port=self.port, user=getpass.getuser(),
                    key_file=str(self.root / "client_key"),
                    known_hosts=str(self.root / "known_hosts"), directory=str(self.keys))

    def write(self, block: tuple[int, int], data: bytes) -> None:
        """As a device does: write under a temporary name, then rename into place."""
        tmp = self.keys / f".{key_name(block)}.part"
        tmp.write_bytes(data)
        tmp.rename(self.keys / key_name(block))

    def files(self) -> list[str]:
        return sorted(p.name for p in self.keys.iterdir())

    def reader_pos(self, name: str) -> int | None:
        """How far a server process has read file ``name`` (None while none has it open)."""
        if self.proc is None:
            return None
        target = str(self.keys / name)
        for pid in _descendants(self.proc.pid):
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                            return int(info.split("pos:")[1].split()[0])
        return None


@pytest.fixture
def devices(tmp_path):
    made: list[Device] = []

    def make(name: str) -> Device:
        d = Device(tmp_path, name)
        made.append(d)
        d.start()
        return d
    yield make
    for d in made:
        d.stop()


def _sftp_source(tmp_path: Path, dev: Device, block: str = "1MiB") -> SftpSource:
    ends = _end("a", **dev.end_config()) + _end("b", **dev.end_config())
    topo = _topology(tmp_path, ends, block=block, capacity="16MiB")
    return make_source(topo, "A", topo.links[0])  # type: ignore[return-value]


def _read_blocks(src: SftpSource, want: int, timeout: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {want} blocks"
        r, _, _ = select.select([src.fileno()], [], [], left)
        if r:
            got += src.read_blocks()
    return got


@needs_sshd
def test_source_fetches_in_order_removes_files_and_leaves_what_it_refuses(tmp_path, devices):
    dev = devices("a")
    blocks = {(5, s): os.urandom(1 << 20) for s in (0, 1, 2, 9, 10, 11)}
    for b, data in blocks.items():
        dev.write(b, data)
    (dev.keys / "5-12.key").write_bytes(b"x" * ((1 << 20) + 1))  # not a block's size
    (dev.keys / ".5-13.key.part").write_bytes(b"half")             # still being written
    src = _sftp_source(tmp_path, dev)
    src.open()
    try:
        t0 = time.monotonic()
        got = _read_blocks(src, len(blocks))
        dt = time.monotonic() - t0
        assert [b for b, _ in got] == sorted(blocks)                # numeric order
        assert all(bytes(data) == blocks[b] for b, data in got)
        assert dev.files() == [".5-13.key.part", "5-12.key"]        # fetched ones removed
        print(f"\nsftp fetch: {len(blocks)} MiB in {dt:.2f} s = "
              f"{len(blocks) * 8 * 1.048576 / dt:.0f} Mb/s")
        # More files later; one behind what was delivered is removed, never delivered.
        dev.write((5, 3), os.urandom(1 << 20))
        dev.write((6, 0), os.urandom(1 << 20))
        got = _read_blocks(src, 1)
        assert [b for b, _ in got] == [(6, 0)]
        time.sleep(0.2)
        assert src.read_blocks() == []
        assert dev.files() == [".5-13.key.part", "5-12.key"]
    finally:
        src.close()


def _failure(src: SftpSource) -> str:
    """Open the source and return the failure its thread reports."""
    t0 = time.monotonic()
    src.open()
    assert time.monotonic() - t0 < 0.5, "open() must not wait for the device"
    try:
        r, _, _ = select.select([src.fileno()], [], [], 15.0)
        assert r, "no failure reported"
        with pytest.raises(SourceUnavailable) as err:
            src.read_blocks()
        return str(err.value)
    finally:
        src.close()


@needs_sshd
def test_source_refuses_a_wrong_host_key_and_backs_off(tmp_path, devices):
    dev = devices("a")
    other = Device(tmp_path, "other")  # never started: only its host key is used
    other.log.close()
    good = (dev.root / "known_hosts").read_text()
    (dev.root / "known_hosts").write_text(f"[{dev.addr}]:{dev.port} {other.host_key}\n")
    dev.write((1, 0), b"k" * 64)
    src = _sftp_source(tmp_path, dev, block="64B")
    assert "does not match the configured one" in _failure(src)
    assert src.backoff.delay == 1.0
    with pytest.raises(SourceUnavailable, match="does not match"):  # too early: not tried
        src.open()
    assert dev.files() == ["1-0.key"]
    # The right host key, after the delay: the same source object recovers.
    (dev.root / "known_hosts").write_text(good)
    src.known_hosts = dev.root / "known_hosts"
    time.sleep(1.0)
    src.open()
    try:
        assert [b for b, _ in _read_blocks(src, 1)] == [(1, 0)]
        assert src.backoff.delay == 0.0
    finally:
        src.close()


@needs_sshd
def test_source_reports_an_unreachable_device_and_a_refused_client_key(tmp_path, devices):
    dev = devices("a")
    src = _sftp_source(tmp_path, dev)
    dev.kill()
    assert f"cannot reach device root@{dev.addr}" in _failure(src)
    dev.start()
    (dev.root / "authorized_keys").write_text("")
    src.backoff.succeeded()
    assert "refused the key" in _failure(src)
    src.backoff.succeeded()
    src.key_file = tmp_path / "missing"
    assert f"private key file {tmp_path / 'missing'} not found" in _failure(src)
    # The node's own secrets are read only if they are its own alone, and the file that
    # says which device to believe only if no one else could rewrite it.
    src.key_file = dev.root / "client_key"
    src.key_file.chmod(0o644)
    src.backoff.succeeded()
    assert "refusing SSH private key" in (why := _failure(src)) and "chmod 600" in why
    src.key_file.chmod(0o600)
    src.known_hosts.chmod(0o666)
    src.backoff.succeeded()
    assert "refusing known hosts file" in (why := _failure(src)) and "chmod go-w" in why


# ---- two link ends, two key manager processes -----------------------------------------

LKM = """
import logging, sys
from control.core.config import load_topology
from control.lkm.link_end import EndConfig, LinkKeyManager
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
topo = load_topology(sys.argv[1])
LinkKeyManager(EndConfig.from_topology(topo, sys.argv[2], topo.links[0],
                                       Path(sys.argv[3]))).run()
"""


class Link:
    """Two key manager processes of one link, each fetching from its own device."""

    def __init__(self, tmp_path: Path, prefix: str, dev_a: Device, dev_b: Device,
                 block: str, capacity: str):
        n = int.from_bytes(os.urandom(2), "big")
        net = f"127.{100 + n // 256 % 100}.{n % 256}"
        underlay = (f"{net}.1", f"{net}.2")
        self.topo = _topology(tmp_path, _end("a", **dev_a.end_config())
                              + _end("b", **dev_b.end_config()), prefix=prefix,
                              block=block, capacity=capacity, port=_own_port(underlay[0]),
                              underlay=underlay)
        self.auth = paths.link_key_path(prefix, "A-B")
        self.auth.parent.mkdir(parents=True, exist_ok=True)
        self.auth.write_bytes(os.urandom(32))
        self.auth.chmod(0o600)  # a secret: refused if others may read it
        self.prefix = prefix
        self.procs: dict[str, subprocess.Popen] = {}
        for node in "AB":
            log = open(tmp_path / f"lkm-{node}.log", "wb")  # noqa: SIM115
            self.procs[node] = subprocess.Popen(
                [sys.executable, "-c", LKM, str(self.topo.path), node,
                 str(tmp_path / f"state-{node}")], stdout=log, stderr=log)
            log.close()

    def status(self, node: str) -> dict | None:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads((paths.node_dir(self.prefix, node) / "lkm-A-B.json").read_text())
        return None

    def ring(self, node: str, direction: str) -> tuple[int, int, bytes]:
        r = KeyRing.attach(paths.ring_name(self.prefix, node, "A-B", direction))
        try:
            lo, hi = r.release_pos, r.write_pos
            return lo, hi, bytes(r.read(lo, hi - lo))
        finally:
            r.close()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _settled(link: Link, dev_a: Device, dev_b: Device) -> bool:
    """Devices emptied, both ends idle at the same write positions."""
    if dev_a.files() or dev_b.files():
        return False
    a, b = link.status("A"), link.status("B")
    return bool(a and b and a["agreement"]["synced"] and not a["agreement"]["pending_blocks"]
                and not b["agreement"]["pending_blocks"]
                and all(a["rings"][d]["write_pos"] == b["rings"][d]["write_pos"]
                        for d in ("ab", "ba")))


def _rings_agree(link: Link, block: int, written: dict[bytes, tuple[int, int]]) -> set:
    """Both ends' rings hold the same bytes, made of whole written blocks only; returns
    the ids of the blocks stored."""
    stored = set()
    for d in ("ab", "ba"):
        lo_a, hi_a, a = link.ring("A", d)
        lo_b, hi_b, b = link.ring("B", d)
        assert (lo_a, hi_a) == (lo_b, hi_b), f"{d}: ends at different positions"
        assert a == b, f"direction {d}: the two ends' rings differ"
        assert lo_a % block == 0 and hi_a % block == 0
        for off in range(0, len(a), block):
            assert a[off:off + block] in written, f"{d}: a stored block is no written file"
            stored.add(written[a[off:off + block]])
    return stored


@needs_sshd
def test_two_ends_fetch_identical_files_into_identical_rings(tmp_path, prefix, devices):
    dev_a, dev_b = devices("a"), devices("b")
    block = 64 << 10
    link = Link(tmp_path, prefix, dev_a, dev_b, "64KiB", "16MiB")
    written: dict[bytes, tuple[int, int]] = {}
    try:
        wait_until(lambda: all((s := link.status(n)) and s["source"]["up"] for n in "AB")
                   and link.status("A")["agreement"]["synced"], 15, "sources and agreement")
        # The devices emit the same blocks at about 40 Mb/s; A's device a little ahead.
        for seq in range(120):
            data = os.urandom(block)
            written[data] = (3, seq)
            dev_a.write((3, seq), data)
            dev_b.write((3, seq), data)
            time.sleep(0.012)
        wait_until(lambda: _settled(link, dev_a, dev_b), 20, "both ends to store it all")
        stored = _rings_agree(link, block, written)
        assert stored == set(written.values()), "a block was lost with nothing going wrong"
        assert link.status("A")["key"]["bytes_stored_ab"] > 0
        assert link.status("A")["key"]["bytes_stored_ba"] > 0
    finally:
        link.stop()


@needs_sshd
def test_a_device_killed_mid_transfer_leaves_no_half_block_and_the_link_resumes(
        tmp_path, prefix, devices):
    dev_a, dev_b = devices("a"), devices("b")
    block = 4 << 20
    link = Link(tmp_path, prefix, dev_a, dev_b, "4MiB", "32MiB")
    written: dict[bytes, tuple[int, int]] = {}

    def emit(seqs) -> None:
        for seq in seqs:
            data = os.urandom(block)
            written[data] = (9, seq)
            dev_a.write((9, seq), data)
            dev_b.write((9, seq), data)
    try:
        wait_until(lambda: all((s := link.status(n)) and s["source"]["up"] for n in "AB")
                   and link.status("A")["agreement"]["synced"], 15, "sources and agreement")
        emit(range(3))
        # Kill B's device while its server is partway through a file.
        victim = None
        deadline = time.monotonic() + 15
        while victim is None:
            assert time.monotonic() < deadline, "B's device never seen partway through a file"
            for name in dev_b.files():
                pos = dev_b.reader_pos(name)
                if pos is not None and 0 < pos < block:
                    victim = name
                    break
            else:
                time.sleep(0.001)
        dev_b.kill()
        assert victim in dev_b.files(), "a file not fetched whole must stay on the device"
        wait_until(lambda: not link.status("B")["source"]["up"], 15, "B to see its device go")
        dev_b.start()
        emit([3])
        wait_until(lambda: _settled(link, dev_a, dev_b), 30, "the link to resume and settle")
        stored = _rings_agree(link, block, written)
        print(f"\nkilled B's device during {victim}; stored {sorted(stored)}; "
              f"A: {link.status('A')['key']}, B: {link.status('B')['key']}")
        # The block written after the restart reaches both rings: the link resumed.
        assert (9, 3) in stored
        b = link.status("B")
        assert b["source"]["up"] and not b["source"]["error"]
    finally:
        link.stop()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_the_client_key_comes_with_its_certificate_and_only_if_it_is_ours_alone(tmp_path):
    from control.lkm.source_sftp import load_client_key

    key, ca = tmp_path / "client_key", tmp_path / "ca"
    for k in (key, ca):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)],
                       check=True)
    assert load_client_key(key).public_blob is None  # no certificate beside it
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "node-a", "-n", "qkd",
                    str(key) + ".pub"], check=True)  # writes client_key-cert.pub
    pkey = load_client_key(key)
    assert pkey.public_blob is not None and pkey.public_blob.key_type.endswith(
        "-cert-v01@openssh.com")
    key.chmod(0o640)
    with pytest.raises(SourceUnavailable, match="refusing SSH private key"):
        load_client_key(key)
