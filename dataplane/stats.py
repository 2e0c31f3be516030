"""Per-link-end dataplane counters in shared memory: one row per lane, written by the
worker that owns the lane and read by the tunnel manager, `qkdctl status` and benchmarks.

A plain mmap'ed file under /dev/shm (named like the rings, so `qkdctl net down` removes
it). Workers keep counters in local lists and copy them here a few times a second, so the
hot path touches no shared memory for accounting.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np

from dataplane.private import open_private
from dataplane.ring import MAX_LANES
from dataplane.wire import RX_DROPS, TX_DROPS

# Per-packet time per step (ns), in the paper's Table I order: read, key, OTP, send.
STEPS_TX = ("t_tx_read", "t_tx_key", "t_tx_crypto", "t_tx_send")
STEPS_RX = ("t_rx_recv", "t_rx_key", "t_rx_crypto", "t_rx_write")
COUNTERS = ("tx_pkts", "tx_bytes", "tx_key", "rx_pkts", "rx_bytes", "rx_key", "claims",
            *STEPS_TX, *STEPS_RX,
            *(f"drop_tx_{r}" for r in TX_DROPS), *(f"drop_rx_{r}" for r in RX_DROPS))
IDX = {name: i for i, name in enumerate(COUNTERS)}
WIDTH = 128
LINK_ROW = MAX_LANES  # row after the lanes: link-wide words below
W_PEER_WORKERS, W_LINK_UP, W_PID_BASE = 0, 1, 8  # pids of lane owners at W_PID_BASE + lane
SHAPE = (MAX_LANES + 1, WIDTH)
SIZE = SHAPE[0] * SHAPE[1] * 8
SHM_DIR = Path("/dev/shm")


class LinkStats:
    def __init__(self, name: str, create: bool = False):
        path = SHM_DIR / name
        # Never a file another user planted: the workers' pids recorded here get signalled.
        self._fd = open_private(path, create=create)
        if os.fstat(self._fd).st_size < SIZE:
            if not create:
                os.close(self._fd)
                raise FileNotFoundError(path)
            os.ftruncate(self._fd, SIZE)
        self._mm = mmap.mmap(self._fd, SIZE)
        self.words = np.ndarray(SHAPE, dtype=np.uint64, buffer=self._mm)

    def row(self, lane: int) -> np.ndarray:
        return self.words[lane, :len(COUNTERS)]

    def publish(self, lane: int, local: list[int]) -> None:
        self.words[lane, :len(COUNTERS)] = local

    def totals(self) -> dict[str, int]:
        s = self.words[:MAX_LANES, :len(COUNTERS)].sum(axis=0)
        return {name: int(s[i]) for i, name in enumerate(COUNTERS)}

    def link_word(self, w: int) -> int:
        return int(self.words[LINK_ROW, w])

    def set_link_word(self, w: int, v: int) -> None:
        self.words[LINK_ROW, w] = v

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self.words
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def new_counters() -> list[int]:
    return [0] * len(COUNTERS)
