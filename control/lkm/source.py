"""Key sources behind one interface: where a link end's local key comes from.

A source delivers the same numbered blocks at both ends of a link, in order, each block
whole or not at all. The local key manager polls it from its selector loop, so a source
never blocks: :class:`EmulatorSource` reads a socket without blocking; sources whose
protocol blocks (HTTPS, SSH) derive from :class:`FetchingSource`, which runs the blocking
part in a thread and wakes the loop through a pipe. :func:`make_source` picks the class
the link's ``source`` config names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from control.lkm.emulator import BLOCK_HEAD, HELLO, MAGIC
from dataplane.limits import MAX_BLOCK_SIZE

if TYPE_CHECKING:
    from control.core.config import LinkSpec, Topology

Block = tuple[tuple[int, int], bytearray]
log = logging.getLogger("qkdnet.lkm")


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


class FetchingSource:
    """Base of sources whose I/O blocks: a thread calls :meth:`fetch` and queues what it
    returns; :meth:`fileno` is a pipe that turns readable when blocks (or an error) wait.

    Subclasses implement ``connect`` (raise SourceUnavailable), ``fetch`` (whole blocks,
    ``[]`` when the device has none now, SourceUnavailable when it fails) and
    ``disconnect``. At most ``max_queued`` blocks wait, so a paused reader (its rings
    full) pauses the fetching too. Blocks fetched before a failure are still delivered;
    the failure is raised by the next ``read_blocks``. Blocks fetched and never read
    (waiting at close, or fetched while it closed) are wiped, counted in ``lost`` and
    logged: key the device gave and nobody stored (invariant 8).
    """

    max_queued = 8
    idle_s = 0.05  # the wait after a fetch that found nothing (0: ``fetch`` waits itself)
    close_timeout_s = 10.0  # close() waits this long for a fetch in progress

    def __init__(self, description: str):
        self.description = description
        self._queue: deque[Block] = deque()
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._error = ""
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        # A thread that outlived close() (stuck in I/O), with the pipe it may still write.
        self._orphan: tuple[threading.Thread, tuple[int, int]] | None = None
        self.lost = [0, 0]  # blocks, bytes: fetched and never read (under _cond)

    # -- subclass hooks -----------------------------------------------------------------
    def connect(self) -> None:
        raise NotImplementedError

    def fetch(self) -> list[Block]:
        raise NotImplementedError

    def disconnect(self) -> None:
        pass

    def stats(self) -> dict:
        """Counts for the key manager's status (subclasses add their own)."""
        with self._cond:
            return {"lost_blocks": self.lost[0], "lost_bytes": self.lost[1]}

    def queued(self, n: int) -> None:
        """``n`` blocks ``fetch`` returned are in the queue now (under its lock)."""

    # -- KeySource ----------------------------------------------------------------------
    def open(self) -> None:
        if self._orphan is not None:
            thread, pipe = self._orphan
            if thread.is_alive():  # two threads must never fetch on one connection
                raise SourceUnavailable(f"{self.description}: the previous connection's "
                                        f"fetch is still stuck; retrying later")
            _close_fds(pipe)
            self._orphan = None
        self.connect()
        self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._queue.clear()
        self._error = ""
        self._stopping = threading.Event()  # one per run: a late thread sees its own
        self._thread = threading.Thread(target=self._run, args=(self._stopping, self._pipe[1]),
                                        name="key-source", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._pipe[0] if self._pipe else -1

    def read_blocks(self) -> list[Block]:
        assert self._pipe is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self._pipe[0], 4096):
                pass
        with self._cond:
            out = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            error = self._error
        if error:
            if not out:
                raise SourceUnavailable(error)
            _wake(self._pipe[1])  # the failure is the next read's: keep the pipe readable
        return out

    def close(self) -> None:
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self.close_timeout_s)
        with self._cond:
            self._drop(list(self._queue), "waiting at close")
            self._queue.clear()
        with contextlib.suppress(Exception):
            self.disconnect()
        if self._pipe is not None:
            if thread is not None and thread.is_alive():
                self._orphan = (thread, self._pipe)  # it may still write: keep the fds
            else:
                _close_fds(self._pipe)
            self._pipe = None

    def _drop(self, blocks: list[Block], why: str) -> None:
        """Wipe and count blocks nobody will store (under ``_cond``)."""
        if not blocks:
            return
        nbytes = sum(len(data) for _, data in blocks)
        for _, data in blocks:
            data[:] = bytes(len(data))
        self.lost[0] += len(blocks)
        self.lost[1] += nbytes
        log.info("%s: %d block(s), %d B of key fetched and never stored (%s); wiped",
                 self.description, len(blocks), nbytes, why)

    # -- the thread ---------------------------------------------------------------------
    def _run(self, stopping: threading.Event, wake_fd: int) -> None:
        while not stopping.is_set():
            with self._cond:
                while len(self._queue) >= self.max_queued and not stopping.is_set():
                    self._cond.wait(0.5)
            if stopping.is_set():
                return
            try:
                blocks = self.fetch()
            except SourceUnavailable as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 - a source bug must not kill the node
                error = f"{type(e).__name__}: {e}"
            else:
                if stopping.is_set():  # closed meanwhile: what it fetched is not this run's
                    with self._cond:
                        self._drop(blocks, "fetched while closing")
                    return
                if blocks:
                    with self._cond:
                        self._queue.extend(blocks)
                        self.queued(len(blocks))
                    _wake(wake_fd)
                else:
                    stopping.wait(self.idle_s)
                continue
            if stopping.is_set():
                return
            with self._cond:
                self._error = error
            _wake(wake_fd)
            return


def _wake(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        os.write(fd, b"!")


def _close_fds(fds: tuple[int, int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def make_source(topo: Topology, node: str, link: LinkSpec) -> KeySource:
    """The key source the link's config names, for the end at ``node``."""
    kind = link.source.kind
    if kind == "emulator":
        from control.core import paths
        return EmulatorSource(paths.emulator_socket(topo.prefix, link.name, node))
    if kind == "sftp":
        from control.lkm.source_sftp import SftpSource
        cfg = link.source
        end = cfg.a if node == link.a else cfg.b  # type: ignore[union-attr]
        return SftpSource(end, max_size=link.block_size, base_dir=topo.path.parent,
                          poll_s=cfg.poll_ms / 1000)  # type: ignore[union-attr]
    if kind == "etsi014":
        from control.lkm.source_etsi import make_etsi_source
        return make_etsi_source(topo, node, link)
    raise ValueError(f"link {link.name}: unknown key source kind {kind!r}")
