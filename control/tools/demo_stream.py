"""A paced TCP stream between two namespaces, for the demo: it runs while a link is cut and
restored, and proves at the end that every byte arrived, in order (length and SHA-256 at
both ends), while its counters show the rate live."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import socket
import time
from dataclasses import dataclass

CHUNK = 64 << 10
_ctx = mp.get_context("fork")


def _enter(ns: str) -> None:
    from pyroute2 import netns

    netns.setns(ns)


def _sink(ns: str, addr: str, port: int, ready, received, out) -> None:
    try:
        _enter(ns)
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((addr, port))
        srv.listen(1)
        ready.set()
        srv.settimeout(30)
        conn, _ = srv.accept()
        conn.settimeout(60)  # a reroute stalls the stream for a second or two, not longer
        h = hashlib.sha256()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := conn.recv_into(buf):
            h.update(view[:n])
            with received.get_lock():
                received.value += n
        conn.close()
        srv.close()
        out.send({"bytes": received.value, "sha256": h.hexdigest()})
    except BaseException as e:  # reported to the parent
        out.send({"error": f"{type(e).__name__}: {e}"})


def _source(ns: str, src: str, addr: str, port: int, rate_bps: float, stop, sent, out) -> None:
    try:
        _enter(ns)
        s = socket.socket()
        s.bind((src, 0))
        s.settimeout(60)
        s.connect((addr, port))
        data = os.urandom(1 << 20)  # the stream repeats this, offset by a counter
        h = hashlib.sha256()
        t0 = time.monotonic()
        total = 0
        i = 0
        while not stop.is_set():
            chunk = data[(i * 4096) % len(data):][:CHUNK] + i.to_bytes(8, "big")
            i += 1
            s.sendall(chunk)
            h.update(chunk)
            total += len(chunk)
            sent.value = total
            ahead = total * 8 / rate_bps - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        s.shutdown(socket.SHUT_WR)
        s.close()
        out.send({"bytes": total, "sha256": h.hexdigest()})
    except BaseException as e:  # reported to the parent
        out.send({"error": f"{type(e).__name__}: {e}"})


@dataclass
class StreamResult:
    sent: int
    received: int
    intact: bool
    error: str = ""


class PacedStream:
    """TCP from ``src`` in namespace ``src_ns`` to ``dst`` in ``dst_ns`` at ``rate_bps``."""

    def __init__(self, src_ns: str, src: str, dst_ns: str, dst: str, port: int,
                 rate_bps: float):
        self.received = _ctx.Value("q", 0)
        self.sent = _ctx.Value("q", 0, lock=False)
        self._stop = _ctx.Event()
        ready = _ctx.Event()
        self._sink_out, sink_in = _ctx.Pipe(duplex=False)
        self._src_out, src_in = _ctx.Pipe(duplex=False)
        self._sink = _ctx.Process(target=_sink, daemon=True,
                                  args=(dst_ns, dst, port, ready, self.received, sink_in))
        self._src = _ctx.Process(target=_source, daemon=True,
                                 args=(src_ns, src, dst, port, rate_bps, self._stop,
                                       self.sent, src_in))
        self._sink.start()
        if not ready.wait(10):
            self.kill()
            raise RuntimeError("the stream's receiver did not start")
        self._src.start()

    def finish(self, timeout: float = 30.0) -> StreamResult:
        """Stop sending, wait for the receiver to drain, compare both ends."""
        self._stop.set()
        try:
            got = []
            for pipe in (self._src_out, self._sink_out):
                got.append(pipe.recv() if pipe.poll(timeout) else {"error": "no answer"})
            sender, sink = got
            err = sender.get("error") or sink.get("error") or ""
            return StreamResult(sent=sender.get("bytes", 0), received=sink.get("bytes", 0),
                                intact=not err and sender == sink, error=err)
        finally:
            self.kill()

    def kill(self) -> None:
        for p in (self._src, self._sink):
            with contextlib.suppress(Exception):
                if p.pid is not None:
                    p.kill()
                    p.join(2)
