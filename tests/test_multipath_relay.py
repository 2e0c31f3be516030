"""Multipath relay end to end (``[gkm] paths = 2``) on the shipped 3x3 grid: real
namespaces, tunnels, routers and key managers. A1's global key for C3 leaves as two XOR
shares over two node-disjoint paths that every router agrees on; each relay carries one
share only; both SAEs get the same keys through their KMEs; with one of A1's two links
cut only one disjoint path is left and the default policy ("wait") sends nothing until
the link is back, while "fewer" sends over the one path left and counts those blocks."""

from __future__ import annotations

import base64
import re
import subprocess

import pytest
from rich.console import Console

from bench.scale import api, copy_as, gkm_peer, wait_routes
from control.core import paths
from control.core.config import Topology, load_topology
from control.gkm.manager import PAUSE_FLAG
from control.node.status import collect, render_global
from control.tools import emulation
from tests.nsutil import router_state, wait_until
from tests.test_scale import EXAMPLES, layers, tunnel_tx

pytestmark = pytest.mark.netns
API = "/api/v1/keys"
KEY_BITS = 256 * 1024 * 8  # one key per 256 KiB global key block


def grid(tmp_path, prefix: str, policy: str = "wait") -> Topology:
    """The shipped grid under ``prefix``, with two paths per pair and ``policy``."""
    topo = copy_as(EXAMPLES / "grid9.toml", prefix, tmp_path)
    text, n = re.subn(r"^\[gkm\]$", f'[gkm]\npaths = 2\npaths_policy = "{policy}"',
                      topo.path.read_text(), flags=re.M)
    assert n == 1
    topo.path.write_text(text)
    return load_topology(topo.path)


def multipath(topo: Topology, node: str) -> dict:
    return (router_state(topo.prefix, node) or {}).get("multipath", {}).get("A1>C3", {})


def relay_of(topo: Topology) -> dict:
    return gkm_peer(topo.prefix, "A1", "C3").get("relay") or {}


def forward_tx(topo: Topology, dist: dict[str, int]) -> dict[str, int]:
    """Per node, bytes its tunnels sent to nodes farther from A1 (A1's key goes that way;
    with C3 paused, only acknowledgements and keepalives come back)."""
    return {n: sum(tunnel_tx(topo.prefix, n, lk.name) for lk in topo.links_of(n)
                   if dist[lk.peer_of(n)] > dist[n]) for n in topo.nodes}


def settled_forward_tx(topo: Topology, dist: dict[str, int], block: int) -> dict[str, int]:
    """``forward_tx`` once no node's count moves by a block between two reads a second
    apart: the tunnel managers write their counters every half second, so right after a
    fill is acknowledged a relay's count may still lack the fill's last bytes, which a
    count taken then would put on the next window."""
    last: dict[str, int] = {}

    def steady() -> dict[str, int] | None:
        nonlocal last
        now, prev = forward_tx(topo, dist), last
        last = now
        return now if prev and all(now[n] - prev[n] < block for n in now) else None

    return wait_until(steady, 60, lambda: f"the tunnels' counters to settle: {last}", step=1.0)


def take(topo: Topology, number: int) -> list[dict]:
    status, body = api(topo, "SAE-A1", f"{API}/SAE-C3/enc_keys?number={number}"
                                       f"&size={KEY_BITS}")
    assert status == 200, body
    return body["keys"]


def set_underlay(topo: Topology, link: str, up: bool) -> None:
    lk = topo.link(link)
    subprocess.run(["ip", "-n", paths.netns_name(topo.prefix, lk.a), "link", "set",
                    emulation.underlay_ifname(lk.index), "up" if up else "down"],
                   check=True, timeout=30)


def start(topo: Topology) -> None:
    """The grid up with C3's key manager paused: only A1 originates, so every relayed
    byte going outward is A1's."""
    man = emulation.net_up(topo, start=False)
    flag = paths.node_dir(topo.prefix, "C3") / PAUSE_FLAG
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    emulation.start_processes(topo, man)
    wait_routes(topo, 90)


