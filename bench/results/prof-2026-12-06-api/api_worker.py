"""The real key API app (api.server.make_app), one Sanic worker, its line to the key
manager pointed at fake_gkm.py's socket. Arguments: config host port socket."""
import sys
from pathlib import Path

import api.gkm_link as gkm_link

gkm_link.socket_path = lambda prefix, node: Path(sys.argv[4])

from sanic import Sanic  # noqa: E402

from api.pool import bind_listener  # noqa: E402
from api.server import make_app, sae_limiter, server_context  # noqa: E402
from control.core.config import load_topology  # noqa: E402

topo = load_topology(sys.argv[1])
ctx = server_context(topo.api.pki, "A")
sock = bind_listener(sys.argv[2], int(sys.argv[3]))
app = make_app(topo, "A", name="fakeapi", limiter=sae_limiter(topo, "A", shared=True))
app.prepare(sock=sock, ssl=ctx, single_process=True, access_log=False, motd=False)
Sanic.serve_single(app)
