"""The key API service: ETSI GS QKD 014 V1.1.1 on Sanic, HTTPS only, mutual TLS.

One service per node, on the node's address and ``[ports] api``: ``[api] workers``
processes sharing one listening socket, each running Sanic in single-process mode, forked
and kept running by :mod:`api.pool` (a killed worker is replaced at once). The calling SAE is the
subject CN of its client certificate, which must be signed by the network's CA
(``qkdctl pki init``); a connection without a certificate is accepted so that it can be
told 401 in JSON, one with a certificate from another CA fails its TLS handshake.

Handlers are thin: request parsing and the key container are ``api.etsi``, the answers
``api.kme``, the keys come from the node's global key manager over ``api.gkm_link``. Only
the four status codes of the standard leave this service, each with a JSON body: Sanic's
own 404, 405 and 413 become 400, anything unexpected 503.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import parse_qs

from sanic import Sanic
from sanic.exceptions import BadURL, RequestCancelled, SanicException, ServerError, URITooLong
from sanic.http import Stage
from sanic.request import Request
from sanic.response import HTTPResponse
from sanic.response import json as json_response
from sanic.server.protocols.http_protocol import HttpProtocol

from api import etsi
from api.gkm_link import GkmLink
from api.hand_counts import HandCounts, HandTable
from api.hand_keeper import HandKeeper, wipe
from api.kme import Kme, store_refusal
from api.limits import AddressCap, SaeLimiter, SaeLimits, buffer_size
from api.pki import PkiLayout
from api.pool import WorkerPool, bind_listener
from api.request_memo import RequestMemo, plan
from control.core import paths
from control.core.address import wait_for_address
from control.core.config import Topology
from control.gkm.client import StoreError
from dataplane.private import check_trusted, secret_file

log = logging.getLogger("qkdnet.api")
BASE = etsi.BASE_PATH
JSON = "application/json"
# Anyone who reaches the port can hold connections open, each a descriptor of a worker:
# none is kept silent longer than this, in any of its phases (a loaded machine too).
SILENT_S = 15


def server_context(pki: Path, node: str) -> ssl.SSLContext:
    """TLS 1.2 or newer; the node's certificate; client certificates verified against
    the network's CA when given (CERT_OPTIONAL: none is a 401, not a failed handshake)."""
    layout = PkiLayout(pki)
    crt, key = layout.node(node)
    for p in (layout.ca_cert, crt, key):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run 'qkdctl pki init {pki} --config "
                                    f"FILE' (net up makes one when [api] pki is not set)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with secret_file(key, "the node's TLS key") as checked:  # ours alone, no link
        ctx.load_cert_chain(crt, checked)
    check_trusted(layout.ca_cert, "CA certificate")  # it decides which SAEs are heard
    ctx.load_verify_locations(layout.ca_cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _cert_cn(transport) -> str | None:
    """The subject CN of the client certificate a TLS connection's handshake verified."""
    cn = None
    sslobj = transport.get_extra_info("ssl_object")
    cert = sslobj.getpeercert() if sslobj is not None else None
    if cert:
        for rdn in cert.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    cn = value
    return cn


def _peer_cn(request: Request) -> str | None:
    """The verified client certificate's subject CN, once per connection."""
    ctx = request.conn_info.ctx if request.conn_info else None
    if ctx is not None and hasattr(ctx, "sae_cn"):
        return ctx.sae_cn
    cn = _cert_cn(request.transport)
    if ctx is not None:
        ctx.sae_cn = cn
    return cn


def _error(e: etsi.ApiError) -> HTTPResponse:
    return json_response(e.body(), status=e.status)


async def _send_keys(request: Request, key_ids: list[str], keys: list) -> HTTPResponse | None:
    """200 with the key container: one body when small; else sent in pieces under a
    Content-Length, so that megabytes of base64 are not copied to be joined (Sanic would
    also copy a whole body once more to put the headers in front)."""
    parts = etsi.key_container_parts(key_ids, keys)
    if len(parts) == 1:
        return HTTPResponse(parts[0], content_type=JSON)
    response = await request.respond(
        content_type=JSON, headers={"content-length": str(sum(len(p) for p in parts))})
    for p in parts:
        await response.send(p)
    return None


async def _write_keys(request: Request, key_ids: list[str], keys: list) -> bool:
    """Send the key container whole; False if the connection went away first (the SAE
    did not get the keys). Whether the bytes then reach the SAE is
    :func:`api.delivery.delivered`'s to tell."""
    parts = etsi.key_container_parts(key_ids, keys)
    response = await request.respond(
        content_type=JSON, headers={"content-length": str(sum(len(p) for p in parts))})
    try:
        for p in parts:
            await response.send(p)
        await response.eof()
    except (RequestCancelled, ServerError, ConnectionError):
        return False
    return True


def _query(request: Request) -> dict[str, list[str]]:
    qs = request.query_string
    if not qs:
        return {}
    try:
        return parse_qs(qs, keep_blank_values=True, strict_parsing=True, max_num_fields=16)
    except ValueError as e:
        raise etsi.bad(f"malformed query string: {str(e)[:80]}") from None


async def _from_gkm(call, on_dec: bool):
    """Await a call to the global key manager; its refusal as the standard's answer."""
    try:
        return await call
    except StoreError as e:
        raise store_refusal(e.kind, str(e), on_dec) from None


def _parse(request: Request, from_query, from_body, limits: etsi.Limits):
    """The request's parameters: the query string of a GET, the JSON body of a POST."""
    if request.method == "GET":
        _no_body(request)
        return from_query(_query(request), limits)
    if request.query_string:
        raise etsi.bad("POST takes its parameters in the JSON body")
    return from_body(request.body, limits)


def _no_body(request: Request) -> None:
    """A GET with a body is refused (an empty one, ``Content-Length: 0``, is no body): its
    body would be ignored, and Sanic logged an error for each such request answered."""
    if request.body:
        raise etsi.bad("a GET request takes its parameters in the query string and no body")


class _ProcessLock:
    """A POSIX record lock on a file: the kernel drops it when its holder dies, so a
    worker killed while holding it blocks no one."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


def sae_limiter(topo: Topology, node: str, shared: bool = False) -> SaeLimiter:
    """The per-SAE limits of ``node``'s key API; ``shared``: in memory the workers forked
    after this share (every worker counts against the same limits)."""
    a = topo.api
    limits = SaeLimits(requests_per_s=a.sae_requests_per_s, store_share=a.sae_store_share,
                       share_window_s=a.sae_share_window_s,
                       store_bytes=topo.gkm.high_watermark)
    saes = sorted(s.id for s in topo.saes if s.node == node)
    peers = sorted(n for n in topo.nodes if n != node)
    if not shared:
        return SaeLimiter(limits, saes, peers)
    fd = os.memfd_create("qkdnet-api-limits")
    size = max(buffer_size(saes, peers), 16)
    os.ftruncate(fd, size)
    return SaeLimiter(limits, saes, peers, memoryview(mmap.mmap(fd, size)), _ProcessLock(fd))


class _Request(Request):
    """Sanic's request, but one whose URL cannot be parsed (a tab, a NUL, over 64 KiB)
    still gets an answer: Sanic refuses it (BadURL, a 400), then builds a stand-in
    request with the same URL for its error handling, which failed the same way, and the
    connection was dropped without an answer. The stand-in gets the URL "*" instead."""

    def __init__(self, url_bytes: bytes, *args, **kwargs):
        try:
            super().__init__(url_bytes, *args, **kwargs)
        except (BadURL, URITooLong):
            if kwargs.get("method") != "NONE":  # a real request: refused, as Sanic does
                raise
            super().__init__(b"*", *args, **kwargs)


class _Protocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol, and bounds on a request on its way in: its head, and
    its body, must each have come whole within SILENT_S of when it was first seen on its
    way (looked at every SILENT_S / 2, so 15-30 s), and a body that stops coming for
    SILENT_S is closed at once. Sanic's own timeouts restart at every byte, so a client
    sending a byte now and then held a connection for good; and it reads a body where only
    its 60-s response timeout applies, after which it waits for the rest with no limit, so
    a POST head that announced a body and sent none held one for good too. Anyone may do
    either: the caller is known only once its request is read.

    And a cap on the connections one SAE holds from one client address at this worker
    (:class:`api.limits.AddressCap`, the SAE known from the certificate the handshake
    verified): one over it is not counted; its first request gets one answer (a 503 that
    says why) and the connection is closed. One that cannot be an SAE's (no certificate,
    a CN no SAE of this node has) is not counted either: its first request gets its 401
    and it is closed, so that it cannot use up an SAE's connections from a shared address.
    Neither kind stays more than SILENT_S after it was made, whatever it sends (looked at
    as above). An over-cap connection used to be reset as soon as it was made, and the
    client saw only that; outsiders used to count in their address's cap."""

    # (Sanic's protocol classes keep to slots)
    __slots__ = ("_handled", "_arriving", "_address", "over_cap", "_uncounted", "_made",
                 "_writing")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._handled = 0  # requests this connection handed to the app
        self._arriving: tuple[Stage, int, float] | None = None  # (stage, _handled, seen)
        self._address: tuple[str, str] | None = None  # (address, SAE) counted in the cap
        self.over_cap = False  # its SAE held its cap there: answered once (503), closed
        self._uncounted = False  # over the cap, or no SAE's: closed SILENT_S after made
        self._made = 0.0  # when the connection was made (its handshake done)
        self._writing: tuple[int, float] | None = None  # (bytes waiting to leave, since)
        handle = self.request_handler

        async def counted(request: Request):  # a head is in: the next is another one
            self._handled += 1
            if request.stream is not None:
                # No route is a websocket, and Sanic stops every timeout of a request
                # that asks for one (a POST whose body never came was held for good).
                request.stream.upgrade_websocket = False
                if self.over_cap:
                    request.stream.keep_alive = False  # whatever the answer, the last
            return await handle(request)

        self.request_handler = counted

    def connection_made(self, transport) -> None:
        self._made = time.monotonic()
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            cap: AddressCap = self.app.ctx.addresses
            sae = _cert_cn(transport)
            if sae not in self.app.ctx.own_saes:  # no SAE's (None: no certificate)
                self._uncounted = True
            elif cap.admit((peer[0], sae)):
                self._address = (peer[0], sae)
            else:
                self.over_cap = self._uncounted = True
                _count_refusal(self.app, (peer[0], sae), cap)
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        if self._address is not None:
            self.app.ctx.addresses.release(self._address)
            self._address = None
        super().connection_lost(exc)

    def check_timeouts(self) -> None:
        if self._uncounted and time.monotonic() - self._made > SILENT_S:
            self.close()  # answered or not: it had SILENT_S in all, in any phase
            return
        http = getattr(self, "_http", None)
        if http is not None and (http.stage is Stage.REQUEST
                                 or (http.stage is Stage.HANDLER and http.request_body)):
            now = time.monotonic()
            seen = self._arriving
            if seen is None or seen[:2] != (http.stage, self._handled):
                self._arriving = (http.stage, self._handled, now)
            if now - self._arriving[2] > SILENT_S or (
                    http.stage is Stage.HANDLER and now - self._time > SILENT_S):
                self.close()
                return
        if http is not None and http.stage is Stage.RESPONSE and self._answer_stalled():
            self.transport.abort()  # its reader stopped: what waits is dropped, not kept
            return
        super().check_timeouts()

    def _answer_stalled(self) -> bool:
        """Whether an answer's bytes have stopped leaving for SILENT_S: the transport's
        write buffer not empty and unchanged since (a reader that stops held the answer,
        up to 85 MB of base64, and its worker's memory, for good; flow control keeps the
        buffer's size still while nothing drains, and any drain changes it)."""
        transport = self.transport
        pending = transport.get_write_buffer_size() if transport is not None else 0
        now = time.monotonic()
        seen = self._writing
        if not pending or seen is None or seen[0] != pending:
            self._writing = (pending, now)
            return False
        return now - seen[1] > SILENT_S


def _count_refusal(app: Sanic, key: tuple[str, str], cap: AddressCap) -> None:
    """Count a connection refused by the cap; log the 1st, 2nd, 4th, ... of this worker
    (a flood does not flood the log)."""
    counts: HandCounts | None = getattr(app.ctx, "hand_counts", None)
    if counts is not None:
        counts.add(refused_connections=1)
    if (cap.refused & (cap.refused - 1)) == 0:
        log.warning("key API: SAE %s holds %d connections from %s at this worker, the most "
                    "one SAE may from one address ([api] max_connections_per_address): its "
                    "next one gets a 503 and is closed (%d refused so far by this worker)",
                    key[1], cap.held(key), key[0], cap.refused)


def make_app(topo: Topology, node: str, name: str | None = None,
             limiter: SaeLimiter | None = None) -> Sanic:
    kme = Kme.from_topology(topo, node)
    sae_limits = limiter or sae_limiter(topo, node)
    app = Sanic(name or f"qkdnet_{topo.prefix}_{node}", configure_logging=False,
                request_class=_Request)
    app.config.REQUEST_MAX_SIZE = etsi.MAX_BODY + 1024
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = topo.api.graceful_shutdown_s
    # A connection without a request in progress, new (its handshake done) or between
    # two requests, is idle for Sanic: closed after this (it was 75 s, and so a new
    # connection that never sent a request held its descriptor 75 s).
    app.config.KEEP_ALIVE_TIMEOUT = SILENT_S
    app.config.REQUEST_TIMEOUT = SILENT_S  # a request's head whose bytes stop coming
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.config.MOTD = False
    app.config.ACCESS_LOG = False

    @app.before_server_start
    async def _open(app: Sanic) -> None:
        from control.core.lifecycle import die_with_parent
        from control.core.memory import keep_freed_memory

        die_with_parent()
        app.ctx.addresses = AddressCap(topo.api.max_connections_per_address)  # this worker's
        app.ctx.own_saes = kme.own_saes  # (looked up at every connection)
        keep_freed_memory()
        app.ctx.gkm = GkmLink(topo.prefix, node)
        app.ctx.gkm.start()
        app.ctx.hand = HandKeeper(app.ctx.gkm, topo.gkm.reserve_ahead_s,
                                  getattr(app.ctx, "hand_counts", None))
        app.ctx.hand.start()

    @app.before_server_stop
    async def _stopping(app: Sanic) -> None:
        app.ctx.hand.stopping = True  # requests in flight finish, without refills

    @app.after_server_stop
    async def _close(app: Sanic) -> None:
        try:
            await app.ctx.hand.close()
        finally:
            await app.ctx.gkm.close()

    def caller(request: Request) -> str:
        """The calling SAE; a connection that cannot be one (no certificate, a CN no SAE
        of this node has) gets its 401 and is closed: it would never be heard, and an
        outsider keeping it open would hold a descriptor of the worker for nothing."""
        try:
            return kme.caller(_peer_cn(request))
        except etsi.ApiError:
            if request.stream is not None:
                request.stream.keep_alive = False
            raise

    def admitted(request: Request) -> str:
        """The calling SAE, if it may make one more request now (and on this connection)."""
        sae = caller(request)
        if request.stream is not None and getattr(request.stream.protocol, "over_cap", False):
            raise request.app.ctx.addresses.refusal(sae)
        sae_limits.admit(sae, time.monotonic())
        return sae

    # The handlers raise ApiError for every refusal; _any_error below answers it.
    @app.get(f"{BASE}/<slave:str>/status", ignore_body=False)  # read, to refuse one
    async def status(request: Request, slave: str) -> HTTPResponse:
        master = admitted(request)
        etsi.check_path_sae(slave)
        _no_body(request)
        if _query(request):
            raise etsi.bad("status takes no query parameters")
        peer = kme.slave_node(slave)
        stock = await _from_gkm(request.app.ctx.gkm.stock(peer), on_dec=False)
        return json_response(kme.status(master, slave, peer, stock["usable"]))

    memo = RequestMemo()

    @app.route(f"{BASE}/<slave:str>/enc_keys", methods=["GET", "POST"])
    async def enc_keys(request: Request, slave: str) -> HTTPResponse | None:
        master = admitted(request)
        key = memo.key(master, slave, request.method, request.query_string, request.body)
        p = memo.get(key)
        if p is None:  # not asked before in these words: checked
            etsi.check_path_sae(slave)
            req = _parse(request, etsi.enc_keys_get, etsi.enc_keys_post, kme.limits)
            kme.check_enc(req)
            p = plan(req, master, slave, kme.slave_node(slave, req.additional_slave_sae_ids))
            memo.put(key, p)
        sae_limits.take_share(master, p.peer, p.nbytes, time.monotonic())
        held = request.app.ctx.hand.serve(p.pair, p.req.number)
        if held is not None:  # taken ahead into this worker's hand: no round trip
            try:
                return await _send_keys(request, *held)
            finally:
                wipe(held[1])
        try:
            ids, keys = await request.app.ctx.gkm.take_enc_for(
                p.peer, p.req.number, p.req.size_bytes, p.slaves, master)
        except StoreError as e:
            if e.kind != "unreachable":  # nothing was taken: not counted against the SAE
                sae_limits.refund(master, p.peer, p.nbytes, time.monotonic())
            raise store_refusal(e.kind, str(e), on_dec=False) from None
        return await _send_keys(request, ids, keys)

    @app.route(f"{BASE}/<master:str>/dec_keys", methods=["GET", "POST"])
    async def dec_keys(request: Request, master: str) -> HTTPResponse | None:
        slave = admitted(request)
        etsi.check_path_sae(master)
        req = _parse(request, etsi.dec_keys_get, etsi.dec_keys_post, kme.limits)
        peer, ids = kme.master_node(master), list(req.key_ids)
        gkm = request.app.ctx.gkm
        keys, token = await _from_gkm(gkm.take_dec(peer, ids, slave, master), on_dec=True)
        sent = False
        try:
            sent = await _write_keys(request, ids, keys)
        finally:  # delivered once the SAE's side has it all; else it may fetch them again
            gkm.settle(peer, ids, slave, token, request.transport if sent else None)
        return None

    @app.exception(Exception)
    async def _any_error(request: Request, exc: Exception) -> HTTPResponse:
        """Sanic's own refusals (no route, wrong method, body too large, bad request
        line) as the standard's 400, after the 401 an unknown caller gets first."""
        if isinstance(exc, etsi.ApiError):
            return _error(exc)
        status = getattr(exc, "status_code", 500) if isinstance(exc, SanicException) else 500
        if status >= 500:
            log.error("key API: unexpected %s on %s %s", type(exc).__name__,
                      request.method if request else "-", request.path if request else "-",
                      exc_info=not isinstance(exc, SanicException))
            return _error(etsi.ApiError(503, "internal error of the KME; nothing was taken"))
        if request is not None and request.transport is not None:
            try:
                caller(request)
            except etsi.ApiError as e:
                return _error(e)
        if status == 404:
            msg = (f"no such endpoint: {request.path[:80] if request else '?'} (endpoints: "
                   f"{BASE}/{{SAE_ID}}/status, enc_keys, dec_keys)")
        elif status == 405:
            msg = f"method {request.method if request else '?'} is not allowed here"
        elif status == 413:
            msg = f"request body larger than {etsi.MAX_BODY} bytes"
        else:
            msg = f"bad request: {str(exc)[:120]}"
        return _error(etsi.bad(msg))

    del status, enc_keys, dec_keys, _open, _stopping, _close, _any_error
    return app


# A worker stopping has graceful_shutdown_s to drain its requests, then this long to give
# its hands back and close its line to the key manager (api.hand_keeper: at most 1 s for
# refills in flight, 1.5 s for the give-backs; api.gkm_link: 2 s for words on answers).
STOP_EXTRA_S = 5.0


def _worker(app: Sanic, ctx: ssl.SSLContext, manager: int, sock: socket.socket,
            hand_counts: HandCounts) -> None:
    """One worker: Sanic in single-process mode on the shared listening socket. SIGTERM
    (from the manager, or the kernel when the manager dies) finishes what is in flight.
    Its hands count in ``hand_counts``, its slot's row of the manager's table."""
    from control.core.lifecycle import die_with_parent

    for sig in (signal.SIGTERM, signal.SIGINT):  # Sanic installs its own when it serves
        signal.signal(sig, signal.SIG_DFL)
    die_with_parent()
    if os.getppid() != manager:  # the manager died before the line above took effect
        raise SystemExit(0)
    app.ctx.hand_counts = hand_counts
    app.prepare(sock=sock, ssl=ctx, single_process=True, access_log=False, motd=False,
                protocol=_Protocol)
    # The TLS handshake too must be over within SILENT_S: asyncio's default is 60 s, and
    # Sanic's timeouts start only after it, so a connection that never sent a ClientHello
    # held a descriptor of the worker for a minute (prepare() takes no such setting;
    # serve_single passes these settings on to create_server).
    try:
        app.state.server_info[0].settings["asyncio_server_kwargs"] = {
            "ssl_handshake_timeout": SILENT_S}
    except (AttributeError, IndexError, TypeError) as e:  # another Sanic: serve anyway
        log.warning("key API: cannot bound the TLS handshake with this Sanic (%s); a "
                    "connection may stay silent 60 s before its handshake", e)
    Sanic.serve_single(app)


def serve(topo: Topology, node: str) -> None:
    """Run the node's key API until SIGTERM/SIGINT; requests in flight then get
    ``[api] graceful_shutdown_s`` to finish."""
    spec = topo.node(node)
    ctx = server_context(topo.api.pki, node)
    # The router adds the node's address; binding before it has would fail the module.
    if not wait_for_address(str(spec.address)):
        raise SystemExit(f"key API {node}: the node address {spec.address} never appeared")
    sock = bind_listener(str(spec.address), topo.ports.api)
    app = make_app(topo, node, limiter=sae_limiter(topo, node, shared=True))
    log.info("key API %s: https://%s:%d%s, %d worker(s)", node, spec.address,
             topo.ports.api, BASE, topo.api.workers)
    # Workers are forked from this process: the app and TLS context are inherited, each
    # worker opens its own line to the key manager when it starts.
    manager = os.getpid()
    hands = HandTable(topo.api.workers)
    pool = WorkerPool(topo.api.workers,
                      lambda s, i: _worker(app, ctx, manager, s, hands.row(i)), sock,
                      paths.node_dir(topo.prefix, node) / "api.json",
                      grace_s=topo.api.graceful_shutdown_s + STOP_EXTRA_S, hands=hands)
    pool.run()


def api_main(config_path: str, node: str) -> None:
    from control.core.config import load_topology
    from control.core.lifecycle import die_with_parent
    from control.core.logs import setup_logging

    die_with_parent()
    setup_logging()
    topo = load_topology(config_path)
    serve(topo, node)
