"""The SAE's HTTPS client (api/client.py) against a scripted TLS server on loopback: the
answer framings it reads, the one retry on a connection the KME closed while idle (and
none on an answer cut off), malformed answers, and the key container of api.etsi read
back through it."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from pathlib import Path

import pytest

from api.client import KmeClient, NoAnswer, TlsFilesError, client_context, tls_context
from api.etsi import BadAnswer, key_container
from api.pki import init_pki
from api.server import server_context
from control.core.config import load_topology

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLOSE = b""  # close the connection without answering


def ok(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


class Kme:
    """Answers each request with the next of ``script`` (over all connections); records
    what arrived. A tuple (bytes, "close") answers then closes the connection."""

    def __init__(self, ctx: ssl.SSLContext, script: list):
        self.ctx, self.script = ctx, list(script)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.script:
            try:
                raw, _ = self.listener.accept()
            except OSError:  # closed with answers left unasked: the test is over
                return
            self.connections += 1
            raw.settimeout(10)
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                self._connection(s)

    def _connection(self, s: ssl.SSLSocket) -> None:
        buf = b""
        while self.script:
            while b"\r\n\r\n" not in buf:
                data = s.recv(65536)
                if not data:
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            fields = {k.strip().lower(): v.strip()
                      for k, v in (line.split(":", 1) for line in lines[1:])}
            n = int(fields.get("content-length", 0))
            while len(buf) < n:
                buf += s.recv(65536)
            self.requests.append((lines[0], fields, buf[:n]))
            buf = buf[n:]
            action = self.script.pop(0)
            answer, then = action if isinstance(action, tuple) else (action, "")
            if answer == CLOSE:
                return
            s.sendall(answer)
            if then == "close":
                return
            if then == "reset":  # cut off with a TCP reset, as a dying peer's kernel does
                time.sleep(0.2)  # (the bytes sent first reach the client)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes an accept() in _serve: the thread ends
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(15)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(root, load_topology(EXAMPLES / "triangle.toml"))
    return root


def client(pki: Path, kme: Kme, path: str = "") -> KmeClient:
    return KmeClient(f"https://127.0.0.1:{kme.port}{path}", client_context(str(pki), "SAE-A"),
                     timeout=5)


def serve(pki: Path, script: list) -> Kme:
    return Kme(server_context(pki, "A"), script)


def test_answers_by_length_chunked_and_up_to_the_close(pki):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;x=1\r\n{\"a\"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\nTrailer: y\r\n\r\n")
    to_close = (b"HTTP/1.0 200 OK\r\n\r\n{\"b\": 2}", "close")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"c": 3}')
    kme = serve(pki, [ok(b'{"key_size": 256}'), chunked, to_close, interim])
    c = client(pki, kme, "/qkd/")
    try:
        assert c.status("SAE-B") == {"key_size": 256}
        assert c.status("SAE-B") == {"a": 1}
        assert c.status("SAE-B") == {"b": 2}   # the connection then closed: a new one
        assert c.status("SAE-B") == {"c": 3}
    finally:
        c.close()
        kme.close()
    assert kme.connections == 2 and not c.retried
    line, fields, body = kme.requests[0]
    assert line == "GET /qkd/api/v1/keys/SAE-B/status HTTP/1.1" and body == b""
    assert fields["host"] == f"127.0.0.1:{kme.port}"
    assert fields["accept-encoding"] == "identity"


def test_a_key_container_over_https_from_the_servers_encoder(pki):
    ids = [str(uuid.uuid4()) for _ in range(3)]
    keys = [os.urandom(40_000) for _ in ids]  # large keys: the encoder's pieces
    kme = serve(pki, [ok(key_container(ids, keys)), ok(key_container(ids[::-1], keys[::-1])),
                      ok(key_container(ids[:1], keys[:1]))])
    c = client(pki, kme)
    try:
        assert c.enc_keys("SAE-B", 3, 320_000) == list(zip(ids, keys, strict=True))
        assert c.dec_keys("SAE-B", tuple(ids), 320_000) == keys
        with pytest.raises(BadAnswer, match="1 keys, asked for 2"):
            c.enc_keys("SAE-B", 2, 320_000)
    finally:
        c.close()
        kme.close()
    line, fields, body = kme.requests[0]
    assert line == "POST /api/v1/keys/SAE-B/enc_keys HTTP/1.1"
    assert fields["content-type"] == "application/json"
    assert body == b'{"number": 3, "size": 320000}'
    assert kme.requests[1][2].startswith(b'{"key_IDs": [{"key_ID": "')


def test_a_connection_closed_while_idle_is_tried_once_more(pki):
    kme = serve(pki, [ok(b"{}"), CLOSE, ok(b'{"again": 1}')])
    c = client(pki, kme)
    try:
        assert c.status("SAE-B") == {}
        assert c.status("SAE-B") == {"again": 1}
        assert c.retried  # the first try may have reached the KME: the caller knows
    finally:
        c.close()
        kme.close()
    assert kme.connections == 2 and len(kme.requests) == 3


def test_a_connection_the_kme_closed_while_idle_is_replaced_before_the_call(pki):
    """The KME closes a kept-alive connection (its keep-alive timeout): the next call
    sees that first and goes out on a new one, once, and is no retry (a retry means the
    first try may have reached the KME: the ETSI source then counts keys as maybe gone)."""
    kme = serve(pki, [(ok(b"{}"), "close"), ok(b'{"again": 1}')])
    c = client(pki, kme)
    try:
        assert c.status("SAE-B") == {}
        deadline = time.monotonic() + 10
        while not select.select([c._conn.sock], [], [], 0)[0]:  # the close has arrived
            assert time.monotonic() < deadline, "the KME never closed the connection"
            time.sleep(0.01)
        assert c.status("SAE-B") == {"again": 1}
        assert not c.retried and c.reopened
    finally:
        c.close()
        kme.close()
    assert kme.connections == 2 and len(kme.requests) == 2


def test_no_retry_on_a_new_connection_or_an_answer_cut_off(pki):
    kme = serve(pki, [CLOSE, (ok(b'{"keys": []}')[:-3], "close")])
    c = client(pki, kme)
    try:
        with pytest.raises(NoAnswer, match="RemoteClosed: .* without an answer"):
            c.status("SAE-B")
        with pytest.raises(NoAnswer, match="closed the connection mid-answer"):
            c.status("SAE-B")
        assert not c.retried
    finally:
        c.close()
        kme.close()
    assert kme.connections == 2


def test_no_retry_when_an_answer_had_begun_before_a_reset(pki):
    """A kept-alive connection reset mid-answer: the KME acted on the request (an
    enc_keys took its keys), so asking again would take as many again, wasted."""
    kme = serve(pki, [ok(b"{}"), (ok(b'{"keys": []}')[:-3], "reset"), ok(b"{}")])
    c = client(pki, kme)
    try:
        assert c.status("SAE-B") == {}
        with pytest.raises(NoAnswer):
            c.status("SAE-B")
        assert not c.retried
    finally:
        c.close()
        kme.close()
    assert len(kme.requests) == 2  # the second was not sent again


@pytest.mark.parametrize("answer, words", [
    (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "not a header field"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "content-length '-1'"),
    ("HTTP/1.1 200 OK\r\nContent-Length: \u00b9\r\n\r\n".encode("latin-1"),
     "content-length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "content-length"),
    ("HTTP/1.1 2\u00b20 OK\r\n\r\n".encode("latin-1"), "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer-encoding 'gzip'"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", "longer than"),
])
def test_a_malformed_answer_is_no_answer(pki, answer, words):
    kme = serve(pki, [answer])
    c = client(pki, kme)
    try:
        with pytest.raises(NoAnswer, match=f"MalformedResponse: .*{words}"):
            c.status("SAE-B")
    finally:
        c.close()
        kme.close()


def test_tls_files_that_do_not_load_are_named(pki, tmp_path):
    with pytest.raises(TlsFilesError, match=f"cannot load the CA file {tmp_path}/no.crt"):
        tls_context(tmp_path / "no.crt", pki / "saes/SAE-A.crt", pki / "saes/SAE-A.key")
    with pytest.raises(TlsFilesError, match="cannot load the client certificate .*SAE-A.crt "
                                            "with key .*SAE-B.key"):
        tls_context(pki / "ca.crt", pki / "saes/SAE-A.crt", pki / "saes/SAE-B.key")
    assert tls_context(pki / "ca.crt", pki / "saes/SAE-A.crt", pki / "saes/SAE-A.key"
                       ).minimum_version == ssl.TLSVersion.TLSv1_2
