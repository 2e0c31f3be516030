"""Key sources behind one interface: where a link end's local key comes from.

A source delivers the same numbered blocks at both ends of a link, in order. Today: the
QKD link emulator. A QKD device speaking ETSI GS QKD 014 and SFTP-fetched key files
plug in behind the same interface.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Protocol

from control.emulator import BLOCK_HEAD, HELLO, MAGIC
from dataplane.limits import MAX_BLOCK_SIZE

Block = tuple[tuple[int, int], bytearray]


class SourceUnavailable(Exception):
    """The source cannot be reached or went away; the node keeps running and retries."""


class KeySource(Protocol):
    description: str

    def open(self) -> None: ...
    def fileno(self) -> int: ...
    def read_blocks(self) -> list[Block]: ...
    def close(self) -> None: ...


class EmulatorSource:
    """Client of the link emulator's Unix socket; reads blocks without blocking."""

    def __init__(self, path: Path):
        self.path = path
        self.description = f"emulator {path}"
        self._sock: socket.socket | None = None
        self._epoch = 0
        self._head = bytearray(BLOCK_HEAD.size)
        self._got_head = 0
        self._data: bytearray | None = None
        self._got_data = 0
        self._seq = 0

    def open(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.settimeout(2.0)
        try:
            s.connect(str(self.path))
            hello = _recv_exact(s, HELLO.size)
        except OSError as e:
            s.close()
            raise SourceUnavailable(f"cannot reach emulator at {self.path}: {e}") from None
        magic, self._epoch, _block = HELLO.unpack(hello)
        if magic != MAGIC:
            s.close()
            raise SourceUnavailable(f"{self.path} is not a qkdnet link emulator")
        s.setblocking(False)
        self._sock = s
        self._got_head = 0
        self._data = None

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock else -1

    def read_blocks(self) -> list[Block]:
        """Everything that has arrived now; raises SourceUnavailable on EOF."""
        assert self._sock is not None
        out: list[Block] = []
        for _ in range(64):
            try:
                if self._data is None:
                    n = self._sock.recv_into(memoryview(self._head)[self._got_head:])
                    if n == 0:
                        raise SourceUnavailable("emulator closed the connection")
                    self._got_head += n
                    if self._got_head == BLOCK_HEAD.size:
                        self._seq, length = BLOCK_HEAD.unpack(self._head)
                        if not 0 < length <= MAX_BLOCK_SIZE:
                            raise SourceUnavailable(f"emulator sent a block of {length} B")
                        self._data = bytearray(length)
                        self._got_data = 0
                else:
                    n = self._sock.recv_into(memoryview(self._data)[self._got_data:])
                    if n == 0:
                        raise SourceUnavailable("emulator closed the connection")
                    self._got_data += n
                    if self._got_data == len(self._data):
                        out.append(((self._epoch, self._seq), self._data))
                        self._data = None
                        self._got_head = 0
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionError as e:
                raise SourceUnavailable(f"emulator connection lost: {e}") from None
        return out

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)
