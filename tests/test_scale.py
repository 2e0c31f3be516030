"""Scale (issue 6/6, item 4): the shipped 16-node ring comes up in namespaces on a small
machine, relays global key end to end between its two farthest nodes (8 hops, seven
trusted relays) to SAEs that fetch it through the ETSI 014 API, and tears down leaving
nothing. The shipped 3x3 grid comes up and relays key between opposite corners."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import ssl
import subprocess
from pathlib import Path

import pytest
from pyroute2 import netns as pnetns

from control import emulation, paths
from control.config import Topology, load_topology, parse_topology
from control.routing import LinkEnds, next_hops
from tests.nsutil import QKDCTL, router_state, run_in_netns, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
API = "/api/v1/keys"


def example_as(tmp_path: Path, name: str, prefix: str) -> Topology:
    """The shipped example, unchanged but for its prefix (each run its own)."""
    text, n = re.subn(r'^prefix = "[a-z0-9]+"', f'prefix = "{prefix}"',
                      (EXAMPLES / name).read_text(), count=1, flags=re.M)
    assert n == 1, f"examples/{name} names no prefix"
    path = tmp_path / name
    path.write_text(text)
    return load_topology(path)


def qkdctl(*args: str) -> str:
    res = subprocess.run([QKDCTL, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


LOOPS: list[list[str]] = []  # loops seen while following routes (reported on a timeout)


def route(topo: Topology, src: str, dst: str) -> list[str]:
    """The nodes a packet from ``src`` to ``dst`` crosses, following each router's route
    ([] if some router has none just now, or the routes read form a loop: routers read
    one after another may be caught mid-change; a loop that persists fails the wait)."""
    nodes = [src]
    while nodes[-1] != dst:
        via = ((router_state(topo.prefix, nodes[-1]) or {}).get("routes", {}).get(dst)
               or {}).get("via")
        if via is None:
            return []  # no route just now (a link seen down for a moment)
        nodes.append(topo.link(via).peer_of(nodes[-1]))
        if len(nodes) > len(topo.nodes):
            LOOPS.append(nodes)
            return []
    return nodes


def wait_route(topo: Topology, src: str, dst: str, hops: int, timeout: float) -> list[str]:
    """``src``'s route to ``dst`` over ``hops`` links, within ``timeout``."""
    LOOPS.clear()
    try:
        return wait_until(lambda: (p := route(topo, src, dst)) and len(p) - 1 == hops and p,
                          timeout, f"{src}'s route to {dst} over {hops} hops")
    except AssertionError as e:
        raise AssertionError(f"{e}; loops seen: {len(LOOPS)}, last {LOOPS[-1:]}") from None


def wait_routes(topo: Topology, timeout: float = 90) -> None:
    """Every node has had a route to every other (not necessarily all at the same moment:
    on an overloaded machine a late keepalive takes a link down for a second); says what
    each node lacks if not in time."""
    seen: set[str] = set()

    def complete() -> bool:
        seen.update(n for n in set(topo.nodes) - seen
                    if len((router_state(topo.prefix, n) or {}).get("routes", {}))
                    == len(topo.nodes) - 1)
        return len(seen) == len(topo.nodes)

    try:
        wait_until(complete, timeout, "every node's route to every other")
    except AssertionError as e:
        lacks = {n: sorted(set(topo.nodes) - {n} - set((router_state(topo.prefix, n) or
                                                        {}).get("routes", {})))
                 for n in set(topo.nodes) - seen}
        raise AssertionError(f"{e}; missing routes: {lacks}") from None


def gkm_peer(prefix: str, node: str, peer: str) -> dict:
    try:
        st = json.loads((paths.node_dir(prefix, node) / "gkm.json").read_text())
        return st["peers"][peer]
    except (OSError, ValueError, KeyError):
        return {}


def tunnel_tx(prefix: str, node: str, link: str) -> int:
    try:
        st = json.loads((paths.node_dir(prefix, node) / f"tun-{link}.json").read_text())
        return st["counters"]["tx_bytes"]
    except (OSError, ValueError, KeyError):
        return 0


