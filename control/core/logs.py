"""Structured logs: one JSON object per line, and never a key byte in them.

Every module process calls :func:`setup_logging`. A line carries ``time``, ``level``,
``logger`` (the module: qkdnet.lkm, qkdnet.gkm, ...), ``node`` (from ``QKDNET_NODE``, set by
the node's supervisor), ``pid``, ``message`` and any ``extra`` fields, so logs can be
shipped to a log store and queried without parsing prose. ``QKDNET_LOG_FORMAT=text`` gives
the classic one-line text form for reading by eye.

Invariant 6 (no secrets in logs) is kept by what modules log (counts, positions, IDs), and
enforced here as well: :class:`NoKeyBytes` replaces any bytes-like argument or extra field
with its length before a line is formatted, so a careless ``log.info("%s", block)`` writes
``<1048576 bytes>``, not key.

A log must not be a way to fill the node's disk or memory (the logs live under
``/run/qkdnet``, a tmpfs on most machines): anything an outsider can make happen once per
request or datagram could otherwise write a line each time. :class:`RepeatLimit` lets each
line of code (each logging call site) write ``BURST`` lines at once and one more every
``EVERY_S`` after that; the next line written says how many were left out.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s node=%(node)s pid=%(process)d %(message)s"
_STANDARD = set(vars(logging.makeLogRecord({})))


def redact(value: object, depth: int = 0) -> object:
    """A bytes-like value becomes a note of its length, also inside tuples, lists, sets,
    dicts and dataclasses (a key block is ``((epoch, seq), bytearray)``); anything else
    is left alone."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if depth > 8:
        return value
    if isinstance(value, tuple | list | set | frozenset):
        return type(value)(redact(v, depth + 1) for v in value) \
            if not hasattr(value, "_fields") else type(value)(*(redact(v, depth + 1)
                                                                for v in value))
    if isinstance(value, dict):
        return {k: redact(v, depth + 1) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: redact(getattr(value, f.name), depth + 1)
                for f in dataclasses.fields(value)}
    return value


class NoKeyBytes(logging.Filter):
    """Scrubs bytes from a record's message, arguments and extra fields; adds ``node``."""

    def __init__(self, node: str):
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.msg)
        if isinstance(record.args, dict):
            record.args = {k: redact(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(redact(a) for a in record.args)
        for k, v in list(vars(record).items()):
            if k not in _STANDARD:
                setattr(record, k, redact(v))
        if not hasattr(record, "node"):
            record.node = self.node
        return True


BURST = 20  # lines one call site writes at once
EVERY_S = 3.0  # then one line per this many seconds: 20 a minute, about 7 MB a day at most
MAX_SITES = 4096  # call sites tracked (a process has a few hundred); the oldest is forgotten


class RepeatLimit(logging.Filter):
    """A token bucket per call site (logger, file, line): ``BURST`` lines, then one every
    ``EVERY_S``. A line let through after some were left out carries their number, in
    its message and as the ``left_out`` field."""

    def __init__(self, burst: int = BURST, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.every_s, self.clock = burst, every_s, clock
        self.lock = threading.Lock()
        # A child forked while another thread held the lock would wait on it for good.
        os.register_at_fork(after_in_child=self._new_lock)
        self.sites: dict[tuple[str, str, int], list[float]] = {}  # site -> [tokens, at, dropped]

    def _new_lock(self) -> None:
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        with self.lock:  # filters run outside the handler's lock, in any thread
            dropped = self._spend((record.name, record.pathname, record.lineno))
        if dropped is None:
            return False
        if dropped:
            record.left_out = dropped
            try:
                record.msg = f"{record.getMessage()} ({dropped} more line(s) from here " \
                             f"not logged)"
                record.args = None
            except Exception:  # a message that cannot be formatted: the handler says so
                pass
        return True

    def _spend(self, site: tuple[str, str, int]) -> int | None:
        """None if the site has no line left now; else how many it left out before."""
        now = self.clock()
        state = self.sites.pop(site, None)  # put back last: the dict is oldest first
        if state is None:
            state = [float(self.burst), now, 0]
            if len(self.sites) >= MAX_SITES:
                del self.sites[next(iter(self.sites))]
        self.sites[site] = state
        tokens = min(self.burst, state[0] + (now - state[1]) / self.every_s)
        state[1] = now
        if tokens < 1:
            state[0], state[2] = tokens, state[2] + 1
            return None
        state[0] = tokens - 1
        dropped, state[2] = int(state[2]), 0
        return dropped


def formatter(kind: str) -> logging.Formatter:
    if kind == "text":
        return logging.Formatter(TEXT_FORMAT)
    return JsonFormatter("{levelname}{name}{node}{process}{message}", style="{",
                         rename_fields={"levelname": "level", "name": "logger",
                                        "process": "pid"}, timestamp="time")


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Configure the root logger of this process (replacing any earlier setup), route
    warnings and uncaught exceptions through it, so the whole log stays structured."""
    kind = os.environ.get("QKDNET_LOG_FORMAT", "json")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(kind))
    handler.addFilter(NoKeyBytes(os.environ.get("QKDNET_NODE", "-")))
    handler.addFilter(RepeatLimit())  # after: it may format the message of a line it lets by
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)

    def excepthook(kind_, value, tb) -> None:
        if issubclass(kind_, KeyboardInterrupt):
            sys.__excepthook__(kind_, value, tb)
            return
        logging.getLogger("qkdnet").critical("uncaught %s", kind_.__name__,
                                             exc_info=(kind_, value, tb))

    sys.excepthook = excepthook