def test_two_shares_cross_disjoint_relays_and_the_wait_policy_holds(tmp_path, prefix):
    topo = grid(tmp_path, prefix)
    assert topo.gkm.paths == 2 and topo.gkm.paths_policy == "wait"
    high, block = topo.gkm.high_watermark, topo.gkm.block_size
    start(topo)

    # Every router computes the same two paths; they share no relay.
    def agreed():
        mine = multipath(topo, "A1")
        if len(mine.get("nodes", [])) != 2:
            return None
        on = {n for p in mine["nodes"] for n in p}
        return mine if all(multipath(topo, n).get("nodes") == mine["nodes"] for n in on) \
            else None

    mp = wait_until(agreed, 60, lambda: f"two disjoint paths A1 -> C3 that every router "
                                        f"on them agrees on: {multipath(topo, 'A1')}")
    p0, p1 = mp["nodes"]
    assert p0[0] == p1[0] == "A1" and p0[-1] == p1[-1] == "C3"
    assert len(p0) == len(p1) == 5 and not set(p0[1:-1]) & set(p1[1:-1]), mp
    wait_until(lambda: gkm_peer(prefix, "A1", "C3").get("enc", {}).get("usable") == high,
               120, lambda: f"A1's store for C3 full: {relay_of(topo)}")
    r = relay_of(topo)
    assert r["paths"]["up"] == 2 and r["paths"]["using"] == 2, r
    assert r["paths"]["degraded_blocks"] == 0 and r["paths"]["shares_sent"] >= 2 * high // block

    # A refill, counted: each relay sends on the one share it carries, and no other.
    dist = {n: d for d, layer in enumerate(layers(topo, "A1")) for n in layer}
    before = settled_forward_tx(topo, dist, block)
    acked = relay_of(topo)["acked_bytes"]
    keys = take(topo, 10)  # 2.5 MiB: under the low watermark, so A1 restocks to high
    refill = len(keys) * block
    wait_until(lambda: relay_of(topo)["acked_bytes"] >= acked + refill, 120,
               lambda: f"A1's store refilled: {relay_of(topo)}")
    assert multipath(topo, "A1")["nodes"] == mp["nodes"], "the paths moved during the refill"
    relays = (*p0[1:-1], *p1[1:-1])

    def sent() -> dict[str, int]:
        return {n: b - before[n] for n, b in forward_tx(topo, dist).items()}

    wait_until(lambda: all(sent()[r] >= refill for r in relays), 60,
               lambda: f"every relay's counters show its share of {refill} B: {sent()}")
    # A1 sent each block twice over (a share per path; resends are new shares, on both
    # paths): a relay that carried both shares would have sent as much as A1.
    now = sent()
    for relay in relays:
        assert now[relay] < 0.75 * now["A1"], (relay, now, refill)
    for other in set(topo.nodes) - set(p0) - set(p1):
        assert now[other] < 0.25 * refill, (other, now, refill)
    # The SAEs get the same keys, each through its own KME.
    for k in keys[:3]:
        status, dec = api(topo, "SAE-C3", f"{API}/SAE-A1/dec_keys?key_ID={k['key_ID']}")
        assert status == 200 and dec["keys"] == [k], dec
        assert len(base64.b64decode(k["key"])) == block

    # One of A1's two links cut: one disjoint path is left, and "wait" sends nothing.
    set_underlay(topo, "A1-A2", False)
    try:
        wait_until(lambda: relay_of(topo).get("paths", {}).get("up") == 1
                   and relay_of(topo)["paths"]["using"] == 0, 60,
                   lambda: f"A1 sees one disjoint path and waits: {relay_of(topo)}")
        shown = Console(width=220, record=True)
        shown.print(render_global(collect(topo)))
        text = shown.export_text()
        assert "waiting for paths" in text and "1/2" in text, text
        sent_before = relay_of(topo)["paths"]["shares_sent"]
        take(topo, 10)  # A1 wants to restock now
        wait_until(lambda: gkm_peer(prefix, "A1", "C3")["enc"]["pending"] > 0, 60,
                   lambda: f"A1 made blocks for C3 and holds them: {relay_of(topo)}")
        r = relay_of(topo)
        assert r["paths"]["shares_sent"] == sent_before and r["paths"]["using"] == 0, r
        assert r["paths"]["degraded_blocks"] == 0
        usable = gkm_peer(prefix, "A1", "C3")["enc"]["usable"]
    finally:
        set_underlay(topo, "A1-A2", True)
    assert usable < high
    wait_until(lambda: gkm_peer(prefix, "A1", "C3").get("enc", {}).get("usable") == high,
               120, lambda: f"both paths back, A1's store refilled: {relay_of(topo)}")
    r = relay_of(topo)
    assert r["paths"]["up"] == 2 and r["paths"]["shares_sent"] > sent_before
    assert r["paths"]["degraded_blocks"] == 0
    assert r["paths"]["renewed"] >= 1  # the cut path's connection was made anew
    emulation.net_down(prefix)


def test_the_fewer_policy_sends_over_the_one_path_left_and_counts_it(tmp_path, prefix):
    topo = grid(tmp_path, prefix, "fewer")
    high, block = topo.gkm.high_watermark, topo.gkm.block_size
    start(topo)
    wait_until(lambda: gkm_peer(prefix, "A1", "C3").get("enc", {}).get("usable") == high
               and relay_of(topo).get("paths", {}).get("up") == 2, 120,
               lambda: f"A1's store for C3 full, two paths: {relay_of(topo)}")
    # (blocks sent while the routers knew one path only, at the start, count already)
    degraded = relay_of(topo)["paths"]["degraded_blocks"]
    set_underlay(topo, "A1-A2", False)
    try:
        wait_until(lambda: relay_of(topo)["paths"]["up"] == 1
                   and relay_of(topo)["paths"]["using"] == 1, 60,
                   lambda: f"A1 sees one disjoint path and uses it: {relay_of(topo)}")
        acked = relay_of(topo)["acked_bytes"]
        keys = take(topo, 10)
        refill = len(keys) * block
        wait_until(lambda: relay_of(topo)["acked_bytes"] >= acked + refill, 120,
                   lambda: f"A1's store refilled over one path: {relay_of(topo)}")
        r = relay_of(topo)
        assert r["paths"]["degraded_blocks"] >= degraded + refill // block, r
        shown = Console(width=220, record=True)
        shown.print(render_global(collect(topo)))
        text = shown.export_text()
        assert f"1/2, {r['paths']['degraded_blocks']:,} degraded" in text, text
    finally:
        set_underlay(topo, "A1-A2", True)
    # The store holds 6 blocks that came as two shares, then the 10 that came whole over
    # one path: the last keys of the next 15 are cut from those, and C3 has them too.
    more = take(topo, 15)
    for k in more[-2:]:
        status, dec = api(topo, "SAE-C3", f"{API}/SAE-A1/dec_keys?key_ID={k['key_ID']}")
        assert status == 200 and dec["keys"] == [k], dec
    emulation.net_down(prefix)
