"""The application emulator for `qkdctl bench api`: SAEs pulling keys over HTTPS with
mutual TLS, in processes that entered the master's (or slave's) network namespace.

Each puller holds one keep-alive connection and asks for keys back to back until the KME
answers 503 (the store is empty) or it is told to stop; it checks every answer (status,
JSON, key count, base64 and key length) and counts keys and bytes. The *conventional*
puller opens a new connection (a full mutual-TLS handshake) for every request.

The client is a minimal HTTP/1.1 one (``Conn``) over Python's ``ssl.SSLObject``: it
shares two cores with the service it measures, and http.client spends more on parsing
headers (email.parser) and on a syscall per TLS record than the service spends on a
small answer. It reads the socket 1 MiB at a time and decrypts straight into the
answer's buffer; it needs a Content-Length (the key API always sends one).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import socket
import ssl
import time
import zlib
from dataclasses import dataclass, field

import orjson
import pybase64

from control.memory import keep_freed_memory

SAMPLE_EVERY = 16  # a digest of one key in 16 (by key ID), for the enc/dec comparison


@dataclass
class Pull:
    keys: int = 0
    bytes: int = 0
    requests: int = 0
    started: float = 0.0
    ended: float = 0.0
    stop_status: int = 0
    stop_message: str = ""
    key_ids: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    error: str = ""


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
        self.tls.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
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


def client_context(pki: str, sae: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    ctx.load_cert_chain(f"{pki}/saes/{sae}.crt", f"{pki}/saes/{sae}.key")
    return ctx


def _check(body: bytes | bytearray, number: int, size_bytes: int, out: Pull, sample: bool) -> None:
    keys = orjson.loads(body)["keys"]
    if len(keys) != number:
        raise ValueError(f"{len(keys)} keys in an answer, {number} asked")
    for k in keys:
        key = pybase64.b64decode(k["key"], validate=True)
        if len(key) != size_bytes:
            raise ValueError(f"a key of {len(key)} B, {size_bytes} B asked")
        out.key_ids.append(k["key_ID"])
        if sample and zlib.crc32(k["key_ID"].encode()) % SAMPLE_EVERY == 0:
            out.digests[k["key_ID"]] = hashlib.sha256(key).hexdigest()


def pull_enc(pki: str, sae: str, host: str, port: int, slave: str, size_bits: int,
             number: int, start_at: float, deadline: float, keep_alive: bool) -> Pull:
    """enc_keys until 503 or ``deadline`` (wall clock)."""
    out = Pull()
    ctx = client_context(pki, sae)
    path = f"/api/v1/keys/{slave}/enc_keys?number={number}&size={size_bits}"
    conn = Conn(host, port, ctx) if keep_alive else None
    while time.time() < start_at:
        time.sleep(0.001)
    out.started = time.time()
    try:
        while time.time() < deadline:
            c = conn or Conn(host, port, ctx)
            status, body = c.get(path)
            if conn is None:
                c.close()
            out.requests += 1
            if status != 200:
                out.stop_status = status
                out.stop_message = orjson.loads(body).get("message", "")[:200]
                break
            _check(body, number, size_bits // 8, out, True)
            out.keys += number
            out.bytes += number * size_bits // 8
    except Exception as e:  # reported, the bench decides
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.ended = time.time()
    if conn is not None:
        conn.close()
    return out


def pull_dec(pki: str, sae: str, host: str, port: int, master: str, key_ids: list[str],
             size_bits: int, start_at: float) -> Pull:
    """dec_keys for each key ID, one per request, on one keep-alive connection."""
    out = Pull()
    conn = Conn(host, port, client_context(pki, sae))
    while time.time() < start_at:
        time.sleep(0.001)
    out.started = time.time()
    try:
        for kid in key_ids:
            status, body = conn.get(f"/api/v1/keys/{master}/dec_keys?key_ID={kid}")
            out.requests += 1
            if status != 200:
                out.stop_status = status
                out.stop_message = orjson.loads(body).get("message", "")[:200]
                break
            _check(body, 1, size_bits // 8, out, True)
            out.keys += 1
            out.bytes += size_bits // 8
    except Exception as e:
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.ended = time.time()
    conn.close()
    return out


def _child(ns: str, fn, args: tuple, conn) -> None:
    from pyroute2 import netns

    try:
        netns.setns(ns)
        keep_freed_memory()  # as the service does: no page faults per answer
        conn.send(fn(*args))
    except BaseException as e:
        conn.send(Pull(error=f"{type(e).__name__}: {e}"[:300]))


def run_in(ns: str, jobs: list[tuple], timeout: float) -> list[Pull]:
    """Run each (function, args) in its own process inside namespace ``ns``."""
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
        if parent.poll(max(0.0, end - time.monotonic())):
            out.append(parent.recv())
        else:
            out.append(Pull(error="no result in time"))
        p.kill()
        p.join(2)
    return out
