"""The XDP guard of one link end: build (bcc, cached), load, attach, and read its maps.

One program per link end, attached to the underlay interface that routes to the peer, as
a BPF link owned by the tunnel manager: when the manager stops or dies the kernel detaches
it, and the next start attaches a fresh one. Native mode where the driver has it, generic
otherwise.

bcc (clang) runs only to build the program, in a short-lived child process (the manager
never holds LLVM's tens of MiB, and a compiler crash cannot take it down). The build is
the same for every link end (their own values live in the map ``config``), so it is
cached on disk by the hash of the source, kernel and bcc: the instructions and where they
name the maps. Each guard creates its own maps and writes their descriptors in.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import ipaddress
import json
import logging
import os
import platform
import re
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from dataplane import wire
from dataplane.bpf import syscall
from dataplane.private import NotPrivateError, open_private, private_dir, write_private
from dataplane.ring import CONTROL_LANE, MAX_LANES

log = logging.getLogger("qkdnet.guard")
SOURCE = Path(__file__).with_name("guard.c")
CACHE_DIR = Path(os.environ.get("QKDNET_BPF_CACHE", "/var/cache/qkdnet/bpf"))
REASONS = ("pass", "other", "source", "malformed", "stale", "node", "ahead")
"""pass: tunnel datagrams let through; other: not tunnel traffic (untouched); the rest are
drops: not from the peer, malformed header, a key position already passed, any packet for
a node address (those are reachable only through the tunnels), and datagrams naming key
beyond what is stored above AHEAD_PPS."""
DROP_REASONS = ("source", "malformed", "stale", "node", "ahead")
N_FLOORS = MAX_LANES + 2
RELEASE_SLOT = MAX_LANES
STORED_SLOT = MAX_LANES + 1  # the receiving ring's write position (0: not known yet)
AHEAD_PPS = 5_000  # datagrams naming key not stored yet let through per second ...
AHEAD_BURST = 1_000  # ... after a burst of this many
CONFIG = struct.Struct("=IIIIIIIII")  # struct guard_config
MAPS = {  # name: (type, value size, entries), as declared in guard.c
    "counters": (syscall.BPF_MAP_TYPE_PERCPU_ARRAY, 8, 2 * len(REASONS)),
    "floors": (syscall.BPF_MAP_TYPE_ARRAY, 8, N_FLOORS),
    "config": (syscall.BPF_MAP_TYPE_ARRAY, CONFIG.size, 1),
    "ahead": (syscall.BPF_MAP_TYPE_ARRAY, 8, 1),
}
BUILD_TIMEOUT_S = 60.0
MIN_KERNEL = (5, 18)  # BPF_F_XDP_HAS_FRAGS and bpf_xdp_load_bytes
LD_IMM64, PSEUDO_MAP_FD = 0x18, 1


class GuardError(Exception):
    """The guard cannot run here; the message says why (and the node goes on without)."""


@dataclass(frozen=True)
class GuardSpec:
    """What one link end's program checks, as written into its ``config`` map."""

    peer_ip: str
    port_lo: int
    workers: int
    link: int
    direction: int  # of the datagrams this end receives
    node_net: str = "0.0.0.0/32"  # packets to or from it are dropped ("0.0.0.0/32": none)
    tunnel_net: str = "0.0.0.0/32"  # the tunnels' own addresses: dropped too

    def config_value(self) -> bytes:
        def u32(a: str) -> int:  # network order, as the program loads it
            return int.from_bytes(socket.inet_aton(a), sys.byteorder)

        node, tun = ipaddress.IPv4Network(self.node_net), ipaddress.IPv4Network(self.tunnel_net)
        return CONFIG.pack(u32(self.peer_ip), self.port_lo, self.workers, self.link,
                           self.direction, u32(str(node.network_address)),
                           u32(str(node.netmask)), u32(str(tun.network_address)),
                           u32(str(tun.netmask)))


