"""The local key manager's ceilings: the key source alone, and a copy of the same bytes
into shared memory.

*Source alone*: the link emulator (the same code, generator and block size as the bench's
network) with a reader at each end that only counts what arrives, through the node's own
socket client (``EmulatorSource``); no agreement, no rings. Both ends are read, as both
key managers read in the bench, so the emulator does the same work.

*Shared-memory copy*: blocks of the same size copied with numpy into a mapping of a
/dev/shm file the size of the bench's rings, its pages touched first (the rings populate
theirs).
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing as mp
import os
import select
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from control.core import paths
from control.lkm.emulator import run_emulator
from control.lkm.source import EmulatorSource, SourceUnavailable

SHM = Path("/dev/shm")


def _read_end(path: str, start: float, end: float, conn) -> None:
    """Count the key bytes that arrive at one end between ``start`` and ``end``
    (monotonic clock, shared by the processes)."""
    src = EmulatorSource(Path(path))
    deadline = time.monotonic() + 10
    while True:
        try:
            src.open()
            break
        except SourceUnavailable:
            if time.monotonic() > deadline:
                conn.send("emulator socket never answered")
                return
            time.sleep(0.05)
    counted = 0
    try:
        while (now := time.monotonic()) < end:
            select.select([src.fileno()], [], [], 0.2)
            got = sum(len(data) for _, data in src.read_blocks())
            if now >= start:
                counted += got
    except SourceUnavailable as e:
        conn.send(str(e))
        return
    finally:
        src.close()
    conn.send(counted)


def source_alone(block: int, seconds: float, generator: str = "aes-ctr",
                 warmup: float = 1.0) -> dict:
    """Key bytes per second at one end of an unthrottled emulator read at both ends."""
    ctx = mp.get_context("fork")
    where = paths.RUN_ROOT / f"bench-src-{uuid.uuid4().hex[:6]}"
    where.mkdir(parents=True, exist_ok=True)
    socks = (where / "a.sock", where / "b.sock")
    emulator = ctx.Process(target=run_emulator, args=(socks, 0.0, block, generator),
                           daemon=True)
    readers: list[tuple[mp.process.BaseProcess, object]] = []
    try:
        emulator.start()
        start = time.monotonic() + warmup
        for s in socks:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_read_end, args=(str(s), start, start + seconds, child),
                            daemon=True)
            p.start()
            readers.append((p, parent))
        counts = [parent.recv() if parent.poll(warmup + seconds + 30) else "no answer"
                  for _, parent in readers]
        bad = [c for c in counts if not isinstance(c, int)]
        if bad:
            raise RuntimeError(f"key source alone: a reader failed: {bad[0]}")
        return {"block_size": block, "generator": generator, "seconds": seconds,
                "bytes": counts[0], "gbps": counts[0] * 8 / seconds / 1e9}
    finally:
        for p, _ in readers:
            if p.is_alive():
                p.kill()
            p.join(2)
        if emulator.pid is not None:  # killed: nothing of it outlives its directory
            emulator.kill()
            emulator.join(5)
        shutil.rmtree(where, ignore_errors=True)


def shm_copy(block: int, capacity: int, seconds: float = 1.0) -> dict:
    """Bytes per second copied, ``block`` at a time, round a /dev/shm mapping of
    ``capacity`` bytes."""
    capacity -= capacity % block
    path = SHM / f"qkbench-copy-{uuid.uuid4().hex[:8]}"  # not a ring: no qkdnet- name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, capacity)
            mm = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        try:
            ring = np.frombuffer(mm, dtype=np.uint8)
            ring[:] = 0  # every page present, as the rings' populated mappings
            src = np.frombuffer(os.urandom(block), dtype=np.uint8)
            copied, pos = 0, 0
            t0 = time.perf_counter()
            while (el := time.perf_counter() - t0) < seconds:
                for _ in range(16):
                    ring[pos:pos + block] = src
                    pos = (pos + block) % capacity
                copied += 16 * block
            del ring
        finally:
            with contextlib.suppress(BufferError):  # a view left by a failure
                mm.close()
        return {"block_size": block, "capacity": capacity, "seconds": el, "bytes": copied,
                "gbps": copied * 8 / el / 1e9}
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
