"""The node's Prometheus endpoint: HTTP on ``<node address>:<[metrics] port>``.

A supervisor module like the others. It reads the status files only when scraped, so an
idle endpoint costs nothing; a small threaded WSGI server, because a scrape takes
milliseconds and a slow client must not hold up the next one.
"""

from __future__ import annotations

import logging
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


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
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
