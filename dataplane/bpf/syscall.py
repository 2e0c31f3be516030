"""The few bpf(2) commands qkdnet needs, through ctypes, without bcc.

bcc compiles our C to BPF instructions; loading them ourselves lets us set
BPF_F_XDP_HAS_FRAGS (bcc 0.26 cannot), which veth and other large-MTU devices require for
native XDP, and attach through a BPF link, which the kernel detaches by itself when the
last descriptor closes: a crashed node leaves nothing attached. Worker processes update a
map through an inherited descriptor with one syscall and no bcc import (import alone
costs ~100 ms and tens of MiB).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_PROG_LOAD = 5
BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 14, 15
BPF_LINK_CREATE, BPF_LINK_DETACH = 28, 34
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY = 2, 6
BPF_PROG_TYPE_XDP = 6
BPF_XDP = 37  # attach type
BPF_F_XDP_HAS_FRAGS = 1 << 5
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4
ATTR_SIZE = 128


class BpfError(OSError):
    pass


def bpf(cmd: int, attr: bytearray | ctypes.Array) -> int:
    """One bpf(2) call; ``attr`` is the zero-padded union, changed in place by the kernel."""
    buf = attr if isinstance(attr, ctypes.Array) else (ctypes.c_char * len(attr)).from_buffer(
        attr)
    r = _libc.syscall(_SYS_BPF, cmd, buf, len(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd {cmd}): {os.strerror(err)}")
    return r


def possible_cpus() -> int:
    """Per-CPU map values have one slot per *possible* CPU (not online)."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


def map_create(map_type: int, key_size: int, value_size: int, entries: int,
               name: bytes = b"") -> int:
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=IIIII", attr, 0, map_type, key_size, value_size, entries, 0)
    attr[28:28 + 15] = name[:15].ljust(15, b"\0")  # map_name follows inner_map_fd, numa_node
    return bpf(BPF_MAP_CREATE, attr)


def prog_load(insns: bytes, prog_type: int = BPF_PROG_TYPE_XDP, *, name: bytes = b"",
              flags: int = 0, license: bytes = b"GPL") -> int:
    """Load instructions (map descriptors already in them, as bcc leaves them)."""
    ib = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    log = ctypes.create_string_buffer(1 << 16)
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=IIQQIIQII", attr, 0, prog_type, len(insns) // 8, ctypes.addressof(ib),
                     ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, flags)
    attr[48:48 + 15] = name[:15].ljust(15, b"\0")
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except BpfError as e:
        verifier = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise BpfError(e.errno, f"{e.strerror}; verifier: {' | '.join(verifier)}") from None


def link_create_xdp(prog_fd: int, ifindex: int, mode: int) -> int:
    """Attach an XDP program to an interface as a BPF link (detached when closed)."""
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, BPF_XDP, mode)
    return bpf(BPF_LINK_CREATE, attr)


def link_detach(link_fd: int) -> None:
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=I", attr, 0, link_fd)
    bpf(BPF_LINK_DETACH, attr)


def obj_id(fd: int) -> int:
    """The kernel-wide id of a program, map or link (bpf_*_info: type u32, id u32, ...)."""
    info = ctypes.create_string_buffer(256)
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=IIQ", attr, 0, fd, 256, ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return struct.unpack_from("=I", info, 4)[0]


def map_fd_by_id(ident: int) -> int:
    attr = bytearray(ATTR_SIZE)
    struct.pack_into("=I", attr, 0, ident)
    return bpf(BPF_MAP_GET_FD_BY_ID, attr)


class ArrayMap:
    """An ARRAY or PERCPU_ARRAY map of u64 values (or one struct: set_bytes), by descriptor."""

    def __init__(self, fd: int, entries: int, percpu: bool = False, owned: bool = True):
        self.fd, self.entries, self.percpu, self.owned = fd, entries, percpu, owned
        self.ncpu = possible_cpus() if percpu else 1
        self._key = ctypes.c_uint32(0)
        self._val = (ctypes.c_uint64 * max(self.ncpu, 8))()
        self._upd = bytearray(ATTR_SIZE)
        self._upd_buf = (ctypes.c_char * ATTR_SIZE).from_buffer(self._upd)
        struct.pack_into("=IIQQQ", self._upd, 0, fd, 0, ctypes.addressof(self._key),
                         ctypes.addressof(self._val), 0)

    @classmethod
    def by_id(cls, ident: int, entries: int, percpu: bool = False) -> ArrayMap:
        return cls(map_fd_by_id(ident), entries, percpu)

    def set(self, index: int, value: int) -> None:
        """One syscall, no allocation: cheap enough for a worker's flush."""
        self._key.value = index
        self._val[0] = value
        bpf(BPF_MAP_UPDATE_ELEM, self._upd_buf)

    def set_bytes(self, index: int, value: bytes) -> None:
        """A struct value (at most 64 bytes) of a plain array map."""
        self._key.value = index
        ctypes.memmove(self._val, value, len(value))
        bpf(BPF_MAP_UPDATE_ELEM, self._upd_buf)

    def get(self, index: int) -> int:
        """The value, summed over CPUs for a per-CPU map."""
        self._key.value = index
        bpf(BPF_MAP_LOOKUP_ELEM, self._upd_buf)
        return sum(self._val[:self.ncpu]) if self.percpu else self._val[0]

    def values(self) -> list[int]:
        return [self.get(i) for i in range(self.entries)]

    def close(self) -> None:
        if self.owned and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
