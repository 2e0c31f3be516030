"""The HTTPS client of an SAE calling a KME (ETSI GS QKD 014): the demo's and the benches'
calls of our key API, and the link key source that is an SAE of its own QKD device.

``KmeClient`` makes the calls ``api.etsi`` builds, over one keep-alive connection: opened
when first needed, replaced before a call when the KME has closed it while idle (seen
without blocking), tried once more on a new one when the close crossed the request, and
any other failure (refused, TLS, timeout, a malformed or cut-off answer) a ``NoAnswer``.
``Conn`` is that connection: HTTP/1.1 over ``ssl.SSLObject``; it reads the socket 1 MiB
at a time (one syscall for many TLS records; http.client makes one or two per record and
parses headers with email.parser) and decrypts straight into the answer's buffer. It
reads bodies by Content-Length (what the key API sends), chunked, or up to the close.
``run_in_netns`` runs calls in processes that entered a node's network namespace, where
the node's KME listens.
"""

from __future__ import annotations

import multiprocessing as mp
import select
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

from api import etsi
from control.core.memory import keep_freed_memory
from dataplane.private import check_trusted, secret_file

MAX_ANSWER = 256 << 20  # bytes of one answer's body; 64 MiB of key is ~90 MB of JSON
_HEAD_BUF = 1 << 16     # bytes of a response's status line and headers, at most


class TlsFilesError(Exception):
    """A CA or certificate file that cannot be loaded; the message names it."""


class RemoteClosed(ConnectionResetError):
    """The server closed the connection before any byte of the answer: most often a
    kept-alive connection it closed while idle (a new connection may well work)."""


class MalformedResponse(ConnectionError):
    """Bytes that are not an HTTP/1.1 answer this client reads; the connection is closed."""


class NoAnswer(ConnectionError):
    """No whole answer came from the KME; the message says what failed."""


