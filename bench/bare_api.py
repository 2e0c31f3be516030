"""The key API's ceiling: a bare Sanic HTTPS endpoint with mutual TLS that answers every
``enc_keys`` with a constant key container of the asked size; no key manager, no store,
no reservation.

It runs as the key API does (the node's TLS context from ``api.server.server_context``,
the same Sanic settings, forked workers, freed memory kept), in the node's namespace on
the node's address, one port above the key API's, and answers the way the key API does
(small containers in one body, large ones in pieces under a Content-Length). So the same
load generator (``bench.api_load``) measures Sanic, TLS and HTTP at best on this
machine, and the key API's figure is read as a share of that.

``python -m bench.bare_api --pki DIR --node A --host ADDR --port N --workers W`` serves
until SIGTERM; :func:`endpoint` runs it for the time of a ``with`` block.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sanic import Sanic
from sanic.request import Request
from sanic.response import HTTPResponse

from api.etsi import key_container_parts
from api.server import BASE, JSON, server_context

KEY_ID = str(uuid.UUID(int=1))


def container(bits: int) -> list[bytes]:
    """The key container of one key of ``bits`` bits, in the pieces it is sent in."""
    return key_container_parts([KEY_ID], [os.urandom(bits // 8)])


def make_app(name: str = "qkdnet_bare_api") -> Sanic:
    app = Sanic(name, configure_logging=False)
    app.config.KEEP_ALIVE_TIMEOUT = 75
    app.config.MOTD = False
    app.config.ACCESS_LOG = False
    answers: dict[int, list[bytes]] = {}

    @app.before_server_start
    async def _open(app: Sanic) -> None:
        from control.core.lifecycle import die_with_parent
        from control.core.memory import keep_freed_memory

        die_with_parent()
        keep_freed_memory()

    @app.get(f"{BASE}/<slave:str>/enc_keys")
    async def enc_keys(request: Request, slave: str) -> HTTPResponse | None:
        bits = int(request.args.get("size", "256"))
        parts = answers.get(bits) or answers.setdefault(bits, container(bits))
        if len(parts) == 1:
            return HTTPResponse(parts[0], content_type=JSON)
        response = await request.respond(
            content_type=JSON, headers={"content-length": str(sum(len(p) for p in parts))})
        for p in parts:
            await response.send(p)
        return None

    del enc_keys, _open
    return app


def serve(pki: Path, node: str, host: str, port: int, workers: int) -> None:
    ctx = server_context(pki, node)
    app = make_app()
    multiprocessing.set_start_method("fork", force=True)
    Sanic.start_method = "fork"
    Sanic.START_METHOD_SET = True
    app.prepare(host=host, port=port, ssl=ctx, workers=workers, access_log=False,
                motd=False)
    Sanic.serve(primary=app)


def probe(pki: str, host: str, port: int):
    """One enc_keys request as SAE-A; its status (in a ``Pull``, as ``run_in`` wants)."""
    from api.client import Conn, client_context
    from bench.api_load import Pull

    try:
        c = Conn(host, port, client_context(pki, "SAE-A"))
    except OSError as e:
        return Pull(error=str(e))
    try:
        return Pull(stop_status=c.get(f"{BASE}/SAE-B/enc_keys?number=1&size=256")[0])
    finally:
        c.close()


@contextlib.contextmanager
def endpoint(ns: str, pki: Path, node: str, host: str, port: int, workers: int,
             log: Path, timeout: float = 60.0) -> Iterator[None]:
    """The bare endpoint in namespace ``ns`` for the block's time; its process group is
    stopped after, even on failure or Ctrl-C."""
    from bench.api_load import run_in
    from bench.harness import BenchError

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-P", "-m",
                                 "bench.bare_api", "--pki", str(pki), "--node", node,
                                 "--host", host, "--port", str(port),
                                 "--workers", str(workers)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise BenchError(f"the bare Sanic endpoint exited ({proc.returncode}); "
                                 f"see {log}")
            r = run_in(ns, [(probe, (str(pki), host, port))], 10)[0]
            if r.stop_status == 200:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the bare Sanic endpoint did not answer within "
                                 f"{timeout:.0f} s ({r.error or r.stop_status}); see {log}")
            time.sleep(0.3)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):  # any worker still there
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args()
    serve(a.pki, a.node, a.host, a.port, a.workers)


if __name__ == "__main__":
    main()
