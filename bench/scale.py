"""`qkdctl bench scale CONFIG`: a shipped network (the 16-node ring, the 3x3 grid, the
32-node ring, ...) comes up on this machine and relays global key between the SAEs of its
first key pair, end to end through the key API; then it goes down leaving nothing.

Timed, from `net up`: every node's route to every other (`routes_s`), the pair's first
usable global key both ways (`first_key_s`), both stores full (`full_s`). Measured: the
processes the network ran and the memory the machine lent it (MemAvailable before and
at the full stores), the path the key crossed, and that two keys each way taken at one
KME were delivered, identical, at the other and refused the second time. The helpers are
shared with ``tests/test_scale.py``, which runs the 16-node ring and the grid.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console

from bench.harness import BenchError, wait_until
from control.core import paths
from control.core.config import Topology, load_topology
from control.core.statefile import read_status
from control.tools import emulation

API = "/api/v1/keys"
LOOPS: list[list[str]] = []  # loops seen while following routes (reported on a timeout)


def with_prefix(text: str, prefix: str, src: Path) -> str:
    """The network file text ``text`` (of ``src``) with its prefix set to ``prefix``."""
    text, n = re.subn(r'^prefix = "[a-z0-9]+"', f'prefix = "{prefix}"', text, count=1,
                      flags=re.M)
    if n != 1:
        raise BenchError(f"{src} names no prefix")
    return text


def copy_as(src: Path, prefix: str, out_dir: Path) -> Topology:
    """The network file ``src`` unchanged but for its prefix (each run its own)."""
    path = out_dir / src.name
    path.write_text(with_prefix(src.read_text(), prefix, src))
    return load_topology(path)


def router_state(prefix: str, node: str) -> dict:
    return read_status(paths.node_dir(prefix, node) / "router.json") or {}


def route(topo: Topology, src: str, dst: str) -> list[str]:
    """The nodes a packet from ``src`` to ``dst`` crosses, following each router's route
    ([] if some router has none just now, or the routes read form a loop: routers read
    one after another may be caught mid-change; a loop that persists fails the wait)."""
    nodes = [src]
    while nodes[-1] != dst:
        via = (router_state(topo.prefix, nodes[-1]).get("routes", {}).get(dst) or {}) \
            .get("via")
        if via is None:
            return []  # no route just now (a link seen down for a moment)
        nodes.append(topo.link(via).peer_of(nodes[-1]))
        if len(nodes) > len(topo.nodes):
            LOOPS.append(nodes)
            return []
    return nodes


def wait_route(topo: Topology, src: str, dst: str, hops: int | None, timeout: float
               ) -> list[str]:
    """``src``'s route to ``dst`` (over ``hops`` links if given), within ``timeout``."""
    LOOPS.clear()
    try:
        return wait_until(lambda: (p := route(topo, src, dst)) and
                          (hops is None or len(p) - 1 == hops) and p,
                          timeout, f"{src}'s route to {dst}"
                          + (f" over {hops} hops" if hops else ""))
    except BenchError as e:
        raise BenchError(f"{e}; loops seen: {len(LOOPS)}, last {LOOPS[-1:]}") from None


def wait_routes(topo: Topology, timeout: float) -> None:
    """Every node has had a route to every other (not necessarily all at the same moment:
    on an overloaded machine a late keepalive may take a link down for a second); says
    what each node lacks if not in time."""
    seen: set[str] = set()

    def complete() -> bool:
        seen.update(n for n in set(topo.nodes) - seen
                    if len(router_state(topo.prefix, n).get("routes", {}))
                    == len(topo.nodes) - 1)
        return len(seen) == len(topo.nodes)

    try:
        wait_until(complete, timeout, "every node's route to every other")
    except BenchError as e:
        lacks = {n: sorted(set(topo.nodes) - {n} - set(router_state(topo.prefix, n)
                                                       .get("routes", {})))
                 for n in set(topo.nodes) - seen}
        raise BenchError(f"{e}; missing routes: {lacks}") from None


def gkm_peer(prefix: str, node: str, peer: str) -> dict:
    st = read_status(paths.node_dir(prefix, node) / "gkm.json") or {}
    return (st.get("peers") or {}).get(peer) or {}


def https_get(pki: str, sae: str, host: str, port: int, path: str) -> tuple[int, dict]:
    """One request of SAE ``sae`` (its certificate, mutual TLS) to a KME; runs inside the
    SAE's node namespace."""
    import json

    from api.client import Conn, client_context

    c = Conn(host, port, client_context(pki, sae))
    try:
        status, body = c.get(path)
        return status, json.loads(body)
    finally:
        c.close()


def api(topo: Topology, sae: str, path: str) -> tuple[int, dict]:
    from api.client import run_in_netns

    node = topo.sae_node(sae)
    r = run_in_netns(paths.netns_name(topo.prefix, node),
                     [(https_get, (str(topo.api.pki), sae, str(topo.node(node).address),
                                   topo.ports.api, path))], 60)[0]
    if isinstance(r, str):
        raise BenchError(f"{sae}'s call {path}: {r}")
    return r


def processes_of(topo: Topology) -> list[int]:
    pids = []
    for node in topo.nodes:
        pids += emulation._pids_in_netns(paths.netns_name(topo.prefix, node))
    man = emulation.Manifest.load(topo.prefix)
    return sorted(set(pids) | set(man.pids.values() if man else ()))


def leftovers(topo: Topology, pids: list[int]) -> list[str]:
    from pyroute2 import netns as pnetns

    out = [f"namespace {ns}" for ns in pnetns.listnetns() if ns.startswith(topo.prefix + "-")]
    if paths.network_dir(topo.prefix).exists():
        out.append(f"directory {paths.network_dir(topo.prefix)}")
    out += [f"ring {r}" for r in paths.ring_names_of_network(topo.prefix)]
    out += [f"process {p}" for p in pids if emulation._alive(p)]
    return out


