"""QKD link emulator: one process per link, the same random bytes to both ends.

Stands in for the two QKD devices of a link. It listens on two filesystem Unix sockets
(one per link end), so it reaches nodes in any network namespace. While both ends are
connected it produces key in numbered blocks at the configured rate (0 = as fast as
possible) and delivers each block to both. An end too slow to keep up loses blocks (as a
real device's buffer overflows); the agreement discards those at both ends.

Stream to each end: a 24-byte hello ``magic "QKDEMU01" | u64 epoch | u64 block_size``,
then blocks ``u64 seq | u32 length | bytes``. The epoch is random per emulator start, so
block ids ``(epoch, seq)`` never repeat across restarts.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import secrets
import signal
import socket
import struct
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dataplane.limits import EMULATOR_QUEUE_BLOCKS
from dataplane.private import private_dir

HELLO = struct.Struct(">8sQQ")
MAGIC = b"QKDEMU01"
BLOCK_HEAD = struct.Struct(">QI")


class KeyGenerator:
    """Random bytes: os.urandom, or AES-256-CTR keyed from os.urandom (a CTR DRBG) when
    one core must feed links faster than the kernel's generator (about 3 Gb/s here)."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "aes-ctr":
            self._enc = Cipher(algorithms.AES(os.urandom(32)),
                               modes.CTR(os.urandom(16))).encryptor()
            self._reseed_at = 1 << 30
            self._made = 0

    def block(self, n: int) -> bytes:
        if self.kind == "urandom":
            return os.urandom(n)
        self._made += n
        if self._made >= self._reseed_at:
            self.__init__("aes-ctr")
        return self._enc.update(bytes(n))


class _End(threading.Thread):
    """Accepts one node connection at a time on its socket and sends it blocks."""

    def __init__(self, path: Path, epoch: int, block_size: int, both: threading.Condition,
                 stop: threading.Event):
        super().__init__(daemon=True)
        self.path = path
        self.epoch = epoch
        self.block_size = block_size
        self.q: queue.Queue[tuple[bytes, bytes]] = queue.Queue(maxsize=EMULATOR_QUEUE_BLOCKS)
        self.connected = False
        self.dropped = 0
        self._both = both
        self._halt = stop
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        private_dir(path.parent)  # whoever reaches these sockets gets the link's key
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o600)
        self.listener.listen(1)
        self.listener.settimeout(0.2)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            with conn:
                try:
                    conn.sendall(HELLO.pack(MAGIC, self.epoch, self.block_size))
                except OSError:
                    continue
                self._drain()
                with self._both:
                    self.connected = True
                    self._both.notify_all()
                try:
                    while not self._halt.is_set():
                        try:
                            head, data = self.q.get(timeout=0.2)
                        except queue.Empty:
                            continue
                        conn.sendall(head)
                        conn.sendall(data)
                except OSError:
                    pass
                finally:
                    with self._both:
                        self.connected = False

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.q.get_nowait()

    def offer(self, head: bytes, data: bytes, wait: bool) -> None:
        """Queue a block; a full queue drops it, or with ``wait`` (unthrottled mode)
        holds the generator back while the end stays connected."""
        while True:
            try:
                self.q.put((head, data), block=wait, timeout=0.2 if wait else None)
                return
            except queue.Full:
                if not wait or not self.connected or self._halt.is_set():
                    self.dropped += 1
                    return


def run_emulator(sockets: tuple[Path, Path], rate_mbps: float, block_size: int,
                 generator: str, stop: threading.Event | None = None,
                 max_blocks: int | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); returns the number of blocks made."""
    if not 0 <= rate_mbps < math.inf:  # a negative rate fell into "0 = unthrottled"
        raise ValueError(f"key rate {rate_mbps!r} Mb/s: give 0 (as fast as possible) or "
                         f"more")
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    epoch = secrets.randbits(63)
    both = threading.Condition()
    ends = [_End(p, epoch, block_size, both, stop) for p in sockets]
    for e in ends:
        e.start()
    gen = KeyGenerator(generator)
    seq = 0
    interval = block_size * 8 / (rate_mbps * 1e6) if rate_mbps > 0 else 0.0
    next_t = time.monotonic()
    try:
        while not stop.is_set() and (max_blocks is None or seq < max_blocks):
            with both:
                if not all(e.connected for e in ends):
                    both.wait(0.2)
                    next_t = time.monotonic()
                    continue
            if interval:
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_t = max(next_t + interval, time.monotonic() - 1.0)
            data = gen.block(block_size)
            head = BLOCK_HEAD.pack(seq, len(data))
            for e in ends:
                e.offer(head, data, wait=not interval)
            seq += 1
    finally:
        stop.set()
        for e in ends:
            e.listener.close()
            e.join(timeout=2)
            with contextlib.suppress(FileNotFoundError):
                e.path.unlink()
    return seq
