"""The global key manager's ceilings: the same bytes written to a bare RocksDB store, no
relay, and the disk's own synced write rate, both in the filesystem of the key stores.

*Bare store*: a fresh database with the key store's own options (``keystore._options``),
blocks written in batches of one relay message (``gkm.SEND_BATCH``) the way a received
batch is made durable (``KeyStore._write_blocks``: batches of ``BULK_WRITE`` or more
skip the log and are flushed to a synced table; smaller ones go through a synced log).
Only the bytes and the per-block metadata entry are written: no message, no
acknowledgement, no index.

*Both ends' stores*: the bare store written twice at once, in two processes, each with the
whole of the bytes: what bounded a relay between two nodes on this one machine while each
key byte was made durable at its origin and at its destination, on the same disk and cores
(the origin now stores a seed per block instead: ``control.gkm.seeds``); a reference
beside the single store, which the target is set against.

*Disk*: the same bytes written to a file, ``block`` at a time, with one ``fdatasync`` per
batch: what the disk does with the same sync pattern and no database.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import struct
import time
import uuid
from pathlib import Path

from control.core import paths
from control.gkm.manager import SEND_BATCH
from control.gkm.store import BULK_WRITE, _options

_META = struct.Struct(">IB")  # the key store's block metadata: size, state
_U64 = struct.Struct(">Q")


def _scratch(root: Path | None) -> Path:
    d = (root or paths.RUN_ROOT) / f"bench-store-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    return d


def _blocks(total: int, block: int) -> list[bytes]:
    """Random blocks enough for ``total`` bytes (a few distinct ones, reused: key
    material does not compress, and the store is set not to try)."""
    distinct = [os.urandom(block) for _ in range(min(8, max(1, total // block)))]
    return [distinct[i % len(distinct)] for i in range(max(1, total // block))]


def store_write(total: int, block: int = 1 << 20, batch: int = SEND_BATCH,
                root: Path | None = None) -> dict:
    """Bytes per second made durable in a bare RocksDB store, ``batch`` bytes a write."""
    d = _scratch(root)
    try:
        return _fill_store(d / "db", _blocks(total, block), block, max(1, batch // block))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _fill_store(path: Path, blocks: list[bytes], block: int, per: int) -> dict:
    """The timed writes; every RocksDB object is released before this returns (a handle
    left alive closes the database later and writes its manifest into a removed
    directory)."""
    from rocksdict import Rdict, WriteBatch, WriteOptions

    cf_name = "dec.bench"
    db = Rdict(str(path), _options(), column_families={cf_name: _options()})
    try:
        cf = db.get_column_family(cf_name)
        h = db.get_column_family_handle(cf_name)
        synced, no_wal = WriteOptions(), WriteOptions()
        synced.sync = True
        no_wal.disable_wal = True
        t0 = time.perf_counter()
        for at in range(0, len(blocks), per):
            wb = WriteBatch(raw_mode=True)
            part = blocks[at:at + per]
            for seq, data in enumerate(part, at):
                wb.put(b"b" + _U64.pack(seq), data, h)
                wb.put(b"m" + _U64.pack(seq), _META.pack(len(data), 1), h)
            if sum(len(b) for b in part) >= BULK_WRITE:
                db.write(wb, no_wal)
                cf.flush(True)
            else:
                db.write(wb, synced)
            del wb
        el = time.perf_counter() - t0
        span = (time.time() - el, time.time())  # wall clock: a pair's runs are compared
        del cf, h  # as KeyStore.close: the views first, then the database
    finally:
        db.close()
        del db
    nbytes = len(blocks) * block
    return {"bytes": nbytes, "block": block, "batch": per * block, "seconds": el,
            "gbps": nbytes * 8 / el / 1e9, "span": span}


def _pair_member(total: int, block: int, batch: int, root: Path | None, barrier,
                 out) -> None:
    barrier.wait()
    out.put(store_write(total, block, batch, root))


def store_write_pair(total: int, block: int = 1 << 20, batch: int = SEND_BATCH,
                     root: Path | None = None) -> dict:
    """Bytes per second made durable in two bare stores at once (each gets all of them):
    the rate is ``total`` over the time from the first store's start to the last one's
    end."""
    ctx = mp.get_context("spawn")  # no fork of a process that may hold threads
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_pair_member, args=(total, block, batch, root, barrier, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    try:
        runs = [out.get(timeout=600) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    el = max(r["span"][1] for r in runs) - min(r["span"][0] for r in runs)
    nbytes = runs[0]["bytes"]
    return {"bytes": nbytes, "block": block, "batch": runs[0]["batch"], "seconds": el,
            "gbps": nbytes * 8 / el / 1e9, "stores_gbps": [r["gbps"] for r in runs],
            "spans": [r["span"] for r in runs]}


def disk_write(total: int, block: int = 1 << 20, batch: int = SEND_BATCH,
               root: Path | None = None) -> dict:
    """Bytes per second written to a file, ``block`` a write, one fdatasync a batch."""
    d = _scratch(root)
    try:
        blocks = _blocks(total, block)
        per = max(1, batch // block)
        fd = os.open(d / "data", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.perf_counter()
            for i, data in enumerate(blocks, 1):
                os.write(fd, data)
                if i % per == 0 or i == len(blocks):
                    os.fdatasync(fd)
            el = time.perf_counter() - t0
        finally:
            os.close(fd)
        nbytes = len(blocks) * block
        return {"bytes": nbytes, "block": block, "batch": per * block, "seconds": el,
                "gbps": nbytes * 8 / el / 1e9}
    finally:
        shutil.rmtree(d, ignore_errors=True)
