"""The real key API app as api_worker.py serves it, with one part swapped, to find where
a worker's time per request goes (variants.py). Arguments: config host port socket
variant, the variant one of:
  ours          unchanged;
  no_hand       the hand answers a constant key at once (no hand, no refills);
  const_send    the key container is a constant (not built from the keys);
  parse_cached  the query string's checks done once per query string;
  barehandler   the enc_keys handler is bench.bare_api's (a constant answer);
  gcfreeze      gc.freeze() once started; gcoff: the collector off.
"""
import gc
import sys
from pathlib import Path

import api.gkm_link as gkm_link

gkm_link.socket_path = lambda prefix, node: Path(sys.argv[4])

from sanic import Sanic  # noqa: E402
from sanic.response import HTTPResponse  # noqa: E402

import api.hand_keeper as hk  # noqa: E402
from api import server  # noqa: E402
from api.pool import bind_listener  # noqa: E402
from api.server import JSON, make_app, sae_limiter, server_context  # noqa: E402
from bench.bare_api import KEY_ID, container  # noqa: E402
from control.core.config import load_topology  # noqa: E402

variant = sys.argv[5]
topo = load_topology(sys.argv[1])
ctx = server_context(topo.api.pki, "A")
sock = bind_listener(sys.argv[2], int(sys.argv[3]))
answer = container(256)

if variant == "no_hand":
    hk.HandKeeper.serve = lambda self, pair, number: ([KEY_ID], [bytearray(pair[3])])
if variant == "const_send":
    async def _send_keys(request, ids, keys):
        return HTTPResponse(answer[0], content_type=JSON)
    server._send_keys = _send_keys
if variant == "parse_cached":
    cache: dict = {}
    parse = server._parse

    def _parse(request, from_query, from_body, limits):
        qs = request.query_string
        if qs not in cache:
            cache[qs] = parse(request, from_query, from_body, limits)
        return cache[qs]
    server._parse = _parse

app = make_app(topo, "A", name="fakeapi", limiter=sae_limiter(topo, "A", shared=True))

if variant == "barehandler":
    async def bare_handler(request, slave):
        return HTTPResponse(answer[0], content_type=JSON)
    for r in app.router.routes:
        if r.path.endswith("enc_keys"):
            r.handler = bare_handler
if variant in ("gcfreeze", "gcoff"):
    @app.before_server_start
    async def _gc(app):
        gc.freeze() if variant == "gcfreeze" else gc.disable()

app.prepare(sock=sock, ssl=ctx, single_process=True, access_log=False, motd=False)
Sanic.serve_single(app)
