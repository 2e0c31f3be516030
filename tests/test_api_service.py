"""The key API end to end (issue 4/6): two nodes in namespaces with their OTP tunnel, global
key managers, RocksDB stores and Sanic services over HTTPS with mutual TLS; SAEs call
from inside the nodes' namespaces with certificates from `qkdctl pki init`'s layout."""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import itertools
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from api.pki import PkiLayout
from api.server import SILENT_S
from control.core import paths
from control.core.procs import process_identity
from control.gkm import take
from control.gkm.client import GkmClient, split_keys
from control.gkm.manager import PAUSE_FLAG
from control.gkm.manager import PUBLISH_S as GKM_PUBLISH_S
from control.gkm.store import StoreError
from control.gkm.store_rules import HANDED_KEEP_S
from control.tools import emulation
from tests.nsutil import QKDCTL, module_pid, wait_until
from tests.test_tunnel import make_net

pytestmark = pytest.mark.netns
MIB = 1 << 20
BASE = "/api/v1/keys"
# No keys reserved ahead of demand here: these tests pin the exact keys a request takes
# and the messages it sends (keys reserved ahead: tests/test_api_ahead.py).
GKM = """block_size = "1MiB"
low_watermark = "24MiB"
high_watermark = "32MiB"
window = "8MiB"
pairs = [["A", "B"]]
reserve_ahead_s = 0"""
EXTRA = """
[api]
workers = 2
graceful_shutdown_s = 8
[[saes]]
id = "a1"
node = "A"
[[saes]]
id = "a2"
node = "A"
[[saes]]
id = "b1"
node = "B"
[[saes]]
id = "b2"
node = "B"
"""


class Net:
    """The network of this module, and SAEs calling from inside its namespaces."""

    def __init__(self, topo):
        self.topo = topo
        self.prefix = topo.prefix
        self.pki = PkiLayout(topo.api.pki)
        self.port = topo.ports.api
        self.took = False  # the last request took keys (the fuzz test's bookkeeping)
        self.pools = {n: ThreadPoolExecutor(64, initializer=self._enter,
                                            initargs=(paths.netns_name(self.prefix, n),))
                      for n in ("A", "B")}

    @staticmethod
    def _enter(ns: str) -> None:
        from pyroute2 import netns

        netns.setns(ns)  # this thread only: its sockets live in the node's namespace

    def ctx(self, sae: str | None) -> ssl.SSLContext:
        c = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        if sae is not None:
            crt, key = self.pki.sae(sae)
            c.load_cert_chain(crt, key)
        return c

    def host(self, node: str) -> str:
        return str(self.topo.node(node).address)

    def call(self, sae: str | None, method: str, path: str, body: bytes | None = None,
             node: str | None = None, ctx: ssl.SSLContext | None = None):
        """(status, parsed JSON body) of one request by ``sae`` to its node's KME."""
        node = node or (sae or "a")[0].upper()
        ctx = ctx or self.ctx(sae)

        def go():
            c = http.client.HTTPSConnection(self.host(node), self.port, context=ctx,
                                            timeout=30)
            try:
                c.request(method, path, body=body)
                r = c.getresponse()
                return r.status, r.getheader("Content-Type"), r.read()
            finally:
                c.close()

        status, ctype, data = self.pools[node].submit(go).result(60)
        assert ctype == "application/json", (status, ctype, data[:200])
        return status, json.loads(data)

    def call_settled(self, sae: str, method: str, path: str, body: bytes | None = None):
        """``call``, asked again while the answer is 503 for keys whose delivery is not
        settled yet: a key fetched a moment ago stays "on its way" until B's key API sees
        the SAE's side acknowledge the answer's bytes, which on a busy machine can come
        after the next request (so "once only" is asserted on the settled answer)."""
        seen: list = []

        def settled() -> bool:
            seen.append(self.call(sae, method, path, body))
            return seen[-1][0] != 503 or "on its way" not in seen[-1][1].get("message", "")

        wait_until(settled, 30, lambda: f"the delivery to be settled: {seen[-1]}")
        return seen[-1]
    def gkm(self, node: str) -> dict:
        c = GkmClient(self.prefix, node)
        try:
            return c.summary()
        finally:
            c.close()

    def consumed(self) -> tuple:
        """What a request can consume: keys taken at A, reservations and deliveries at B."""
        a, b = self.gkm("A")["peers"]["B"]["enc"], self.gkm("B")["peers"]["A"]["dec"]
        return (a["taken_keys"], a["cursor"], b["reservations_applied"], b["delivered_keys"])

    def still_consumed(self) -> tuple:
        """``consumed`` once it stays the same across two of the key managers' publish
        periods: after keys were taken, B publishes the reservations it applied (and the
        ones reserved ahead of the demand they showed) a little later."""
        last = self.consumed()

        def same() -> tuple | None:
            nonlocal last
            time.sleep(2 * GKM_PUBLISH_S)
            now = self.consumed()
            if now == last:
                return now
            last = now
            return None
        return wait_until(same, 30, "the key managers' counts to keep still")

    def settled_consumed(self) -> tuple:
        """``consumed`` once B has no key handed out and unconfirmed: a key fetched just
        before is counted delivered only when the SAE's side has the answer's bytes,
        which on a busy machine can come after the next request."""
        wait_until(lambda: not self.gkm("B")["peers"]["A"]["dec"]["handed_unconfirmed"],
                   HANDED_KEEP_S + 30, "the last delivery to be confirmed (or, judged lost, "
                   "dropped)")
        return self.consumed()

    def stock(self, at_least: int = 24 * MIB) -> int:
        """Restock A's store for B to at least ``at_least``, then pause restocking so that
        counts stay still; returns the usable bytes."""
        flag = paths.node_dir(self.prefix, "A") / PAUSE_FLAG
        flag.unlink(missing_ok=True)
        wait_until(lambda: self.gkm("A")["peers"]["B"]["enc"]["usable"] >= at_least, 60,
                   "A's store for B")
        flag.touch()
        time.sleep(1.0)  # seen within the key manager's publish period
        wait_until(lambda: not self.gkm("A")["peers"]["B"]["enc"]["pending"], 30,
                   "no block in flight")
        return self.gkm("A")["peers"]["B"]["enc"]["usable"]

    def close(self) -> None:
        for p in self.pools.values():
            p.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def running_net(tmp_path_factory, gkm: str = GKM) -> Iterator[Net]:
    """This module's network with ``gkm`` as its [gkm] section, up and stocked; down at
    the end, whatever happened."""
    prefix = "t" + uuid.uuid4().hex[:7]
    try:
        topo, _ = make_net(tmp_path_factory.mktemp("api"), prefix, two=True, gkm=gkm,
                           key_rate=2000, extra=EXTRA)
        n = Net(topo)
        wait_until(lambda: _answers(n), 60, "both key APIs")
        n.stock()
        yield n
        n.close()
    finally:
        emulation.net_down(prefix)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with running_net(tmp_path_factory) as n:
        yield n


def _answers(n: Net) -> bool:
    try:
        return n.call("a1", "GET", f"{BASE}/b1/status")[0] == 200 and \
            n.call("b1", "GET", f"{BASE}/a1/status")[0] == 200
    except (OSError, AssertionError):
        return False