def cflags() -> list[str]:
    interval = 10**9 // AHEAD_PPS
    consts = {"N_LANES": MAX_LANES, "CONTROL_LANE": CONTROL_LANE, "OVERHEAD": wire.OVERHEAD,
              "MAC_KEY_LEN": wire.MAC_KEY_LEN, "N_REASONS": len(REASONS),
              **{f"R_{r.upper()}": i for i, r in enumerate(REASONS)},
              "AHEAD_INTERVAL_NS": f"{interval}ULL",
              "AHEAD_BURST_NS": f"{interval * AHEAD_BURST}ULL"}
    return [f"-D{k}={v}" for k, v in consts.items()]


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of a kernel release string (default: this kernel's); (0, 0) when it
    has another form."""
    m = re.match(r"(\d+)\.(\d+)", release or platform.release())
    return (int(m[1]), int(m[2])) if m else (0, 0)


def support() -> str | None:
    """Why the guard cannot work on this machine (None: it should). Cheap: no compile."""
    if os.geteuid() != 0:
        return "not root (BPF needs CAP_BPF and CAP_NET_ADMIN)"
    release = os.uname().release
    ver = kernel_version(release)
    if ver == (0, 0):  # a release string of another form: let the attach decide
        ver = MIN_KERNEL
    if ver < MIN_KERNEL:
        return f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (XDP multi-buffer)"
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not installed (apt-get install python3-bpfcc; make setup links it)"
    mod = Path("/lib/modules") / release
    if not (mod / "build" / "Makefile").exists():
        return f"no kernel headers at {mod}/build (make setup links Debian's)"
    try:
        os.close(syscall.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1))
    except OSError as e:
        return f"the bpf() syscall is refused: {e.strerror}"
    return None


# ---- build (bcc, in a child) and relocation (pure) ----------------------------------------

def find_map_refs(insns: bytes, fds: dict[int, str]) -> list[tuple[int, str]]:
    """(instruction index, map name) of every 64-bit load of a map descriptor."""
    refs = []
    for i in range(0, len(insns) // 8):
        code, regs, _, imm = struct.unpack_from("=BBhi", insns, 8 * i)
        if code == LD_IMM64 and regs >> 4 == PSEUDO_MAP_FD:
            if imm not in fds:
                raise GuardError(f"instruction {i} names an unknown map (fd {imm})")
            refs.append((i, fds[imm]))
    return refs


def relocate(insns: bytes, refs: list[tuple[int, str]], fds: dict[str, int]) -> bytes:
    """The instructions with this process's map descriptors written in."""
    out = bytearray(insns)
    for i, name in refs:
        struct.pack_into("=i", out, 8 * i + 4, fds[name])
    return bytes(out)


def _build_in_child(sock: socket.socket) -> None:
    try:
        from bcc import BPF

        b = BPF(text=SOURCE.read_text(), cflags=cflags())
        insns = b.dump_func("qkd_guard")
        refs = find_map_refs(insns, {b[name].map_fd: name for name in MAPS})
        reply = {"ok": True, "insns": base64.b64encode(insns).decode(), "refs": refs}
    except BaseException as e:  # noqa: BLE001 - everything goes back as a reason
        lines = str(e).strip().splitlines()
        reply = {"ok": False, "error": lines[-1] if lines else type(e).__name__}
    sock.sendall(json.dumps(reply).encode())


def _build() -> dict:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            parent.close()
            with open(os.devnull, "w") as null:  # clang's warnings are not ours to print
                os.dup2(null.fileno(), 2)
            _build_in_child(child)
        finally:
            os._exit(0)
    child.close()
    try:
        parent.settimeout(BUILD_TIMEOUT_S)
        chunks = []
        try:
            while chunk := parent.recv(1 << 16):
                chunks.append(chunk)
        except TimeoutError:
            os.kill(pid, 9)
            raise GuardError(f"bcc did not build the guard within {BUILD_TIMEOUT_S:.0f} s"
                             ) from None
    finally:
        parent.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise GuardError("the bcc build process died") from None
    if not reply.get("ok"):
        raise GuardError(f"bcc could not build the guard: {reply.get('error')}")
    return reply


def build_key() -> str:
    """Source, constants, kernel and bcc (its version file, read without importing bcc)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(cflags()).encode())
    h.update(os.uname().release.encode())
    spec = importlib.util.find_spec("bcc")
    if spec is not None and spec.origin:
        with contextlib.suppress(OSError):
            h.update(Path(spec.origin).with_name("version.py").read_bytes())
    return h.hexdigest()[:24]


def _read_cached(path: Path) -> dict:
    """A cached build, only from a directory and a file of this user's alone: what is
    read here is loaded into the kernel as root, so a build another user could have
    planted or changed (``QKDNET_BPF_CACHE`` pointed at a shared directory) is never
    used. OSError when there is none such."""
    private_dir(path.parent)
    fd = open_private(path)
    with os.fdopen(fd, "rb") as f:
        return json.loads(f.read())


def program() -> tuple[bytes, list[tuple[int, str]]]:
    """The guard's instructions and map references, from the cache or a fresh build."""
    path = CACHE_DIR / f"guard-{build_key()}.json"
    try:
        cached = _read_cached(path)
        return base64.b64decode(cached["insns"]), [tuple(r) for r in cached["refs"]]
    except NotPrivateError as e:
        log.warning("the XDP guard's cache is not this user's alone (%s): building anew", e)
    except (OSError, ValueError, KeyError):
        pass
    reply = _build()
    with contextlib.suppress(OSError):
        private_dir(path.parent)
        write_private(path, json.dumps({"insns": reply["insns"],
                                        "refs": reply["refs"]}).encode())
    return base64.b64decode(reply["insns"]), [tuple(r) for r in reply["refs"]]


def route_ifindex(peer_ip: str) -> tuple[int, str]:
    """The interface (index, name) this namespace sends to the peer through: the underlay."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        routes = ip.route("get", dst=peer_ip)
        if not routes or routes[0].get_attr("RTA_OIF") is None:
            raise GuardError(f"no route to the peer {peer_ip}")
        idx = routes[0].get_attr("RTA_OIF")
        links = ip.get_links(idx)
        return idx, links[0].get_attr("IFLA_IFNAME") if links else f"if{idx}"


class Guard:
    """A loaded, attached guard. ``close()`` detaches it; so does the process's death."""

    def __init__(self, spec: GuardSpec, ifindex: int, ifname: str):
        self.spec, self.ifindex, self.ifname = spec, ifindex, ifname
        self.prog_fd = self.link_fd = -1
        self.maps: dict[str, syscall.ArrayMap] = {}
        try:
            insns, refs = program()
            for name, (kind, size, entries) in MAPS.items():
                fd = syscall.map_create(kind, 4, size, entries, f"qkd_{name}".encode())
                self.maps[name] = syscall.ArrayMap(fd, entries,
                                                   kind == syscall.BPF_MAP_TYPE_PERCPU_ARRAY)
            self.counters, self.floors = self.maps["counters"], self.maps["floors"]
            self.maps["config"].set_bytes(0, spec.config_value())
            self.prog_fd = syscall.prog_load(
                relocate(insns, refs, {n: m.fd for n, m in self.maps.items()}),
                name=b"qkd_guard", flags=syscall.BPF_F_XDP_HAS_FRAGS)
            self.mode = self._attach()
        except OSError as e:
            self.close()
            raise GuardError(f"cannot load the guard: {e}") from None
        except BaseException:
            self.close()
            raise
        self.ids = {"prog": syscall.obj_id(self.prog_fd),
                    **{name: syscall.obj_id(m.fd) for name, m in self.maps.items()}}

    def _attach(self) -> str:
        errors = []
        for mode, flag in (("native", syscall.XDP_FLAGS_DRV_MODE),
                           ("generic", syscall.XDP_FLAGS_SKB_MODE)):
            try:
                self.link_fd = syscall.link_create_xdp(self.prog_fd, self.ifindex, flag)
                return mode
            except OSError as e:
                errors.append(f"{mode}: {e.strerror}")
        raise GuardError(f"cannot attach XDP to {self.ifname} ({'; '.join(errors)}); "
                         f"another XDP program may hold it")

    def other_fds(self) -> tuple[int, ...]:
        """Descriptors a forked worker inherits but must not keep (only floors is its)."""
        return tuple(fd for fd in (self.prog_fd, self.link_fd,
                                   *(m.fd for n, m in self.maps.items() if n != "floors"))
                     if fd >= 0)

    def counts(self) -> dict[str, dict[str, int]]:
        """{reason: {"packets", "bytes"}}, summed over CPUs."""
        return by_reason(self.counters.values())

    def status(self) -> dict:
        return {"state": "on", "mode": self.mode, "interface": self.ifname, "ids": self.ids,
                "counts": self.counts()}

    def close(self) -> None:
        if self.link_fd >= 0:
            with contextlib.suppress(OSError):
                syscall.link_detach(self.link_fd)
            os.close(self.link_fd)
            self.link_fd = -1
        for m in self.maps.values():
            m.close()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1


def read_counts(ids: dict[str, int]) -> dict[str, dict[str, int]]:
    """Another process's guard counters, straight from the kernel map (by id)."""
    m = syscall.ArrayMap.by_id(ids["counters"], 2 * len(REASONS), percpu=True)
    try:
        return by_reason(m.values())
    finally:
        m.close()


def by_reason(values: list[int]) -> dict[str, dict[str, int]]:
    """The counters map's words ([2r] packets, [2r+1] bytes) by reason name."""
    return {r: {"packets": values[2 * i], "bytes": values[2 * i + 1]}
            for i, r in enumerate(REASONS)}