def https_get(pki: str, sae: str, host: str, port: int, path: str) -> tuple[int, dict]:
    """One request of SAE ``sae`` (its certificate, mutual TLS) to a KME; runs inside the
    SAE's node namespace."""
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    ctx.load_cert_chain(f"{pki}/saes/{sae}.crt", f"{pki}/saes/{sae}.key")
    c = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def api(topo: Topology, sae: str, path: str) -> tuple[int, dict]:
    node = topo.sae_node(sae)
    return run_in_netns(paths.netns_name(topo.prefix, node), https_get, str(topo.api.pki), sae,
                        str(topo.node(node).address), topo.ports.api, path, timeout=60)


def processes_of(topo: Topology) -> list[int]:
    pids = []
    for node in topo.nodes:
        pids += emulation._pids_in_netns(paths.netns_name(topo.prefix, node))
    man = emulation.Manifest.load(topo.prefix)
    return sorted(set(pids) | set(man.pids.values() if man else ()))


def assert_nothing_left(topo: Topology, pids: list[int]) -> None:
    assert [ns for ns in pnetns.listnetns() if ns.startswith(topo.prefix + "-")] == []
    assert not paths.network_dir(topo.prefix).exists()
    assert paths.ring_names_of_network(topo.prefix) == []
    assert [p for p in pids if emulation._alive(p)] == []


def relays_key(topo: Topology, master: str, slave: str, hops: int) -> None:
    """Global key between the SAEs' nodes crossed ``hops`` links (each relay forwarded the
    whole store between OTP tunnels and keeps no global key of its own) and both SAEs
    get the same key through their own KMEs."""
    a, b = topo.sae_node(master), topo.sae_node(slave)
    high = topo.gkm.high_watermark
    for o, d in ((a, b), (b, a)):
        wait_until(lambda o=o, d=d: gkm_peer(topo.prefix, o, d).get("enc", {}).get("usable")
                   == high and gkm_peer(topo.prefix, d, o).get("dec", {}).get("stored")
                   == high, 90, f"{o}'s global key store for {d} full and stored at {d}")
    path = wait_route(topo, a, b, hops, 30)
    wait_route(topo, b, a, hops, 30)
    for here, nxt in zip(path[1:-1], path[2:], strict=False):
        assert not (paths.node_dir(topo.prefix, here) / "gkm.json").exists(), \
            f"relay {here} runs a global key manager"
        link = next(lk.name for lk in topo.links_of(here) if lk.peer_of(here) == nxt)
        wait_until(lambda h=here, lk=link: tunnel_tx(topo.prefix, h, lk) >= high, 5,
                   f"{here} forwarding {a}'s global key on {link}")
    # Keys through the ETSI 014 API, over mutual TLS, both ways round.
    for m, s in ((master, slave), (slave, master)):
        wait_until(lambda m=m, s=s: api(topo, m, f"{API}/{s}/status")[0] == 200, 60,
                   f"{m}'s key API")
        status, enc = api(topo, m, f"{API}/{s}/enc_keys?number=2&size=256")
        assert status == 200, enc
        for k in enc["keys"]:
            status, dec = api(topo, s, f"{API}/{m}/dec_keys?key_ID={k['key_ID']}")
            assert status == 200, dec
            assert dec["keys"] == [k] and len(base64.b64decode(k["key"])) == 32
            assert api(topo, s, f"{API}/{m}/dec_keys?key_ID={k['key_ID']}")[0] != 200


def _up_relay_down(topo, master: str, slave: str, hops: int) -> None:
    """net up, wait for every route, relay keys between two SAEs, net down; then check
    that nothing of the network is left, also when the relay failed."""
    pids: list[int] = []
    try:
        qkdctl("net", "up", str(topo.path))
        wait_routes(topo)
        pids = processes_of(topo)
        relays_key(topo, master, slave, hops=hops)
    finally:
        pids = sorted(set(pids) | set(processes_of(topo)))
        qkdctl("net", "down", str(topo.path))
    assert_nothing_left(topo, pids)


