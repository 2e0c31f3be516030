"""The key API's worker processes, pre-forked and supervised.

The module process (the *manager*) binds the listening socket once and forks
``[api] workers`` processes that share it, each serving Sanic in single-process mode. A
worker that dies, however it dies, is forked again at once (a crash loop backs off, up to
a few seconds), so the API serves again within about a second; while none runs, new
connections wait in the socket's backlog instead of being refused. Sanic's own
multi-worker manager never replaced a killed worker, and with all of them gone the API
accepted nothing while it looked up.

The manager publishes ``api.json`` (workers, restarts, last restart, state) for
``qkdctl status`` and the metrics; a manager killed is restarted by the node's supervisor,
and its workers, which die with it (SIGTERM: they finish the requests in flight), release
the port for the new one. SIGTERM to the manager stops the workers gracefully.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from api.hand_counts import HandTable
from control.core.procs import process_identity, send_signal
from control.core.statefile import write_json

log = logging.getLogger("qkdnet.api")
QUICK_EXIT_S = 2.0       # a worker that dies sooner than this after its start crash-loops
MAX_BACKOFF_S = 4.0      # the longest wait before forking a crash-looping worker again
BIND_TIMEOUT_S = 10.0    # how long the port may stay held by a previous manager's workers
PUBLISH_S = 0.5


def restart_delay(quick_exits: int) -> float:
    """Seconds to wait before forking a worker again: none after a worker that had been
    serving, then 0.25 s doubling up to MAX_BACKOFF_S for one that keeps dying at once."""
    if quick_exits <= 1:
        return 0.0
    return min(MAX_BACKOFF_S, 0.25 * 2 ** (quick_exits - 2))


@dataclass(eq=False)
class Slot:
    """One worker place: the process in it now and its history."""

    index: int
    proc: mp.process.BaseProcess | None = None
    started: float = 0.0          # monotonic
    started_wall: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    last_exit: int | None = None
    next_start: float = 0.0
    identity: int = 0

    def state(self) -> dict:
        alive = bool(self.proc is not None and self.proc.is_alive())
        return {"slot": self.index, "pid": self.proc.pid if self.proc else None,
                "alive": alive, "started": self.started_wall if alive else None,
                "restarts": self.restarts, "last_exit": self.last_exit}


def bind_listener(host: str, port: int, backlog: int = 1024,
                  timeout_s: float = BIND_TIMEOUT_S) -> socket.socket:
    """The shared listening socket. The port may still be held for a moment by the
    workers of a manager that was killed (they stop listening as they shut down): wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(backlog)
        except OSError as e:
            s.close()
            if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        s.set_inheritable(True)
        return s


@dataclass(eq=False)
class WorkerPool:
    """``size`` worker processes running ``target(sock, slot index)``, kept at that
    number; ``hands``: their hand counts (``api.hand_counts``), one row per slot."""

    size: int
    target: Callable[[socket.socket, int], None]
    sock: socket.socket
    status_path: Path
    grace_s: float
    hands: HandTable | None = None
    slots: list[Slot] = field(default_factory=list)
    stop: bool = False
    restarts: int = 0
    last_restart: float | None = None  # wall clock
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.slots = [Slot(i) for i in range(self.size)]
        self._ctx = mp.get_context("fork")

    def _fork(self, slot: Slot, now: float) -> None:
        slot.proc = self._ctx.Process(target=self.target, args=(self.sock, slot.index),
                                      name=f"api-worker-{slot.index}", daemon=False)
        slot.proc.start()
        slot.started, slot.started_wall = now, time.time()
        slot.identity = process_identity(slot.proc.pid or 0)

    def _reap(self, now: float) -> None:
        for slot in self.slots:
            p = slot.proc
            if p is None or p.is_alive():
                continue
            p.join(0)
            slot.last_exit = p.exitcode
            slot.proc = None
            slot.quick_exits = slot.quick_exits + 1 if now - slot.started < QUICK_EXIT_S else 1
            slot.next_start = now + restart_delay(slot.quick_exits)
            lost = self.hands.worker_ended(slot.index) if self.hands is not None else 0
            if lost:
                log.warning("key API worker %d (pid %d) ended holding %d key(s) taken "
                            "ahead in its hands: they reach no application", slot.index,
                            p.pid, lost)
            if not self.stop:
                log.warning("key API worker %d (pid %d) exited with %s; forking it again "
                            "in %.2f s", slot.index, p.pid, slot.last_exit,
                            slot.next_start - now)

    def _fill(self, now: float) -> None:
        for slot in self.slots:
            if slot.proc is None and now >= slot.next_start and not self.stop:
                first = slot.started == 0.0
                self._fork(slot, now)
                if not first:
                    slot.restarts += 1
                    self.restarts += 1
                    self.last_restart = time.time()

    def state(self) -> dict:
        workers = [s.state() for s in self.slots]
        alive = sum(w["alive"] for w in workers)
        state = ("stopping" if self.stop else "serving" if alive == self.size
                 else "degraded" if alive else "down")
        out = {"pid": os.getpid(), "updated": time.time(), "started": self.started,
               "state": state, "workers_alive": alive, "workers": self.size,
               "restarts": self.restarts, "last_restart": self.last_restart,
               "slots": workers}
        if self.hands is not None:
            hands = self.hands.totals()
            out["refused_connections"] = hands.pop("refused_connections")
            out["hands"] = hands
        return out

    def publish(self) -> None:
        with contextlib.suppress(OSError):
            write_json(self.status_path, self.state())

    def run(self) -> None:
        """Keep the pool full until SIGTERM/SIGINT, then stop the workers gracefully."""
        def on_signal(*_: object) -> None:
            self.stop = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        next_publish = 0.0
        try:
            while not self.stop:
                now = time.monotonic()
                self._reap(now)
                self._fill(now)
                if now >= next_publish:
                    self.publish()
                    next_publish = now + PUBLISH_S
                sentinels = [s.proc.sentinel for s in self.slots if s.proc is not None]
                waits = [s.next_start - now for s in self.slots if s.proc is None]
                wait(sentinels, timeout=max(0.01, min([PUBLISH_S, *waits])))
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stop = True
        running = [s for s in self.slots if s.proc is not None and s.proc.is_alive()]
        for s in running:
            send_signal(s.identity, signal.SIGTERM)  # Sanic: finish what is in flight
        deadline = time.monotonic() + self.grace_s
        for s in running:
            assert s.proc is not None
            s.proc.join(max(0.0, deadline - time.monotonic()))
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join(1.0)
        self._reap(time.monotonic())  # a worker killed past its grace: its hands lost
        self.publish()