def tls_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """TLS 1.2 or newer, the KME verified against ``ca``, our certificate shown. The key
    must be ours alone and the CA writable by its owner only (``dataplane.private``)."""
    try:
        check_trusted(ca, "CA file")
        ctx = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise TlsFilesError(f"cannot load the CA file {ca}: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with secret_file(key, "TLS key") as checked:
            ctx.load_cert_chain(str(cert), checked)
    except (OSError, ssl.SSLError) as e:
        raise TlsFilesError(f"cannot load the client certificate {cert} with key {key}: "
                            f"{e}") from None
    return ctx


def client_context(pki: str, sae: str) -> ssl.SSLContext:
    """``tls_context`` of SAE ``sae`` in a qkdnet PKI folder (``qkdctl pki init``)."""
    return tls_context(f"{pki}/ca.crt", f"{pki}/saes/{sae}.crt", f"{pki}/saes/{sae}.key")


def _decimal(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes superscripts, which int() refuses)."""
    return text.isascii() and text.isdigit()


class Conn:
    """One keep-alive HTTPS connection issuing requests one at a time. Any failure while
    reading an answer closes it."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, timeout: float = 60.0):
        self.host = host
        h = f"[{host}]" if ":" in host else host
        self.authority = h if port == 443 else f"{h}:{port}"
        self.closed = False
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._readable = select.poll()  # (select() cannot take a descriptor above 1,023)
        self._readable.register(self.sock, select.POLLIN)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname=host)
        self.raw = bytearray(1 << 20)
        self.head = bytearray(_HEAD_BUF)
        self.pos = self.have = 0  # head[pos:have]: decrypted bytes not yet consumed
        self._answered = False    # a byte of the current answer has arrived
        try:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._fill():
                        raise ConnectionError("the server closed the connection during "
                                              "the TLS handshake") from None
            self._flush()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    def idle_closed(self) -> bool:
        """Whether the server has already closed this idle connection (its close_notify
        or end of stream is waiting), looked at without blocking before a request
        reuses it: a request sent on it would get no answer and be asked again, which
        a caller must count as possibly acted on (``KmeClient.retried``)."""
        if self.closed:
            return True
        if not self._readable.poll(0):  # (a recv would wait out the socket's timeout)
            return False
        try:
            n = self.sock.recv_into(self.raw, flags=socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not n:
            return True
        self.inc.write(memoryview(self.raw)[:n])
        try:
            self.tls.read(1)  # TLS 1.3 session tickets are taken in; nothing else may come
        except ssl.SSLWantReadError:
            return False
        except (ssl.SSLError, OSError):
            return True  # close_notify, or a broken record
        return True  # bytes no request asked for: not a connection to go on with

    # ---- bytes in and out -----------------------------------------------------------------

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        """Encrypted bytes from the socket into TLS; False at the end of the stream."""
        n = self.sock.recv_into(self.raw)
        if n:
            self.inc.write(memoryview(self.raw)[:n])
        return bool(n)

    def _read_into(self, view: memoryview) -> int:
        """Decrypted bytes into ``view``; 0 at the end of the stream."""
        while True:
            try:
                return self.tls.read(len(view), view)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0

    def _closed_early(self) -> ConnectionError:
        if not self._answered:
            return RemoteClosed("the server closed the connection without an answer")
        return ConnectionError("the server closed the connection mid-answer")

    def _more(self) -> None:
        """More decrypted bytes into the head buffer."""
        if self.pos == self.have:
            self.pos = self.have = 0
        elif self.have == len(self.head):
            if self.pos == 0:
                raise MalformedResponse(f"an answer's head longer than {_HEAD_BUF} bytes")
            n = self.have - self.pos
            self.head[:n] = self.head[self.pos:self.have]
            self.pos, self.have = 0, n
        n = self._read_into(memoryview(self.head)[self.have:])
        if not n:
            raise self._closed_early()
        self._answered = True
        self.have += n

    def _line(self) -> bytes:
        while (end := self.head.find(b"\r\n", self.pos, self.have)) < 0:
            self._more()
        line = bytes(self.head[self.pos:end])
        self.pos = end + 2
        return line

    def _exact(self, view: memoryview) -> None:
        """Fill ``view`` from what is buffered, then from the connection."""
        got = min(len(view), self.have - self.pos)
        view[:got] = self.head[self.pos:self.pos + got]
        self.pos += got
        while got < len(view):
            n = self._read_into(view[got:])
            if not n:
                raise self._closed_early()
            got += n

    # ---- one request ------------------------------------------------------------------------

    def get(self, path: str) -> tuple[int, bytearray]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None
                ) -> tuple[int, bytearray]:
        """(status, body) of one request; a JSON ``body`` when given (POST: always)."""
        if self.closed:
            raise ConnectionError("the connection is closed")
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.authority}\r\n"
                f"Accept-Encoding: identity\r\n")
        if body or method == "POST":
            body = body or b""
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._answered = self.have > self.pos
        try:
            self.tls.write(head.encode() + b"\r\n" + (body or b""))
            self._flush()
            status, fields, keep = self._read_head()
            answer = self._read_body(status, fields)
        except BaseException:
            self.close()
            raise
        if not keep or self.closed:
            self.close()
        return status, answer

    def _read_head(self) -> tuple[int, dict[str, str], bool]:
        """The status, the header fields (lower-case names) and whether the connection
        stays open; interim (1xx) answers are skipped."""
        while True:
            # the whole head at once (one search, one decode): a small answer's head costs
            # the load generator of `bench api` as much as its body
            while (end := self.head.find(b"\r\n\r\n", self.pos, self.have)) < 0:
                self._more()
            line, *lines = bytes(self.head[self.pos:end]).decode("latin-1").split("\r\n")
            self.pos = end + 4
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or \
                    not (len(parts[1]) == 3 and _decimal(parts[1])):
                raise MalformedResponse(f"not an HTTP/1.x status line: {line[:80]!r}")
            status = int(parts[1])
            fields: dict[str, str] = {}
            for line in lines:
                name, sep, value = line.partition(":")
                if not sep:
                    raise MalformedResponse(f"not a header field: {line[:80]!r}")
                name = name.strip().lower()
                fields[name] = f"{fields[name]}, {value.strip()}" if name in fields \
                    else value.strip()
            if 100 <= status < 200:
                continue
            conn = fields.get("connection", "").lower()
            keep = "close" not in conn and (parts[0] != "HTTP/1.0" or "keep-alive" in conn)
            return status, fields, keep

    def _read_body(self, status: int, fields: dict[str, str]) -> bytearray:
        coding = fields.get("transfer-encoding", "identity").lower()
        if coding != "identity":
            if coding.rsplit(",", 1)[-1].strip() != "chunked":
                raise MalformedResponse(f"transfer-encoding {coding[:40]!r} is not read here")
            return self._read_chunked()
        if "content-length" in fields:
            text = fields["content-length"]
            if not (len(text) <= 12 and _decimal(text)) or int(text) > MAX_ANSWER:
                raise MalformedResponse(f"content-length {text[:40]!r}")
            body = bytearray(int(text))
            self._exact(memoryview(body))
            return body
        if status in (204, 304):
            return bytearray()
        return self._read_to_close()

    def _read_chunked(self) -> bytearray:
        body = bytearray()
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise MalformedResponse(f"chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailer fields, ignored
                    pass
                return body
            if size < 0 or len(body) + size > MAX_ANSWER:
                raise MalformedResponse(f"chunked answer larger than {MAX_ANSWER} bytes")
            start = len(body)
            body += bytes(size)
            self._exact(memoryview(body)[start:])
            if self._line():
                raise MalformedResponse("no line end after a chunk")

    def _read_to_close(self) -> bytearray:
        body = bytearray(self.head[self.pos:self.have])
        self.pos = self.have = 0
        buf = bytearray(1 << 16)
        while n := self._read_into(memoryview(buf)):
            body += buf[:n]
            if len(body) > MAX_ANSWER:
                raise MalformedResponse(f"answer larger than {MAX_ANSWER} bytes")
        self.close()
        return body


def reuse_or_open(conn: Conn | None, host: str, port: int, ctx: ssl.SSLContext) -> Conn:
    """``conn`` if the KME has not closed it while idle (its keep-alive ran out), else a
    new connection (``conn`` closed): for an SAE that keeps its own connection."""
    if conn is not None and conn.idle_closed():
        conn.close()
        conn = None
    return conn if conn is not None else Conn(host, port, ctx)


class KmeClient:
    """An SAE's calls of one KME at ``url`` (https://host[:port][/path]), with ``ctx``
    (``tls_context``); ``timeout`` bounds the connect and each wait for bytes."""

    def __init__(self, url: str, ctx: ssl.SSLContext, timeout: float = 60.0):
        u = urlsplit(url)
        self.url = url
        self.host = u.hostname or ""
        self.port = u.port or 443
        self.prefix = u.path.rstrip("/")
        self.ctx = ctx
        self.timeout = timeout
        self._conn: Conn | None = None
        self.retried = False  # the last call's first try got no answer
        self.reopened = False  # the last call found the KME had closed the idle connection

    def call(self, call: etsi.Call) -> tuple[int, bytes]:
        """(status, body) of one request; NoAnswer when no whole answer came.

        A kept-alive connection the KME closed while idle fails at once: that case is
        tried once more on a new connection (a KME that died fails again there).
        """
        self.reopened = self._conn is not None and self._conn.idle_closed()
        if self.reopened:
            self.close()  # closed while idle, and seen before asking: a plain new call
        for attempt in (1, 2):
            self.retried = attempt == 2
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = Conn(self.host, self.port, self.ctx, self.timeout)
                status, body = self._conn.request(call.method, self.prefix + call.path,
                                                  call.body)
                if self._conn.closed:
                    self._conn = None
                return status, body
            except (OSError, ValueError) as e:  # ValueError: no answer we could read
                begun = self._conn is not None and self._conn._answered
                self.close()
                # Idle-closed: the request never reached a KME that would answer it. Not
                # when part of an answer came: the KME acted on it (an enc_keys took its
                # keys), and asking again would take (and waste) as many again.
                stale = isinstance(e, (ConnectionResetError, BrokenPipeError)) and not begun
                if not (reused and stale and attempt == 1):
                    raise NoAnswer(f"{type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    def status(self, slave: str) -> dict:
        """Get status; raises NoAnswer, or etsi's NotEnoughKey, Refused, BadAnswer."""
        return etsi.parse_status(*self.call(etsi.status_call(slave)))

    def enc_keys(self, slave: str, number: int, size: int,
                 additional_slave_sae_ids: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
        """Get key: ``number`` (key_ID, key) pairs of ``size`` bits, checked whole."""
        status, body = self.call(etsi.enc_keys_call(slave, number, size,
                                                    additional_slave_sae_ids))
        return etsi.parse_enc_keys(status, body, number, size // 8)

    def dec_keys(self, master: str, key_ids: tuple[str, ...], size: int) -> list[bytes]:
        """Get key with key IDs: the keys of ``size`` bits, in the order of ``key_ids``."""
        status, body = self.call(etsi.dec_keys_call(master, key_ids))
        return etsi.parse_dec_keys(status, body, key_ids, size // 8)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
