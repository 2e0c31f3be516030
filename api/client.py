"""A minimal HTTPS client for SAEs: the demo's and `bench api`'s calls of the key API.

``Conn`` is HTTP/1.1 with keep-alive over ``ssl.SSLObject``: it reads the socket 1 MiB at
a time (one syscall for many TLS records; http.client makes one or two per record and
parses headers with email.parser) and decrypts straight into the answer's buffer. It
needs a Content-Length, which the key API always sends. ``run_in_netns`` runs calls in
processes that entered a node's network namespace, where the node's KME listens.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import ssl
import time

from control.core.memory import keep_freed_memory


def client_context(pki: str, sae: str) -> ssl.SSLContext:
    """Verify the KME against the network's CA; present the SAE's certificate."""
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    ctx.load_cert_chain(f"{pki}/saes/{sae}.crt", f"{pki}/saes/{sae}.key")
    return ctx


class Conn:
    """One keep-alive HTTPS connection issuing GETs, one at a time."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext):
        self.host = host
        self.sock = socket.create_connection((host, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname=host)
        self.raw = bytearray(1 << 20)
        self.head = bytearray(1 << 16)
        self.have = 0  # decrypted bytes in ``head`` not yet consumed
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def close(self) -> None:
        self.sock.close()

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        n = self.sock.recv_into(self.raw)
        if not n:
            raise ConnectionError("the server closed the connection")
        self.inc.write(memoryview(self.raw)[:n])

    def _read_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self.tls.read(len(view), view)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            if not n:
                raise ConnectionError("the server closed the connection")
            return n

    def get(self, path: str) -> tuple[int, bytearray]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytearray]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body or method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.tls.write(head.encode() + b"\r\n" + body)
        self._flush()
        hv = memoryview(self.head)
        while (end := self.head.find(b"\r\n\r\n", 0, self.have)) < 0:
            if self.have == len(self.head):
                raise ValueError("response headers larger than 64 KiB")
            self.have += self._read_into(hv[self.have:])
        lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(line.split(":", 1) for line in lines[1:])
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        length = int(fields["content-length"])
        body = bytearray(length)
        start = end + 4
        got = min(length, self.have - start)
        body[:got] = self.head[start:start + got]
        rest = self.have - start - got
        self.head[:rest] = self.head[start + got:self.have]
        self.have = rest
        bv = memoryview(body)
        while got < length:
            got += self._read_into(bv[got:])
        if fields.get("connection", "").lower() == "close":
            self.close()
        return status, body


def _child(ns: str, fn, args: tuple, conn) -> None:
    from pyroute2 import netns

    try:
        netns.setns(ns)
        keep_freed_memory()  # as the service does: no page faults per answer
        conn.send(fn(*args))
    except BaseException as e:  # reported to the caller
        conn.send(f"{type(e).__name__}: {e}"[:300])


def run_in_netns(ns: str, jobs: list[tuple], timeout: float) -> list:
    """Run each (function, args) in its own process inside namespace ``ns``; each
    result, or the text of what it raised."""
    ctx = mp.get_context("fork")
    procs = []
    for fn, args in jobs:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(ns, fn, args, child), daemon=True)
        p.start()
        procs.append((p, parent))
    out = []
    end = time.monotonic() + timeout
    for p, parent in procs:
        out.append(parent.recv() if parent.poll(max(0.0, end - time.monotonic()))
                   else "no result in time")
        p.kill()
        p.join(2)
    return out
