"""Tests of the key source base for blocking protocols (control.lkm.source.FetchingSource):
blocks arrive whole and in order through the pipe, a paused reader pauses the fetching, and
a failure is reported after the blocks fetched before it."""

from __future__ import annotations

import select
import threading

import pytest

from control.lkm.source import FetchingSource, SourceUnavailable
from tests.nsutil import wait_until


class Scripted(FetchingSource):
    """Fetches from a script: each item is a list of blocks or an exception to raise."""

    max_queued = 3

    def __init__(self, script):
        super().__init__("scripted")
        self.script = list(script)
        self.fetches = 0
        self.connected = False
        self.lock = threading.Lock()

    def connect(self):
        self.connected = True

    def fetch(self):
        with self.lock:
            self.fetches += 1
            if not self.script:
                return []
            item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def disconnect(self):
        self.connected = False


def _block(seq: int) -> tuple[tuple[int, int], bytearray]:
    return ((7, seq), bytearray([seq]) * 16)


def _read_until(src: FetchingSource, want: int, timeout: float = 5.0):
    got = []
    while len(got) < want:
        r, _, _ = select.select([src.fileno()], [], [], timeout)
        assert r, f"no wake-up after {len(got)} blocks"
        got += src.read_blocks()
    return got


def test_blocks_arrive_in_order_and_wake_the_selector():
    src = Scripted([[_block(0), _block(1)], [], [_block(2)]])
    src.open()
    try:
        got = _read_until(src, 3)
        assert [b[0] for b in got] == [(7, 0), (7, 1), (7, 2)]
        assert got[2][1] == bytearray([2]) * 16
    finally:
        src.close()
    assert not src.connected and src.fileno() == -1


def test_a_reader_that_stops_reading_stops_the_fetching():
    src = Scripted([[_block(i)] for i in range(20)])
    src.open()
    try:
        wait_until(lambda: src.fetches >= src.max_queued, 5, "the queue to fill")
        threading.Event().wait(0.2)
        assert src.fetches == src.max_queued  # queue full: the thread waits
        got = _read_until(src, 20)
        assert [b[0][1] for b in got] == list(range(20))
    finally:
        src.close()


def test_a_failure_comes_after_the_blocks_fetched_before_it():
    src = Scripted([[_block(0)], SourceUnavailable("device went away")])
    src.open()
    try:
        wait_until(lambda: src.fetches == 2 and not src._thread.is_alive(), 5,
                   "the block and the failure")
        r, _, _ = select.select([src.fileno()], [], [], 0)
        assert r
        assert [b[0] for b in src.read_blocks()] == [(7, 0)]
        # The failure is still pending: the pipe stays readable, so the selector
        # loop calls read_blocks again, which raises it.
        r, _, _ = select.select([src.fileno()], [], [], 1.0)
        assert r, "the failure after the block would never be read"
        with pytest.raises(SourceUnavailable, match="device went away"):
            src.read_blocks()
    finally:
        src.close()


def test_blocks_never_read_are_wiped_counted_and_logged_at_close(caplog):
    src = Scripted([[_block(1), _block(2)]])
    src.open()
    wait_until(lambda: src.fetches >= 2, 5, "the blocks queued")
    waiting = list(src._queue)
    assert [b[0] for b in waiting] == [(7, 1), (7, 2)]
    with caplog.at_level("INFO", logger="qkdnet.lkm"):
        src.close()
    assert src.lost == [2, 32]
    assert src.stats() == {"lost_blocks": 2, "lost_bytes": 32}  # the lkm's status shows it
    assert all(data == bytearray(16) for _, data in waiting), "key left in memory"
    assert "2 block(s), 32 B of key fetched and never stored (waiting at close)" \
        in caplog.text


class Stuck(Scripted):
    """A fetch that hangs (a device that stopped answering) until released."""

    close_timeout_s = 0.2

    def __init__(self):
        super().__init__([])
        self.release = threading.Event()

    def fetch(self):
        self.fetches += 1
        self.release.wait(10)
        self.fetched = [_block(self.fetches)]
        return self.fetched


def test_a_fetch_stuck_past_close_blocks_reopening_until_it_ends():
    src = Stuck()
    src.open()
    wait_until(lambda: src.fetches == 1, 5, "the fetch to start")
    src.close()  # the thread outlives it
    with pytest.raises(SourceUnavailable, match="still stuck"):
        src.open()
    src.release.set()
    wait_until(lambda: not src._orphan[0].is_alive(), 5, "the stuck fetch to end")
    assert src.lost == [1, 16]  # what it fetched after all: counted, never delivered,
    assert src.fetched[0][1] == bytearray(16)  # and wiped
    src.open()  # now it may
    try:
        got = _read_until(src, 1)
        assert got and got[0][0] == (7, 2)  # the stuck run's block was not delivered
    finally:
        src.close()


def test_an_unexpected_exception_is_reported_not_fatal():
    src = Scripted([KeyError("bug")])
    src.open()
    try:
        select.select([src.fileno()], [], [], 5.0)
        with pytest.raises(SourceUnavailable, match="KeyError"):
            src.read_blocks()
    finally:
        src.close()


def test_the_emulator_stops_cleanly_when_told(tmp_path):
    """Its link-end threads are joined on the way out; a thread attribute shadowed by the
    stop event once made that join raise (TypeError), so the emulator died with a
    traceback instead of returning."""
    from control.lkm.emulator import run_emulator

    socks = (tmp_path / "a.sock", tmp_path / "b.sock")
    stop, made, failed = threading.Event(), [], []

    def serve() -> None:
        try:
            made.append(run_emulator(socks, 10.0, 4096, "urandom", stop))
        except BaseException as e:  # noqa: BLE001 - what the test looks for
            failed.append(e)

    t = threading.Thread(target=serve)
    t.start()
    wait_until(lambda: all(p.exists() for p in socks), 30, "the emulator's sockets")
    stop.set()
    t.join(30)
    assert not t.is_alive() and not failed and made == [0], failed
    assert not any(p.exists() for p in socks)  # no leftovers