SEEN: list[bytes] = []  # every key this module was handed, for the log check at the end


def _keys(doc: dict) -> list[tuple[str, bytes]]:
    out = [(k["key_ID"], base64.b64decode(k["key"], validate=True)) for k in doc["keys"]]
    SEEN.extend(k for _, k in out)
    return out


# ---- the happy paths ------------------------------------------------------------------------

def test_status_reports_the_real_store(net):
    usable = net.stock()
    status, doc = net.call("a1", "GET", f"{BASE}/b1/status")
    assert status == 200
    assert doc == {"source_KME_ID": "A", "target_KME_ID": "B", "master_SAE_ID": "a1",
                   "slave_SAE_ID": "b1", "key_size": 256, "stored_key_count": usable // 32,
                   "max_key_count": 32 * MIB // 32, "max_key_per_request": 1024,
                   "max_key_size": 8 * MIB, "min_key_size": 8, "max_SAE_ID_count": 1}
    net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=3&size=1024")
    assert net.call("a1", "GET", f"{BASE}/b2/status")[1]["stored_key_count"] == \
        (usable - 3 * 128) // 32


@pytest.mark.parametrize("form", ["GET", "POST"])
def test_the_slave_gets_the_masters_keys_byte_for_byte_once(net, form):
    net.stock()
    sizes = [8, 256, 8 * 1000, 8 * 4096, 8 * 65536, 8 * MIB]
    issued: list[tuple[str, bytes]] = []
    for bits in sizes:
        number = 1 if bits == 8 * MIB else 3
        if form == "GET":
            status, doc = net.call("a1", "GET",
                                   f"{BASE}/b1/enc_keys?number={number}&size={bits}")
        else:
            status, doc = net.call("a1", "POST", f"{BASE}/b1/enc_keys", json.dumps(
                {"number": number, "size": bits}).encode())
        assert status == 200, doc
        keys = _keys(doc)
        assert len(keys) == number and all(len(k) == bits // 8 for _, k in keys)
        issued += keys
    assert len({k for k, _ in issued}) == len(issued)
    # The slave fetches them at B: one by one (GET) or all at once (POST).
    if form == "GET":
        got = []
        for kid, _ in issued:
            status, doc = net.call("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={kid}")
            assert status == 200, doc
            got += _keys(doc)
    else:
        status, doc = net.call("b1", "POST", f"{BASE}/a1/dec_keys", json.dumps(
            {"key_IDs": [{"key_ID": k} for k, _ in issued]}).encode())
        assert status == 200, doc
        got = _keys(doc)
    assert got == issued
    # Once only (settled: a 503 "on its way" came once in a full run of the suite).
    status, doc = net.call_settled("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={issued[0][0]}")
    assert status == 400, doc
    assert doc["message"] == "one or more keys specified are not found on KME"


def test_default_number_and_size(net):
    net.stock()
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys")
    assert status == 200 and [len(k) for _, k in _keys(doc)] == [32]
    status, doc = net.call("a1", "POST", f"{BASE}/b1/enc_keys", b"{}")
    assert status == 200 and [len(k) for _, k in _keys(doc)] == [32]


def test_the_slave_and_each_additional_slave_fetch_the_same_keys_once(net):
    net.stock()
    status, doc = net.call("a1", "POST", f"{BASE}/b1/enc_keys", json.dumps(
        {"number": 2, "size": 256, "additional_slave_SAE_IDs": ["b2"],
         "extension_optional": [{"ignored": True}]}).encode())
    assert status == 200, doc
    (k0, v0), (k1, v1) = _keys(doc)
    assert net.call("b2", "POST", f"{BASE}/a1/dec_keys", json.dumps(
        {"key_IDs": [{"key_ID": k0}]}).encode()) == (200, {"keys": [
            {"key_ID": k0, "key": base64.b64encode(v0).decode()}]})
    assert _keys(net.call("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={k1}")[1]) == [(k1, v1)]
    # The other listed SAE gets the same keys too, whoever came first ...
    assert _keys(net.call("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={k0}")[1]) == [(k0, v0)]
    status, doc = net.call("b2", "POST", f"{BASE}/a1/dec_keys", json.dumps(
        {"key_IDs": [{"key_ID": k1}]}).encode())
    assert status == 200 and _keys(doc) == [(k1, v1)]
    # ... and each of them once.
    for sae, kid in (("b1", k0), ("b1", k1), ("b2", k0), ("b2", k1)):
        status, doc = net.call_settled(sae, "GET", f"{BASE}/a1/dec_keys?key_ID={kid}")
        assert status == 400, (sae, doc)
        assert doc["message"] == "one or more keys specified are not found on KME"
    # Status says how many additional slaves a request can name: the SAEs at the
    # slave's node other than the slave (b2 for b1), not merely the configured 8.
    assert net.call("a1", "GET", f"{BASE}/b2/status")[1]["max_SAE_ID_count"] == 1


# ---- refusals -------------------------------------------------------------------------------

def _client_ctx(tmp: Path, pki: PkiLayout, cn: str, own_ca: bool) -> ssl.SSLContext:
    """A client-auth certificate with subject CN ``cn``, signed by the network's CA (an SAE
    it no longer lists, say) or by a CA of its own."""
    key = ec.generate_private_key(ec.SECP256R1())
    if own_ca:
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
        issuer = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    else:
        ca_key, issuer = key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    (tmp / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{cn}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    c = ssl.create_default_context(cafile=str(pki.ca_cert))
    c.load_cert_chain(tmp / f"{cn}.crt", tmp / f"{cn}.key")
    return c


def test_401_for_no_unknown_or_misplaced_certificate(net, tmp_path):
    net.stock()
    before = net.consumed()
    for path in (f"{BASE}/b1/status", f"{BASE}/b1/enc_keys", "/nothing/here"):
        status, doc = net.call(None, "GET", path, node="A")
        assert status == 401 and "client certificate is required" in doc["message"]
    # A certificate of this CA whose CN is no SAE of the topology, and an SAE at B
    # calling A's KME.
    ctx = _client_ctx(tmp_path, net.pki, "ghost", own_ca=True)
    status, doc = net.call(None, "GET", f"{BASE}/b1/enc_keys", node="A", ctx=ctx)
    assert status == 401 and "not an SAE of this network" in doc["message"]
    status, doc = net.call("b1", "GET", f"{BASE}/b2/enc_keys", node="A")
    assert status == 401 and "attached to node B" in doc["message"]
    # A certificate of another CA, or a server's certificate, does not even complete
    # the TLS handshake (TLS 1.3: the client learns it when it reads).
    crt, key = net.pki.node("B")
    server_cert = net.ctx(None)
    server_cert.load_cert_chain(crt, key)
    for ctx in (_client_ctx(tmp_path, net.pki, "a1", own_ca=False), server_cert):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            net.call(None, "GET", f"{BASE}/b1/status", node="A", ctx=ctx)
    assert net.consumed() == before


def _gone(s: socket.socket) -> bool:
    """Whether the server has closed connection ``s`` (plain or TLS); what it sent first
    (an answer, a TLS 1.3 session ticket) is read and dropped."""
    while select.select([s], [], [], 0)[0]:
        try:
            if not s.recv(1 << 16):
                return True
        except (ssl.SSLWantReadError, BlockingIOError):
            return False  # a TLS record that carried no data (a session ticket)
        except OSError:
            return True
    return False


def _silent_connections(host: str, port: int, ctx: ssl.SSLContext, n: int,
                        opened: threading.Event) -> float | None:
    """Open ``n`` connections of each kind that then go silent, or nearly: no
    ClientHello; a TLS handshake and no request; a POST head that announces a body and
    sends none, also one asking for a websocket (Sanic stops its timeouts for those); a
    request head, and a body, sent one byte every 2 s. Seconds from then until the server
    has closed them all (None: not in 60 s)."""
    sources = itertools.cycle(f"127.0.0.{i}" for i in range(10, 14))

    def tcp() -> socket.socket:  # from four addresses: under the per-address cap
        return socket.create_connection((host, port), timeout=10,
                                        source_address=(next(sources), 0))

    def tls() -> ssl.SSLSocket:
        return ctx.wrap_socket(tcp(), server_hostname=host)

    post = (f"POST {BASE}/b1/enc_keys HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()
    upgrade = post.replace(b"\r\n\r\n", b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    socks: list[socket.socket] = []
    trickling: list[socket.socket] = []
    try:
        socks += [tcp() for _ in range(n)]
        socks += [tls() for _ in range(n)]
        for first in (post, upgrade, post, f"GET {BASE}/b1/status HTTP/1.1\r\nX-".encode()):
            for _ in range(n):
                s = tls()
                s.sendall(first)
                socks.append(s)
                if len(socks) > 4 * n:
                    trickling.append(s)
        t0 = time.monotonic()
        opened.set()
        for s in socks:
            s.setblocking(False)
        next_byte = t0 + 2
        while time.monotonic() - t0 < 60:
            if all(_gone(s) for s in socks):
                return time.monotonic() - t0
            if time.monotonic() >= next_byte:
                next_byte += 2
                for s in trickling:
                    with contextlib.suppress(OSError):
                        s.send(b"1")
            time.sleep(0.2)
        return None
    finally:
        opened.set()
        for s in socks:
            s.close()


def test_a_silent_connection_is_closed_within_15_s_in_any_phase(net):
    """A connection that goes silent, before its TLS handshake, before its first request
    or in the middle of one (a POST whose body never comes), holds one of a worker's
    descriptors, and so does one that sends a byte of its request now and then: anyone
    who reaches the node address can open them. Each is closed once silent for SILENT_S,
    or once its request has been on its way SILENT_S (Sanic looks every SILENT_S / 2);
    they were held 60 s (asyncio's handshake timeout), 75 s (Sanic's keep-alive timeout)
    and, the last three kinds, for good."""
    opened = threading.Event()
    job = net.pools["A"].submit(_silent_connections, net.host("A"), net.port, net.ctx("a1"),
                                20, opened)
    assert opened.wait(60)
    assert net.call("a1", "GET", f"{BASE}/b1/status")[0] == 200  # serving meanwhile
    took = job.result(120)
    assert took is not None, "silent or trickling connections still open after 60 s"
    assert took < 3 * SILENT_S, f"closed after {took:.0f} s"


def _status_on(host: str, port: int, ctx: ssl.SSLContext, source: str,
               ) -> tuple[http.client.HTTPSConnection | None, tuple | None]:
    """A connection from ``source`` that asked for a status: kept open if it got its 200;
    else closed, beside what it got instead (status, Connection header, JSON body; None
    if no answer)."""
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30,
                                    source_address=(source, 0))
    got = None
    try:
        c.request("GET", f"{BASE}/b1/status")
        r = c.getresponse()
        body = r.read()
        if r.status == 200:
            return c, None
        got = (r.status, r.getheader("connection"), json.loads(body))
    except (OSError, http.client.HTTPException, ValueError):
        pass
    c.close()
    return None, got


def _flood(host: str, port: int, ctx: ssl.SSLContext, source: str, n: int,
           ) -> tuple[list[http.client.HTTPSConnection], list, float]:
    """``n`` connections from ``source``, each asking for a status: those answered, kept
    open; what the others got; and the seconds it took."""
    t0 = time.monotonic()
    asked = [_status_on(host, port, ctx, source) for _ in range(n)]
    return ([c for c, _ in asked if c], [got for c, got in asked if not c],
            time.monotonic() - t0)


def test_one_address_holds_at_most_its_cap_of_connections_and_the_others_are_served(net):
    """Each connection holds one of a worker's descriptors, and an SAE's stays open as
    long as it asks something every SILENT_S: an SAE holding max_connections_per_address
    from one address at a worker gets its next ones there answered 503, saying why, and
    closed, counted in the API's status, and gets them back as its connections close.
    Another address is served meanwhile."""
    cap, workers = net.topo.api.max_connections_per_address, net.topo.api.workers
    host, ctx = net.host("A"), net.ctx("a1")
    refused_before = _api_file(net.prefix, "A")["refused_connections"]
    held, refused, took = net.pools["A"].submit(_flood, host, net.port, ctx, "127.0.0.2",
                                                3 * cap).result(300)
    try:
        # Held connections go idle, and one closed after SILENT_S would free its place.
        assert took < SILENT_S, f"{3 * cap} connections took {took:.0f} s to open"
        assert cap <= len(held) <= workers * cap, len(held)
        assert len(refused) == 3 * cap - len(held)
        for got in refused:  # each told why, and closed (not reset unanswered)
            assert got is not None, "a connection over the cap closed without an answer"
            status, connection, body = got
            assert (status, connection) == (503, "close"), got
            assert "max_connections_per_address" in body["message"], body
        assert net.call("a1", "GET", f"{BASE}/b1/status")[0] == 200  # another address
        wait_until(lambda: _api_file(net.prefix, "A")["refused_connections"]
                   == refused_before + 3 * cap - len(held), 30,
                   lambda: f"refusals counted: {_api_file(net.prefix, 'A')}")
        assert "max_connections_per_address" in _node_log(net.prefix, "A")
    finally:
        for c in held:
            c.close()

    def again() -> bool:  # cap at once, wherever they land: each worker counts none
        held, _, _ = net.pools["A"].submit(_flood, host, net.port, ctx, "127.0.0.2",
                                           cap).result(300)
        for c in held:
            c.close()
        return len(held) == cap
    wait_until(again, 60, "the address holding its cap again once its others closed")


def _probe_lifetimes(host: str, port: int, ctx: ssl.SSLContext, source: str,
                     ) -> list[float | None]:
    """Four connections from ``source`` with ``ctx``, silent 12 s, then a POST head
    whose body comes a byte every 2 s: seconds from their handshake until the server
    closed each (None: open after 60 s)."""
    probes = [ctx.wrap_socket(socket.create_connection((host, port), timeout=10,
                                                       source_address=(source, 0)),
                              server_hostname=host) for _ in range(4)]
    t0 = time.monotonic()
    for s in probes:
        s.setblocking(False)
    closed: list[float | None] = [None] * len(probes)
    head = (f"POST {BASE}/b1/enc_keys HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
            "application/json\r\nContent-Length: 100\r\n\r\n").encode()
    sent_head, next_byte = False, t0 + 12
    while time.monotonic() - t0 < 60 and None in closed:
        for i, s in enumerate(probes):
            if closed[i] is None and _gone(s):
                closed[i] = time.monotonic() - t0
        if time.monotonic() >= next_byte:
            next_byte += 2
            for i, s in enumerate(probes):
                if closed[i] is None:
                    with contextlib.suppress(OSError):
                        s.send(b"{" if sent_head else head)
            sent_head = True
        time.sleep(0.1)
    for s in probes:
        s.close()
    return closed


def _alive(c: http.client.HTTPSConnection) -> bool:
    """Whether a kept-alive connection still answers a status (its idle time restarts)."""
    try:
        c.request("GET", f"{BASE}/b1/status")
        r = c.getresponse()
        r.read()
        return r.status == 200
    except (OSError, http.client.HTTPException):
        c.close()
        return False


def _over_cap_lifetimes(host: str, port: int, ctx: ssl.SSLContext, source: str,
                        cap: int, workers: int) -> list[float | None]:
    """Every worker made to hold ``source``'s cap (checked by a status on each held
    connection: on a slow machine the first ones could have gone idle meanwhile), then
    the probes of _probe_lifetimes from the same address."""
    held: list[http.client.HTTPSConnection] = []
    try:
        deadline = time.monotonic() + 180
        while True:
            while len(held) < workers * cap:  # each worker's share, wherever they land
                assert time.monotonic() < deadline, f"{len(held)} held of {workers * cap}"
                c, _ = _status_on(host, port, ctx, source)
                if c:
                    held.append(c)
            held = [c for c in held if _alive(c)]
            if len(held) == workers * cap:
                return _probe_lifetimes(host, port, ctx, source)
    finally:
        for c in held:
            c.close()


def test_a_connection_over_the_cap_is_closed_15_s_after_it_was_made_whatever_it_sends(net):
    """One over its address's cap is not counted, so it must not stay: closed SILENT_S
    after it was made (looked at every SILENT_S / 2), whatever it sends. Silent 12 s and
    then a body trickling in, an admitted connection stays 15-30 s after its head came
    (27 s at the least); one over the cap stayed as long."""
    cap, workers = net.topo.api.max_connections_per_address, net.topo.api.workers
    lifetimes = net.pools["A"].submit(_over_cap_lifetimes, net.host("A"), net.port,
                                      net.ctx("a1"), "127.0.0.4", cap, workers).result(300)
    assert None not in lifetimes, lifetimes
    assert max(lifetimes) < 12 + SILENT_S - 1, lifetimes  # before an admitted one could go


def test_a_connection_that_is_no_saes_is_closed_15_s_after_it_was_made_whatever_it_sends(
        net):
    """Connections without a certificate, or with another node's SAE's, are not counted
    in any SAE's cap; so they must not stay either: closed SILENT_S after they were made,
    where an SAE's stays 27 s at the least when silent 12 s and then trickling a body."""
    for ctx, source in ((net.ctx(None), "127.0.0.7"), (net.ctx("b1"), "127.0.0.8")):
        lifetimes = net.pools["A"].submit(_probe_lifetimes, net.host("A"), net.port, ctx,
                                          source).result(300)
        assert None not in lifetimes, lifetimes
        assert max(lifetimes) < 12 + SILENT_S - 1, lifetimes


def _crowded_out(host: str, port: int, crowd: list[ssl.SSLContext], n: int,
                 ctx: ssl.SSLContext, source: str) -> list[int | None]:
    """``n`` connections from ``source`` with each context of ``crowd`` (None: no
    certificate), made and left silent; then eight status requests from the same address
    with ``ctx``: what each got (None: no answer)."""
    held = [c.wrap_socket(socket.create_connection((host, port), timeout=10,
                                                   source_address=(source, 0)),
                          server_hostname=host) for c in crowd for _ in range(n)]
    try:
        got = [_status_on(host, port, ctx, source) for _ in range(8)]
        for c, _ in got:
            if c:
                c.close()
        return [200 if c else (answer[0] if answer else None) for c, answer in got]
    finally:
        for s in held:
            s.close()


def test_others_at_an_saes_address_do_not_use_up_its_connections(net):
    """The cap counts an SAE's connections from an address: connections that are no
    SAE's (a user of the SAE's host, or a process in the node's namespace, without an
    SAE's certificate), or another SAE's, made from the same address and left silent,
    used to hold the address's cap at every worker, and the SAE was answered 503."""
    cap, workers = net.topo.api.max_connections_per_address, net.topo.api.workers
    n = workers * cap + 8  # enough for every worker, wherever they land
    for crowd, source in (([net.ctx(None)], "127.0.0.5"), ([net.ctx("a2")], "127.0.0.6")):
        got = net.pools["A"].submit(_crowded_out, net.host("A"), net.port, crowd, n,
                                    net.ctx("a1"), source).result(300)
        assert got == [200] * 8, got


def _stalled_answer(host: str, port: int, ctx: ssl.SSLContext, query: str,
                    stall_s: float) -> tuple[int, int]:
    """Ask for keys, read the answer's head and stop reading for ``stall_s``, then read
    on to its end: (body bytes that came, the body's announced length)."""
    s = ctx.wrap_socket(socket.create_connection((host, port), timeout=90),
                        server_hostname=host)
    with s:
        s.sendall(f"GET {BASE}/b1/enc_keys?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n"
                  .encode())
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(256)
            assert chunk, got
            got += chunk
        head, body = got.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
        time.sleep(stall_s)  # a reader that stopped
        n = len(body)
        with contextlib.suppress(OSError):
            while n < length and (chunk := s.recv(1 << 20)):
                n += len(chunk)
        return n, length


def test_an_answer_whose_reader_stopped_is_dropped_not_kept(net):
    """An SAE that asks for 16 MiB of key and stops reading its answer held the answer
    (22 MB of base64) in its worker, and its connection, for good: nothing bounded an
    answer's way out. Its bytes not leaving for SILENT_S (looked at every SILENT_S / 2),
    the connection is dropped; other SAEs are served meanwhile."""
    net.stock(24 * MIB)
    job = net.pools["A"].submit(_stalled_answer, net.host("A"), net.port, net.ctx("a1"),
                                "number=16&size=8388608", 3 * SILENT_S)
    assert net.call("a2", "GET", f"{BASE}/b1/status")[0] == 200  # served meanwhile
    got, length = job.result(300)
    assert length > 16 * MIB
    assert got < length, "the stalled answer was kept whole"


def test_a_connection_without_a_certificate_gets_its_401_and_is_closed(net):
    """A connection that is no SAE's is never heard: after its 401 the server closes it,
    rather than keep a descriptor open for whoever made it (with a request every
    SILENT_S, for good)."""
    def ask() -> tuple[bytes, float]:
        host = net.host("A")
        s = net.ctx(None).wrap_socket(socket.create_connection((host, net.port), timeout=30),
                                      server_hostname=host)
        with s:
            s.sendall(f"GET {BASE}/b1/status HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            t0, got = time.monotonic(), b""
            while chunk := s.recv(1 << 16):  # until the server closes it
                got += chunk
            return got, time.monotonic() - t0

    got, took = net.pools["A"].submit(ask).result(120)
    head = got.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 401") and b"connection: close" in head, got[:300]
    assert took < SILENT_S / 2, f"closed after {took:.0f} s: by the idle timeout"


def test_dec_keys_only_for_the_named_slave_and_master(net):
    net.stock()
    (kid, key), = _keys(net.call("a1", "GET", f"{BASE}/b1/enc_keys")[1])
    status, doc = net.call("b2", "GET", f"{BASE}/a1/dec_keys?key_ID={kid}")
    assert status == 401 and "another SAE" in doc["message"]
    status, doc = net.call("b1", "GET", f"{BASE}/a2/dec_keys?key_ID={kid}")  # other master
    assert status == 400 and doc["message"] == "one or more keys specified are not found on KME"
    assert _keys(net.call("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={kid}")[1]) == [(kid, key)]


NO_SUCH_KEY = "3d5c2a7e-9b41-4f0e-8c6d-1a2b3c4d5e6f"  # (fixed: the same test ids in every
# pytest-xdist worker; no key drawn at random has it)

BAD = [  # method, path, body, what the message says
    ("GET", f"{BASE}/b1/enc_keys?size=255", None, "size shall be a multiple of 8"),
    ("POST", f"{BASE}/b1/enc_keys", b'{"size": 1001}', "size shall be a multiple of 8"),
    ("POST", f"{BASE}/b1/enc_keys", b'{"extension_mandatory": [{"x": 1}]}',
     "not all extension_mandatory parameters are supported"),
    ("GET", f"{BASE}/b1/enc_keys?number=1025", None, "above max_key_per_request"),
    ("GET", f"{BASE}/b1/enc_keys?number=0", None, "number must be at least 1"),
    ("GET", f"{BASE}/b1/enc_keys?size=0", None, "outside [8, 8388608]"),
    ("GET", f"{BASE}/b1/enc_keys?size=8388616", None, "outside [8, 8388608]"),
    ("GET", f"{BASE}/b1/enc_keys?number=65&size=8388608", None, "above the 64 MiB"),
    ("GET", f"{BASE}/b1/enc_keys?nubmer=2", None, "unknown query parameter 'nubmer'"),
    ("GET", f"{BASE}/b1/enc_keys?number=2&number=3", None, "given 2 times"),
    ("GET", f"{BASE}/b1/enc_keys?number=-1", None, "non-negative integer"),
    ("POST", f"{BASE}/b1/enc_keys", b'{"number": 2', "malformed JSON"),
    ("POST", f"{BASE}/b1/enc_keys", b"", "request body missing"),
    ("POST", f"{BASE}/b1/enc_keys", b'{"number": "2"}', "number must be an integer"),
    ("POST", f"{BASE}/b1/enc_keys?number=2", b"{}", "in the JSON body"),
    ("POST", f"{BASE}/b1/enc_keys", b'{"additional_slave_SAE_IDs": ["zz"]}', "not known"),
    ("POST", f"{BASE}/b1/enc_keys", b'{"additional_slave_SAE_IDs": ["b1"]}',
     "named in additional_slave_SAE_IDs too"),
    ("POST", f"{BASE}/b1/enc_keys", b" " * (1 << 20) + b"{}", "larger than"),
    ("GET", f"{BASE}/nobody/enc_keys", None, "slave SAE 'nobody' is not known"),
    ("GET", f"{BASE}/a2/enc_keys", None, "attached to this node too"),
    ("GET", f"{BASE}/b1/status?x=1", None, "no query parameters"),
    ("GET", f"{BASE}/b1/dec_keys?key_ID=not-a-uuid", None, "is not a UUID"),
    ("GET", f"{BASE}/b1/dec_keys", None, "key_ID is required"),
    ("GET", f"{BASE}/b1/dec_keys?key_ID={NO_SUCH_KEY}", None,
     "one or more keys specified are not found on KME"),
    ("POST", f"{BASE}/b1/dec_keys", b'{"key_IDs": []}', "non-empty array"),
    ("GET", f"{BASE}/b1/elsewhere", None, "no such endpoint"),      # no 404 ...
    ("GET", "/", None, "no such endpoint"),
    ("DELETE", f"{BASE}/b1/enc_keys", None, "not allowed"),          # ... and no 405
    ("PUT", f"{BASE}/b1/status", b"{}", "not allowed"),
    ("GET", f"{BASE}/b1/status", b"x", "no body"),                  # a GET has no body
    ("GET", f"{BASE}/b1/enc_keys?number=1", b"{}", "no body"),
    ("GET", f"{BASE}/b1/dec_keys?key_ID={NO_SUCH_KEY}", b"{}", "no body"),
]


@pytest.mark.parametrize("method,path,body,words", BAD,
                         ids=[f"{m} {p[len(BASE):][:40]} {w[:24]}" for m, p, _, w in BAD])
def test_400_with_the_reason_and_nothing_taken(net, method, path, body, words):
    before = net.settled_consumed()
    status, doc = net.call("a1", method, path, body)
    assert status == 400, doc
    assert words in doc["message"], doc
    assert net.consumed() == before


def test_a_get_with_an_empty_body_is_answered_and_logs_nothing(net):
    """``Content-Length: 0`` on a GET is no body: answered, and no log line (Sanic logged
    an error for each GET with that header, a line an SAE could write at its request
    rate)."""
    for _ in range(25):
        status, doc = net.call("a1", "GET", f"{BASE}/b1/status", b"")
        assert status == 200 and doc["slave_SAE_ID"] == "b1"
    assert "not consumed" not in _node_log(net.prefix, "A")


def test_503_when_there_is_not_enough_key_and_nothing_is_taken(net):
    usable = net.stock()
    before = net.consumed()
    number = usable // MIB + 1
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number={number}&size={8 * MIB}")
    assert status == 503
    assert "not enough key material; nothing was taken" in doc["message"]
    assert net.consumed() == before
    assert net.gkm("A")["peers"]["B"]["enc"]["usable"] == usable


# ---- concurrency ----------------------------------------------------------------------------

def test_50_concurrent_enc_keys_and_racing_dec_keys_deliver_each_key_once(net):
    net.stock()
    barrier = threading.Barrier(50)

    def enc(i: int):
        barrier.wait(30)
        slave = "b1" if i % 2 else "b2"
        status, doc = net.call("a1", "GET", f"{BASE}/{slave}/enc_keys?number=4&size=256")
        assert status == 200, doc
        return slave, _keys(doc)

    with ThreadPoolExecutor(50) as ex:
        results = list(ex.map(enc, range(50)))
    issued = {kid: (slave, key) for slave, keys in results for kid, key in keys}
    assert len(issued) == 200  # no key twice
    assert len({k for _, k in issued.values()}) == 200
    # At B, every key is asked for twice at once, by its slave; and once by the other.
    race = threading.Barrier(60)

    def dec(job):
        kid, sae = job
        race.wait(30)
        return kid, sae, net.call(sae, "GET", f"{BASE}/a1/dec_keys?key_ID={kid}")

    jobs = [(k, s) for k, (s, _) in issued.items() for _ in range(2)]
    jobs += [(k, "b2" if s == "b1" else "b1") for k, (s, _) in list(issued.items())[:200]]
    jobs = jobs[:600]
    with ThreadPoolExecutor(60) as ex:
        out = list(ex.map(dec, jobs))
    delivered: dict[str, list] = {}
    for kid, sae, (status, doc) in out:
        if status == 200:
            delivered.setdefault(kid, []).append((sae, _keys(doc)))
        elif status == 503:  # the twin request's answer was on its way for too long
            assert sae == issued[kid][0] and "not deliverable yet" in doc["message"], doc
        else:
            assert status in (400, 401), doc
    assert set(delivered) == set(issued)
    for kid, got in delivered.items():
        assert len(got) == 1, f"{kid} delivered {len(got)} times"
        sae, keys = got[0]
        assert sae == issued[kid][0] and keys == [(kid, issued[kid][1])]


# ---- fuzzing --------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="ascii"), max_size=60)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | _text, lambda c: st.lists(c, max_size=4) | st.dictionaries(_text, c, max_size=4),
    max_leaves=12)
_fields = st.sampled_from(["number", "size", "additional_slave_SAE_IDs", "key_IDs",
                           "extension_mandatory", "extension_optional", "key_ID", "x"])
_bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(_fields, _json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.builds(lambda n, s: json.dumps({"number": n, "size": s}).encode(),
              st.integers(-3, 3000), st.integers(-8, 9000)),
)
_queries = st.one_of(
    _text.map(lambda t: t.replace(" ", "+")),
    st.lists(st.tuples(_fields, st.integers(-5, 99999).map(str) | _text), max_size=3)
    .map(lambda kv: "&".join(f"{k}={v}" for k, v in kv)))
_paths = st.builds(lambda sae, ep: f"{BASE}/{sae}/{ep}",
                   st.sampled_from(["b1", "b2", "a2", "zz", "b1%00", "..", "b" * 70]),
                   st.sampled_from(["enc_keys", "dec_keys", "status", "x"]))


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST"]), path=_paths, query=_queries, body=_bodies,
       sae=st.sampled_from(["a1", "a1", "a1", None]))
def test_fuzzed_requests_get_one_of_four_codes_and_refusals_take_nothing(net, method, path,
                                                                         query, body, sae):
    # After keys were taken, what B publishes of it (and of keys reserved ahead) may come
    # a publish period later: counted before this request, not against it.
    before = net.still_consumed() if net.took else net.consumed()
    url = path + ("?" + quote(query, safe="&=+%") if query else "")
    status, doc = net.call(sae, method, url, body if method == "POST" else None, node="A")
    net.took = status == 200
    assert status in (200, 400, 401, 503)
    event(f"status {status}")
    if status == 200:
        assert isinstance(doc, dict) and ("keys" in doc or "key_size" in doc)
    else:
        assert isinstance(doc, dict) and isinstance(doc["message"], str) and doc["message"]
        assert net.consumed() == before, (status, doc)


# ---- the service's life ---------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _listening(prefix: str, node: str, port: int) -> set[int]:
    """Processes holding the listening socket of ``port`` in the node's namespace."""
    out = subprocess.run(["ip", "netns", "exec", paths.netns_name(prefix, node), "ss",
                          "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    return {int(x) for x in re.findall(r"pid=(\d+)", out)}


def test_sanic_workers_and_a_graceful_shutdown_that_loses_nothing(net):
    net.stock()
    api = module_pid(net.prefix, "A", "api")
    workers = set(_children(api)) & _listening(net.prefix, "A", net.port)
    assert len(workers) == 2  # [api] workers = 2, forked by Sanic, sharing one socket
    # Hold B's key manager so that A's answers wait for B's reservation, then stop A's API.
    gkm_b = module_pid(net.prefix, "B", "gkm")
    os.kill(gkm_b, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(4) as ex:
            inflight = [ex.submit(net.call, "a1", "GET", f"{BASE}/b1/enc_keys?number=2")
                        for _ in range(4)]
            time.sleep(1.0)
            os.kill(api, signal.SIGTERM)
            time.sleep(1.0)
            os.kill(gkm_b, signal.SIGCONT)
            answers = [f.result(30) for f in inflight]
    finally:
        os.kill(gkm_b, signal.SIGCONT)
    assert [s for s, _ in answers] == [200] * 4, answers
    # Every key taken went out, and the slave can fetch each.
    for _, doc in answers:
        for kid, key in _keys(doc):
            assert _keys(net.call("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={kid}")[1]) == \
                [(kid, key)]
    wait_until(lambda: module_pid(net.prefix, "A", "api") != api, 30, "the API restarted")
    wait_until(lambda: _answers(net), 60, "the restarted API")
    assert "api exited with 0" in _node_log(net.prefix, "A")


def _node_log(prefix: str, node: str) -> str:
    return (paths.log_dir(prefix) / f"node-{node}.log").read_text()


def _api_file(prefix: str, node: str) -> dict:
    return json.loads((paths.node_dir(prefix, node) / "api.json").read_text())


def _status_api(prefix: str, node: str) -> dict:
    """What `qkdctl status --json` says of a node's key API."""
    cfg = json.loads(paths.manifest_path(prefix).read_text())["config"]
    out = subprocess.run([QKDCTL, "status", cfg, "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["nodes"][node]["api"]


def test_killed_workers_and_manager_are_replaced_and_status_shows_it(net):
    """kill -9 of one worker, of every worker, of the manager: each time the API serves
    again on its own (Sanic's manager used to leave killed workers dead, and with all of
    them gone nothing answered while status said up), and status counts the restarts."""
    wait_until(lambda: _api_file(net.prefix, "A")["state"] == "serving", 30, "A's API")
    before = _api_file(net.prefix, "A")
    assert before["workers_alive"] == before["workers"] == 2
    workers = [w["pid"] for w in before["slots"]]
    # One worker.
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: (f := _api_file(net.prefix, "A"))["restarts"] == before["restarts"] + 1
               and f["state"] == "serving", 30, "the killed worker replaced")
    assert _answers(net)
    # Every worker: nothing serves until the manager forks them again.
    now = _api_file(net.prefix, "A")
    for w in now["slots"]:
        os.kill(w["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    wait_until(lambda: _answers(net), 60, "the API serving again after every worker died")
    took = time.monotonic() - t0
    after = wait_until(lambda: (f := _api_file(net.prefix, "A"))["restarts"]
                       == before["restarts"] + 3 and f, 10, "the restarts published")
    assert set(w["pid"] for w in after["slots"]).isdisjoint(workers)
    seen = _status_api(net.prefix, "A")
    assert seen["restarts"] == after["restarts"] and seen["last_restart"] >= time.time() - 60
    # The manager: the node's supervisor starts another, whose workers serve.
    manager = module_pid(net.prefix, "A", "api")
    restarts = _status_api(net.prefix, "A")["module_restarts"]
    os.kill(manager, signal.SIGKILL)
    wait_until(lambda: module_pid(net.prefix, "A", "api") not in (None, manager)
               and _api_file(net.prefix, "A")["pid"] != manager
               and _answers(net), 60, "a new manager serving")
    seen = _status_api(net.prefix, "A")
    assert seen["module_restarts"] == restarts + 1 and seen["state"] == "serving"
    assert seen["module_last_restart"] >= time.time() - 60
    assert took < 60  # (the design aims at about a second; the deadline is for busy hosts)


def test_the_readme_curl_calls_work(net):
    """The README's curl commands for the triangle, with this network's names put in."""
    net.stock()
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme[readme.index("```sh\n# the key API"):]
    block = block[:block.index("\n```\n")]
    names = {"/run/qkdnet/tri/pki": str(net.pki.root), "tri-A": f"{net.prefix}-A",
             "tri-C": f"{net.prefix}-B", "SAE-A": "a1", "SAE-C": "b1",
             "10.88.0.1": net.host("A"), "10.88.0.3": net.host("B")}
    for old, new in names.items():
        block = block.replace(old, new)
    cmds = [line.removeprefix("sudo ") for line in block.splitlines()
            if line.startswith(("sudo ip netns exec", "PKI="))]
    assert len(cmds) == 4  # PKI=..., status, enc_keys, dec_keys

    def run(cmd: str, **env: str) -> dict:
        out = subprocess.run(["bash", "-c", f"{cmds[0]}; {cmd}"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert run(cmds[1])["slave_SAE_ID"] == "b1"
    doc = run(cmds[2])
    assert run(cmds[3], KEY_ID=doc["keys"][0]["key_ID"]) == doc


def test_a_key_fetched_with_curl_is_not_handed_out_again(net):
    """curl, the README's client, reads its answer and closes at once. Each key it got is
    refused the second time (the same SAE got the same key again in 9 of 10 such fetches:
    the watch of the answer's delivery counted the answer lost)."""
    net.stock()
    crt, key = net.pki.sae("b1")
    for _ in range(5):
        status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=1&size=256")
        assert status == 200, doc
        kid = doc["keys"][0]["key_ID"]
        cmd = ["ip", "netns", "exec", f"{net.prefix}-B", "curl", "-sS", "-w", "\n%{http_code}",
               "--cacert", str(net.pki.ca_cert), "--cert", str(crt), "--key", str(key),
               f"https://{net.host('B')}:{net.port}{BASE}/a1/dec_keys?key_ID={kid}"]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        assert first.endswith("\n200") and json.loads(first[:-4])["keys"][0]["key_ID"] == kid
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        assert again.endswith("\n400"), again  # already delivered


# ---- refused requests take nothing (issue 16, item 9) ---------------------------------------

def _next_ids(n: Net, number: int, size: int) -> list[str]:
    """The key IDs A's next take of ``number`` keys of ``size`` bytes for B cuts (from its
    carving cursor; the cursor's block has room for them, or the next block has)."""
    from control.gkm.carving import KeySlice

    seq, offset = n.gkm("A")["peers"]["B"]["enc"]["cursor"]
    if offset + number * size > n.topo.gkm.block_size:
        seq, offset = seq + 1, 0
    a, b = n.topo.node("A").id, n.topo.node("B").id
    return [str(KeySlice(a, b, seq, offset + i * size, size).key_id) for i in range(number)]


def _dec(n: Net, ids: list[str]):
    """dec_keys by b1 for keys of a1 (POST: several key IDs)."""
    body = json.dumps({"key_IDs": [{"key_ID": k} for k in ids]}).encode()
    return n.call("b1", "POST", f"{BASE}/a1/dec_keys", body)


def test_a_503_for_an_unconfirmed_reservation_leaves_nothing_the_slave_can_fetch(net):
    """The slave's key manager is held (SIGSTOP): the master's enc_keys gets 503 after its
    keys were carved and reserved. Once the slave's node hears the reservation, the
    cancellation that follows it reaches it too: dec_keys for those key IDs is refused,
    while the node is held, while it catches up and after, and no key is delivered."""
    net.stock()
    ids = _next_ids(net, 2, 32)
    before = net.gkm("B")["peers"]["A"]["dec"]
    gkm_b = module_pid(net.prefix, "B", "gkm")
    tries: list[tuple[int, str]] = []
    stop = threading.Event()

    def fetch() -> None:  # the slave SAE, knowing the (predictable) key IDs, keeps asking
        while not stop.is_set():
            status, doc = _dec(net, ids)
            tries.append((status, doc.get("message", "")))

    os.kill(gkm_b, signal.SIGSTOP)
    try:
        status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
        assert status == 503 and "did not confirm the reservation" in doc["message"], doc
        fetcher = threading.Thread(target=fetch)
        fetcher.start()
    finally:
        os.kill(gkm_b, signal.SIGCONT)
    try:
        wait_until(lambda: net.gkm("A")["peers"]["B"]["enc"]["unacked_reservations"] == 0
                   and net.gkm("B")["peers"]["A"]["dec"]["reservations_applied"]
                   == before["reservations_applied"] + 2, 30,
                   "the reservation and its cancellation to reach B")
        wait_until(lambda: len(tries) >= 3, 60, "the slave to try a few times")
    finally:
        stop.set()
        fetcher.join(60)
    assert tries and all(st == 400 and "not found on KME" in m for st, m in tries), tries
    status, doc = _dec(net, ids)
    assert status == 400 and "not found on KME" in doc["message"], doc
    after = net.gkm("B")["peers"]["A"]["dec"]
    assert after["delivered_keys"] == before["delivered_keys"]
    assert after["reserved_keys"] == before["reserved_keys"]
    # The refused request's keys are gone for good: the next request gets other keys.
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
    assert status == 200 and not {k for k, _ in _keys(doc)} & set(ids)


def test_a_503_while_the_masters_key_manager_is_held_takes_nothing(net):
    """The master's key manager is held past the key API's wait (its requests queue): the
    API answers 503, and the request, read late, takes nothing: no key carved, nothing
    reserved at the slave's node, the next request gets those very keys."""
    net.stock()
    ids = _next_ids(net, 2, 32)
    before = net.gkm("A")
    gkm_a = module_pid(net.prefix, "A", "gkm")
    os.kill(gkm_a, signal.SIGSTOP)
    try:
        status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
    finally:
        os.kill(gkm_a, signal.SIGCONT)
    assert status == 503 and "did not answer" in doc["message"], doc

    def handled() -> bool:  # the held request has been read: refused, or (before) served
        now = net.gkm("A")
        return now.get("late_requests", 0) > before.get("late_requests", 0) or \
            now["peers"]["B"]["enc"]["taken_keys"] != before["peers"]["B"]["enc"]["taken_keys"]

    wait_until(handled, 30, "A's key manager to read the held request")
    after = net.gkm("A")
    assert after["peers"]["B"]["enc"]["taken_keys"] == before["peers"]["B"]["enc"]["taken_keys"]
    assert after["late_requests"] == before["late_requests"] + 1
    status, doc = _dec(net, ids)
    assert status == 400 and "not found on KME" in doc["message"], doc  # nothing reserved
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
    assert status == 200 and [k for k, _ in _keys(doc)] == ids
    status, doc = _dec(net, ids)
    assert status == 200 and [k for k, _ in _keys(doc)] == ids


def test_a_dec_keys_answer_never_written_leaves_its_keys_to_their_sae_alone(net):
    """Keys handed in an answer whose writer (a key API worker) dies before it says the
    answer was written: the same SAE may fetch them again, no one else may, and once an
    answer is written they are delivered and gone (issue 17: lost answers)."""
    net.stock()
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
    assert status == 200, doc
    keys = _keys(doc)
    ids = [k for k, _ in keys]
    before = net.gkm("B")["peers"]["A"]["dec"]
    writer = subprocess.Popen(["sleep", "600"])  # stands for the worker writing the answer
    b = GkmClient(net.prefix, "B")
    try:
        head, data = b.call(take.take_dec("A", ids, "b1", "a1", b.deadline(),
                                          holder=(process_identity(writer.pid), 1)))
        assert split_keys(head["sizes"], data) == [k for _, k in keys]
        assert net.gkm("B")["peers"]["A"]["dec"]["handed_unconfirmed"] == \
            before["handed_unconfirmed"] + 2
        # While its writer lives, no second answer: b2 is refused at once, b1's request
        # waits for the first answer's fate ...
        body = json.dumps({"key_IDs": [{"key_ID": k} for k in ids]}).encode()
        status, doc = net.call("b2", "POST", f"{BASE}/a1/dec_keys", body)
        assert status == 401, doc
        held = net.gkm("B")["held_unconfirmed_total"]
        with ThreadPoolExecutor(1) as ex:
            again = ex.submit(_dec, net, ids)
            wait_until(lambda: net.gkm("B")["held_unconfirmed_total"] > held, 30,
                       "b1's second request held at B")
            assert not again.done()
            writer.kill()  # ... which is lost: its writer dies without a word
            writer.wait()
            status, doc = again.result(60)
        assert status == 200 and _keys(doc) == keys, doc
        wait_until(lambda: (d := net.gkm("B")["peers"]["A"]["dec"])["delivered_keys"]
                   == before["delivered_keys"] + 2
                   and d["handed_unconfirmed"] == before["handed_unconfirmed"], 30,
                   "the written answer to count as the delivery")
        status, doc = _dec(net, ids)
        assert status == 400 and "not found on KME" in doc["message"], doc
    finally:
        writer.kill()
        writer.wait()
        b.close()


def _queued_at(prefix: str, node: str, pid: int) -> bool:
    """Bytes wait unread on one of ``pid``'s Unix sockets (a held process's requests)."""
    out = subprocess.run(["ip", "netns", "exec", paths.netns_name(prefix, node), "ss",
                          "-xpnH"], capture_output=True, text=True).stdout
    return any(f"pid={pid}," in line and int(line.split()[2]) > 0
               for line in out.splitlines() if len(line.split()) > 2)


@pytest.mark.parametrize("kind", ["dec", "enc"])
def test_requests_waiting_on_a_killed_key_manager_are_not_left_to_time_out(net, kind):
    """kill -9 of a node's global key manager while a request waits on it: the key API
    does not wait out its 15-s timeout for an answer that died with the process. A
    dec_keys goes to the restarted manager and is answered 200; an enc_keys is refused
    at once, having taken nothing (the next take cuts the very same keys)."""
    net.stock()
    if kind == "dec":
        status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
        assert status == 200, doc
        keys = _keys(doc)
        node, request = "B", lambda: _dec(net, [k for k, _ in keys])
    else:
        ids = _next_ids(net, 2, 32)
        node, request = "A", lambda: net.call("a1", "GET",
                                              f"{BASE}/b1/enc_keys?number=2&size=256")
    gkm = module_pid(net.prefix, node, "gkm")
    os.kill(gkm, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as ex:
            answer = ex.submit(request)
            wait_until(lambda: _queued_at(net.prefix, node, gkm), 30,
                       f"the request queued at {node}'s held key manager")
            os.kill(gkm, signal.SIGKILL)
            status, doc = answer.result(60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(gkm, signal.SIGCONT)
    if kind == "dec":
        assert status == 200 and _keys(doc) == keys, doc
        return
    assert status == 503 and "restarted" in doc["message"], doc
    wait_until(lambda: module_pid(net.prefix, node, "gkm") != gkm and _answers(net), 60,
               "A's key manager restarted")
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number=2&size=256")
    assert status == 200 and [k for k, _ in _keys(doc)] == ids, doc


def test_keys_given_back_after_a_late_answer_are_refused_at_the_slave(net):
    """What a key API worker does with an answer that came after it had answered 503:
    the keys go back to the master's key manager, which cancels them at the slave's node."""
    net.stock()
    before = net.gkm("B")["peers"]["A"]["dec"]
    a = GkmClient(net.prefix, "A")
    try:
        keys = a.take_enc_for("B", 2, 32, ["b1"], "a1")  # confirmed: reserved at B
        ids = [k for k, _ in keys]
        assert a.call(take.cancel("B", ids))[0]["cancelled"] == 2
        from control.gkm.carving import KeySlice

        theirs = KeySlice(net.topo.node("B").id, net.topo.node("A").id, 0, 0, 32)
        with pytest.raises(StoreError, match="a key ID of another pair"):
            a.call(take.cancel("B", [str(theirs.key_id)]))
        with pytest.raises(StoreError, match="not a key ID of this network"):
            a.call(take.cancel("B", [str(uuid.uuid4())]))
    finally:
        a.close()
    wait_until(lambda: net.gkm("A")["peers"]["B"]["enc"]["unacked_reservations"] == 0
               and net.gkm("B")["peers"]["A"]["dec"]["reservations_applied"]
               == before["reservations_applied"] + 3, 30,
               "the reservation, its confirmation and the cancellation to reach B")
    status, doc = _dec(net, ids)
    assert status == 400 and "not found on KME" in doc["message"], doc
    assert net.gkm("B")["peers"]["A"]["dec"]["delivered_keys"] == before["delivered_keys"]


def test_no_key_reaches_a_log_or_status_file(net):
    """Invariant 6: none of the keys handed out above, in base64 or hex, in any log or
    status file of the network (the key API, its workers, the key managers)."""
    keys = [k for k in SEEN if len(k) >= 16]
    assert len(keys) > 100
    files = [p for p in paths.network_dir(net.prefix).rglob("*")
             if p.is_file() and p.suffix in (".log", ".json")]
    assert any(p.name == "node-A.log" for p in files)
    text = b"".join(p.read_bytes() for p in files)
    for k in keys:
        assert base64.b64encode(k[:16])[:20] not in text
        assert k[:16].hex().encode() not in text
    # The logs are structured: every line of every node's log is one JSON object.
    for p in files:
        if p.name.startswith("node-") and p.suffix == ".log":
            for line in p.read_text().splitlines():
                rec = json.loads(line)
                assert {"time", "level", "logger", "node", "message"} <= rec.keys(), line
