"""The node's Prometheus endpoint: HTTP on ``<node address>:<[metrics] port>``.

A supervisor module like the others. It reads the status files only when scraped, so an
idle endpoint costs nothing; a small threaded WSGI server, because a scrape takes
milliseconds and a slow client must not hold up the next one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from control.core.address import wait_for_address
from control.core.config import Topology, load_topology
from control.core.lifecycle import die_with_parent, run_until_stopped
from control.core.logs import setup_logging
from control.node.metrics import node_registry

log = logging.getLogger("qkdnet.metrics")
POLL_S = 0.5  # how soon a stop request is noticed
MAX_CLIENTS = 16  # connections served at once; more are closed at once
CLIENT_TIMEOUT_S = 10.0  # a connection, however it trickles, is closed after this long


class _Server(ThreadingMixIn, WSGIServer):
    """Threaded, but bounded: any process that can reach the node address can connect,
    and an idle connection would otherwise hold a thread for good."""

    daemon_threads = True

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        # A deadline for the whole connection, not per read: a client trickling a byte
        # every few seconds would otherwise keep its slot for days.
        timer = threading.Timer(_QuietHandler.timeout, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A client that timed out or went away is not worth a traceback in the node's
        log (anyone who reaches the address could fill it); anything else is."""
        kind = sys.exc_info()[0]
        if kind is not None and issubclass(kind, (TimeoutError, ConnectionError, OSError)):
            return
        super().handle_error(request, client_address)


def _cut(sock) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _QuietHandler(WSGIRequestHandler):
    timeout = CLIENT_TIMEOUT_S  # each read's too (the socket's), within the deadline

    def log_message(self, *_: object) -> None:  # one line per scrape is noise
        pass


class MetricsServer:
    def __init__(self, topo: Topology, node: str):
        self.topo, self.node = topo, topo.node(node)
        self.app = make_wsgi_app(node_registry(topo, node))
        self.stop = False

    def _bind(self) -> _Server | None:
        """The router gives the node its address; until it has, binding fails: wait."""
        host, port = str(self.node.address), self.topo.metrics.port
        if not wait_for_address(host, lambda: self.stop, timeout_s=float("inf")):
            return None
        srv = make_server(host, port, self.app, server_class=_Server,
                          handler_class=_QuietHandler)
        srv.timeout = POLL_S
        log.info("node %s: metrics on http://%s:%d/metrics", self.node.name, host, port)
        return srv

    def run(self) -> None:
        srv = self._bind()
        if srv is None:
            return
        try:
            while not self.stop:
                srv.handle_request()
        finally:
            srv.server_close()


def metrics_main(config_path: str, node: str) -> None:

    die_with_parent()
    setup_logging()
    server = MetricsServer(load_topology(config_path), node)
    run_until_stopped(server)