@pytest.mark.netns
def test_ring16_relays_global_key_over_eight_hops_and_leaves_nothing(tmp_path, prefix):
    topo = example_as(tmp_path, "ring16.toml", prefix)
    assert len(topo.nodes) == 16 and len(topo.links) == 16
    qkdctl("check", str(topo.path))
    _up_relay_down(topo, "SAE-1", "SAE-9", hops=8)


@pytest.mark.netns
def test_grid9_relays_global_key_between_opposite_corners(tmp_path, prefix):
    topo = example_as(tmp_path, "grid9.toml", prefix)
    assert len(topo.nodes) == 9 and len(topo.links) == 12
    _up_relay_down(topo, "SAE-A1", "SAE-C3", hops=4)


# ---- bench relay's network and report (no namespaces) -----------------------------------

def bench_topology(hops: tuple[int, ...]) -> Topology:
    from bench.relay import HEAD, RelayNet, ring_topology

    assert RelayNet.TAG == "br"
    text = HEAD.format(workers=1, pairs=", ".join(f'["N1", "N{1 + h}"]' for h in hops)) \
        + ring_topology(16, 212, max(hops))
    return parse_topology(text.format(prefix="brtest", ring="48MiB", block=1 << 20,
                                      low=16 << 20, high=32 << 20, window=16 << 20))


def test_bench_relay_routes_each_hop_count_over_the_first_links_with_large_rings():
    """The bench relies on the routers' tie-break: N(1+h) -> N1 crosses links 0 .. h-1,
    the only ones with rings large enough for a point's key."""
    topo = bench_topology((1, 2, 4, 8))
    ends = [LinkEnds(lk.name, lk.index, lk.a, lk.b) for lk in topo.links]
    up = {lk.name for lk in topo.links}
    from bench.relay import expected_path

    for h in (1, 2, 4, 8):
        node, crossed, visited = f"N{1 + h}", [], [f"N{1 + h}"]
        while node != "N1":
            link = topo.link(next_hops(ends, up, node)["N1"])
            crossed.append(link.index)
            node = link.peer_of(node)
            visited.append(node)
        assert sorted(crossed) == list(range(h))
        assert visited == expected_path(h)  # what the bench waits for before measuring
        assert topo.gkm.destinations_of(f"N{1 + h}") == ["N1"]
    for lk in topo.links:
        big = lk.index < 8
        assert lk.ring_capacity == (48 << 20 if big else 8 << 20)
        assert lk.ratio == ((1, 3) if big else (1, 1))  # 3/4 of the key b -> a, towards N1
    assert topo.gkm.origins_of("N5") == ["N1"] and topo.gkm.destinations_of("N7") == []


def test_bench_relay_refuses_hop_counts_the_ring_cannot_hold():
    from bench.otp import BenchError
    from bench.relay import check

    check((1, 2, 4, 8), 16)
    for hops, nodes in (((9,), 16), ((0, 1), 16), ((), 16), ((1,), 2)):
        with pytest.raises(BenchError):
            check(hops, nodes)


def test_bench_relay_report_ratios_and_verdict(tmp_path):
    from rich.console import Console

    from bench.relay import summarize

    points = [{"hops": h, "gbps": g, "seconds": 0.5} for h, g in ((1, 1.2), (2, 0.9), (8, 0.3))]
    quiet = Console(file=io.StringIO())
    r = summarize(points, tmp_path / "relay.png", quiet)
    assert r["gbps_at_1_hop"] == 1.2 and r["max_hops"] == 8 and r["gbps_at_max_hops"] == 0.3
    assert r["ratio_max_hops_vs_1_hop"] == pytest.approx(0.25)
    assert r["ratio_vs_paper_at_max_hops"] == pytest.approx(300 / 85)
    assert [p["hop_gbps"] for p in r["points"]] == pytest.approx([1.2, 1.8, 2.4])
    assert r["keeps_advantage"] is True and (tmp_path / "relay.png").stat().st_size > 0
    slow = summarize([{"hops": 1, "gbps": 0.5, "seconds": 1}, {"hops": 4, "gbps": 0.08,
                                                               "seconds": 1}],
                     None, quiet)
    assert slow["keeps_advantage"] is False and "plot" not in slow