def stores_full(topo: Topology, a: str, b: str) -> bool:
    high = topo.gkm.high_watermark
    return all(gkm_peer(topo.prefix, o, d).get("enc", {}).get("usable") == high
               and gkm_peer(topo.prefix, d, o).get("dec", {}).get("stored") == high
               for o, d in ((a, b), (b, a)))


def exchange(topo: Topology, master: str, slave: str, number: int = 2) -> None:
    """``number`` keys taken by ``master`` at its KME, fetched by ``slave`` at its own,
    identical, and refused the second time."""
    status, enc = api(topo, master, f"{API}/{slave}/enc_keys?number={number}&size=256")
    if status != 200:
        raise BenchError(f"{master}'s enc_keys answered {status}: {enc}")
    for k in enc["keys"]:
        status, dec = api(topo, slave, f"{API}/{master}/dec_keys?key_ID={k['key_ID']}")
        if status != 200 or dec["keys"] != [k] or len(base64.b64decode(k["key"])) != 32:
            raise BenchError(f"{slave}'s dec_keys for {k['key_ID']}: {status} {dec}")
        again = api(topo, slave, f"{API}/{master}/dec_keys?key_ID={k['key_ID']}")[0]
        if again == 200:
            raise BenchError(f"{slave} got key {k['key_ID']} twice")


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run(config: Path, timeout: float = 600.0, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    tmp = Path(tempfile.mkdtemp(prefix="qkdnet-scale-"))
    topo = copy_as(config, "bc" + uuid.uuid4().hex[:6], tmp)
    if not topo.gkm.pairs or not topo.saes:
        raise BenchError(f"{config} keeps no global key between SAEs: nothing to relay")
    a, b = topo.gkm.pairs[0]
    master = next((s.id for s in topo.saes if s.node == a), None)
    slave = next((s.id for s in topo.saes if s.node == b), None)
    if master is None or slave is None:
        raise BenchError(f"{config}: no SAE at {a} or at {b}, the first key pair")
    qkdctl = [sys.executable, "-P", "-m", "control.tools.cli"]  # (-P: see emulation._spawn)
    console.print(f"scale: {config.name}: {len(topo.nodes)} nodes, {len(topo.links)} links; "
                  f"global key {a} <-> {b}; prefix {topo.prefix}")
    mem0 = _mem_available()
    pids: list[int] = []
    out: dict = {"bench": "scale", "config": str(config), "nodes": len(topo.nodes),
                 "links": len(topo.links), "pair": [a, b]}
    t0 = time.monotonic()
    try:
        res = subprocess.run([*qkdctl, "net", "up", str(topo.path)], capture_output=True,
                             text=True, timeout=timeout)
        if res.returncode != 0:
            raise BenchError(f"net up failed: {(res.stdout + res.stderr)[-500:]}")
        out["up_s"] = round(time.monotonic() - t0, 1)
        console.print(f"  net up in {out['up_s']} s; waiting for every route ...")
        wait_routes(topo, timeout)
        out["routes_s"] = round(time.monotonic() - t0, 1)
        pids = processes_of(topo)
        out["processes"] = len(pids)
        console.print(f"  every route in {out['routes_s']} s ({len(pids)} processes); "
                      f"waiting for global key {a} <-> {b} ...")
        wait_until(lambda: all(gkm_peer(topo.prefix, o, d).get("enc", {}).get("usable")
                               for o, d in ((a, b), (b, a))), timeout, "the first global key")
        out["first_key_s"] = round(time.monotonic() - t0, 1)
        wait_until(lambda: stores_full(topo, a, b), timeout, "both stores full")
        out["full_s"] = round(time.monotonic() - t0, 1)
        out["memory_used_bytes"] = mem0 - _mem_available()
        path = wait_route(topo, a, b, None, 60)
        out["path"] = path
        out["hops"] = len(path) - 1
        console.print(f"  first key at {out['first_key_s']} s, stores full at "
                      f"{out['full_s']} s, over {out['hops']} hops; keys through the API ...")
        wait_until(lambda: api(topo, master, f"{API}/{slave}/status")[0] == 200, 120,
                   f"{master}'s key API")
        wait_until(lambda: api(topo, slave, f"{API}/{master}/status")[0] == 200, 120,
                   f"{slave}'s key API")
        exchange(topo, master, slave)
        exchange(topo, slave, master)
        out["keys_exchanged"] = 4
    finally:
        pids = sorted(set(pids) | set(processes_of(topo)))
        t1 = time.monotonic()
        subprocess.run([*qkdctl, "net", "down", str(topo.path)], capture_output=True,
                       timeout=timeout)
        out["down_s"] = round(time.monotonic() - t1, 1)
        left = leftovers(topo, pids)
        shutil.rmtree(tmp, ignore_errors=True)
    out["leftovers"] = left
    out["ok"] = not left and out.get("keys_exchanged") == 4
    return out


def report(r: dict, console: Console) -> None:
    console.print(
        f"scale {Path(r['config']).name}: {r['nodes']} nodes, {r['links']} links, "
        f"{r['processes']} processes, {r['memory_used_bytes'] / 2**30:.1f} GiB\n"
        f"  net up {r['up_s']} s; every route {r['routes_s']} s; first global key "
        f"{r['first_key_s']} s; stores full {r['full_s']} s ({r['pair'][0]} <-> "
        f"{r['pair'][1]}, {r['hops']} hops); net down {r['down_s']} s\n"
        f"  keys through the API both ways: {r.get('keys_exchanged', 0)}; left behind: "
        f"{r['leftovers'] or 'nothing'}", highlight=False)
