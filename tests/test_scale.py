"""Scale (issue 6/6, item 4): the shipped 16-node ring comes up in namespaces on a small
machine, relays global key end to end between its two farthest nodes (8 hops, seven
trusted relays) to SAEs that fetch it through the ETSI 014 API, and tears down leaving
nothing. The shipped 3x3 grid comes up and relays key between opposite corners."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from pathlib import Path

import pytest

from bench.scale import api, copy_as, gkm_peer, leftovers, processes_of, wait_route, wait_routes
from control.core import paths
from control.core.config import Topology, parse_topology
from control.routing.linkstate import LinkEnds, next_hops
from tests.nsutil import QKDCTL, wait_until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
API = "/api/v1/keys"


def example_as(tmp_path: Path, name: str, prefix: str) -> Topology:
    """The shipped example, unchanged but for its prefix (each run its own)."""
    return copy_as(EXAMPLES / name, prefix, tmp_path)


def qkdctl(*args: str) -> str:
    res = subprocess.run([QKDCTL, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def tunnel_tx(prefix: str, node: str, link: str) -> int:
    try:
        st = json.loads((paths.node_dir(prefix, node) / f"tun-{link}.json").read_text())
        return st["counters"]["tx_bytes"]
    except (OSError, ValueError, KeyError):
        return 0


def assert_nothing_left(topo: Topology, pids: list[int]) -> None:
    assert leftovers(topo, pids) == []


def layers(topo: Topology, origin: str) -> list[set[str]]:
    """The nodes by their hop distance from ``origin`` (breadth first)."""
    out, seen = [{origin}], {origin}
    while True:
        nxt = {lk.peer_of(n) for n in out[-1] for lk in topo.links_of(n)} - seen
        if not nxt:
            return out
        out.append(nxt)
        seen |= nxt


def forward_bytes(topo: Topology, origin: str, depth: int) -> int:
    """Bytes the tunnels from distance ``depth`` to ``depth + 1`` (from ``origin``) sent
    outward: every path from ``origin`` crosses that cut forward at least once, whichever
    relays the routers chose then (with ties, a route may move while routes converge)."""
    lay = layers(topo, origin)
    return sum(tunnel_tx(topo.prefix, n, lk.name) for n in lay[depth]
               for lk in topo.links_of(n) if lk.peer_of(n) in lay[depth + 1])


def relays_key(topo: Topology, master: str, slave: str, hops: int) -> None:
    """Global key between the SAEs' nodes crossed ``hops`` links (the relays forwarded
    the whole store between OTP tunnels and keep no global key of their own) and both
    SAEs get the same key through their own KMEs."""
    a, b = topo.sae_node(master), topo.sae_node(slave)
    high = topo.gkm.high_watermark
    for o, d in ((a, b), (b, a)):
        wait_until(lambda o=o, d=d: gkm_peer(topo.prefix, o, d).get("enc", {}).get("usable")
                   == high and gkm_peer(topo.prefix, d, o).get("dec", {}).get("stored")
                   == high, 90, f"{o}'s global key store for {d} full and stored at {d}")
    path = wait_route(topo, a, b, hops, 30)
    wait_route(topo, b, a, hops, 30)
    for relay in path[1:-1]:
        assert not (paths.node_dir(topo.prefix, relay) / "gkm.json").exists(), \
            f"relay {relay} runs a global key manager"
    # Each store crossed every cut between its origin and destination: layer by layer,
    # the relays at that distance sent at least the whole store outward.
    for o in (a, b):
        assert len(layers(topo, o)) == hops + 1
        for depth in range(hops):
            wait_until(lambda o=o, d=depth: forward_bytes(topo, o, d) >= high, 60,
                       lambda o=o, d=depth: f"{o}'s global key sent outward from hop {d}"
                       f" to {d + 1} (so far {forward_bytes(topo, o, d)} of {high} B)")
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
        wait_routes(topo, 90)
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
    from bench.harness import BenchError
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
