"""Key economy (invariant 8) on real networks: every byte of local key accounted for,
nothing claimed wasted, an idle link spending only its keepalives, and global key reaching
applications when links give real QKD key rates (1 and 10 Mb/s)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from bench.topology import line, network, render, saes, triangle
from control.core import paths
from control.core.config import parse_topology
from control.lkm.accounting import LinkEnd, link_end
from control.tools import emulation
from control.tools.demo import Saes
from dataplane.limits import KEEPALIVE_S
from dataplane.ring import KeyRing
from tests.nsutil import (
    ROUTES_S,
    routes_complete,
    run_in_netns,
    tunnel_state,
    udp_send_all,
    wait_until,
)
from tests.test_tunnel import addr, ns, send_tcp

pytestmark = pytest.mark.netns

IDLE_BUDGET_BPS = 16_000  # per link, both directions: what an idle link may spend
IDLE_S = 50 * KEEPALIVE_S  # the idle link watched this long: 50 keepalives per end


def two(prefix: str, rate: float) -> str:
    """A - B at ``rate`` Mb/s, no global key."""
    return render(network("test-economy", prefix, defaults={"key_rate_mbps": rate},
                          ports={"agreement": 7501}, gkm={"pairs": []}),
                  line("AB", 212, source=None))


def metro(prefix: str, rate: float) -> str:
    """The triangle at ``rate`` Mb/s per link, an SAE at A and one at C."""
    return render(network("test-metro", prefix, defaults={"key_rate_mbps": rate},
                          ports={"agreement": 7511}, api={"workers": 1}),
                  triangle(213, source=None), saes(("SAE-A", "A"), ("SAE-C", "C")))


def up(tmp_path: Path, text: str, prefix: str):
    path = tmp_path / f"{prefix}.toml"
    path.write_text(text)
    topo = parse_topology(text, path)
    emulation.net_up(topo)
    wait_until(lambda: routes_complete(prefix, list(topo.nodes)), ROUTES_S,
               "routes at every node")
    return topo


def ends(topo) -> dict[tuple[str, str], LinkEnd]:
    """Every link end's accounting, as its key manager last published it."""
    out = {}
    for lk in topo.links:
        for node in (lk.a, lk.b):
            f = paths.node_dir(topo.prefix, node) / f"lkm-{lk.name}.json"
            out[(lk.name, node)] = link_end(json.loads(f.read_text())["accounting"])
    return out


def fresh(topo, after: float) -> dict[tuple[str, str], LinkEnd]:
    """The accounting published after ``after`` (wall clock) by every link end."""
    def published() -> bool:
        for lk in topo.links:
            for node in (lk.a, lk.b):
                f = paths.node_dir(topo.prefix, node) / f"lkm-{lk.name}.json"
                if json.loads(f.read_text())["updated"] <= after:
                    return False
        return True
    wait_until(published, 20, "fresh status from every key manager")
    return ends(topo)


def settled(topo) -> dict[tuple[str, str], LinkEnd]:
    """Accounting once no data moves (keepalives still do): two snapshots a second apart
    with the same data key used everywhere."""
    def still():
        a = fresh(topo, time.time())
        time.sleep(1.0)
        b = fresh(topo, time.time())
        same = all(a[k].enc.used_pad == b[k].enc.used_pad and
                   a[k].enc.used_mac == b[k].enc.used_mac for k in a)
        return b if same else None
    return wait_until(still, 60, "traffic to settle")


def assert_balanced(snap: dict[tuple[str, str], LinkEnd]) -> None:
    for where, end in snap.items():
        assert end.source_balance == 0, (where, end)
        for d in end.directions:
            assert d.balance == 0, (where, d)
            assert d.key_in > 0, (where, d)


def wasted_and_used(snap) -> tuple[int, int]:
    return (sum(e.enc.wasted for e in snap.values()),
            sum(e.enc.used for e in snap.values()))


def test_every_byte_is_accounted_for_after_bulk_sparse_and_idle(tmp_path, prefix):
    topo = up(tmp_path, two(prefix, 50), prefix)
    wait_until(lambda: all(e.enc.stored > 1 << 20 for e in ends(topo).values()), 60,
               "key in both rings")
    base = settled(topo)
    assert_balanced(base)

    # Bulk: 16 MiB of TCP each way (ACKs and data in both directions).
    for src, dst in (("A", "B"), ("B", "A")):
        got = send_tcp(topo, src, dst, os.urandom(16 << 20))
        assert got["bytes"] == 16 << 20
    bulk = settled(topo)
    assert_balanced(bulk)
    w0, u0 = wasted_and_used(base)
    w1, u1 = wasted_and_used(bulk)
    assert u1 - u0 > 2 * (16 << 20)
    assert (w1 - w0) < 0.01 * (u1 - u0), f"bulk wasted {w1 - w0} of {u1 - u0} B used"

    # Sparse: one small datagram every 100 ms; each claims exactly its pad.
    run_in_netns(ns(prefix, "A"), udp_send_all, addr(topo, "A"), addr(topo, "B"), 9999,
                 [os.urandom(200) for _ in range(40)], 0.1, timeout=60)
    sparse = settled(topo)
    assert_balanced(sparse)
    w2, u2 = wasted_and_used(sparse)
    a_data = sparse[("A-B", "A")].enc.used_pad - bulk[("A-B", "A")].enc.used_pad
    assert a_data >= 40 * 200
    assert (w2 - w1) < 0.01 * (u2 - u1), f"sparse wasted {w2 - w1} of {u2 - u1} B used"

    # Idle: keepalives only.
    t0 = time.time()
    start = fresh(topo, t0)
    time.sleep(IDLE_S)
    end = fresh(topo, time.time())
    seconds = time.time() - t0
    assert_balanced(end)
    spent = 0
    for k in start:
        a, b = start[k].enc, end[k].enc
        assert b.used_pad == a.used_pad and b.used_mac == a.used_mac, "data on an idle link"
        assert b.wasted == a.wasted, f"{k}: key wasted on an idle link"
        assert b.used_control > a.used_control  # the keepalives went on
        spent += b.used_control - a.used_control
    assert spent * 8 / seconds <= IDLE_BUDGET_BPS, f"idle link spent {spent} B in {seconds} s"


def test_wiped_key_ahead_of_the_claims_is_skipped_counted_and_the_link_stays_up(
        tmp_path, prefix):
    """A run of wiped key ahead of a ring's claims (a bug's trace: a dead chunk's give-up
    once left megabytes of it there) is skipped whole by the first keepalive or worker
    that meets it, and counted as wasted: the link stays up and carries traffic. Met a
    keepalive (about 100 B) at a time, such a run kept a link down for hours."""
    topo = up(tmp_path, two(prefix, 50), prefix)
    wait_until(lambda: all(e.enc.stored > 2 << 20 for e in ends(topo).values()), 60,
               "key in both rings")
    downs = {n: tunnel_state(prefix, n, "A-B")["liveness"]["downs"] for n in "AB"}
    before = settled(topo)[("A-B", "A")].enc.wasted
    ring = KeyRing.attach(paths.ring_name(prefix, "A", "A-B", "ab"))
    try:
        ring._lock()  # as the ring's own give-ups do: no claim moves meanwhile
        try:
            start, end = ring.claim_pos, ring.write_pos - (64 << 10)
            ring._wipe(start, end)
        finally:
            ring._unlock()
        assert end - start > 1 << 20
        wait_until(lambda: ring.claim_pos >= end, 30, "the claims past the wiped run")
    finally:
        ring.close()
    data = os.urandom(4 << 20)
    got = send_tcp(topo, "A", "B", data)
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    after = settled(topo)
    assert_balanced(after)
    assert after[("A-B", "A")].enc.wasted - before >= end - start
    for n in "AB":
        st = tunnel_state(prefix, n, "A-B")
        assert st["up"] and st["liveness"]["downs"] == downs[n], (n, st["liveness"])
    said = "".join(f.read_text() for f in paths.log_dir(prefix).glob("*.log"))
    assert "wiped key" in said


def test_a_slow_links_idle_cost_is_a_few_percent_of_its_key_and_it_stays_up(
        tmp_path, prefix):
    """A 50 kb/s link (long spans give a fraction of a Mb/s), global key full both ways:
    keepalives every 0.2 s took 12 % of each direction's key there, and the relay's ZMTP
    pings every 5 s (with their answers and TCP acknowledgements) 5 %. Both periods follow
    the rate (control.core.sizing), and so do the peer's timeout and the link-state
    entries' age: the link comes up, stays up and routed, keepalives take at most 2.5 % of
    the key and the relay's pings 2 % (a window of 64 KiB holds at most one round)."""
    text = render(network("test-economy", prefix, defaults={"key_rate_mbps": 0.05},
                          ports={"agreement": 7501},
                          gkm={"block_size": "4KiB", "low_watermark": "16KiB",
                               "high_watermark": "32KiB"}),
                  line("AB", 212, source=None))
    topo = up(tmp_path, text, prefix)
    assert topo.links[0].sizes.keepalive_s > 1.0 and topo.gkm.heartbeat_s > 5.0

    def full() -> bool:
        try:
            return all(not (p := json.loads((paths.node_dir(prefix, o) / "gkm.json")
                                            .read_text())["peers"][d])["relay"]["filling"]
                       and p["enc"]["usable"] >= 32 << 10 for o, d in topo.gkm.pairs)
        except (OSError, ValueError, KeyError):
            return False
    wait_until(full, 180, "global key full both ways")
    downs = {n: tunnel_state(prefix, n, "A-B")["liveness"]["downs"] for n in "AB"}
    start = fresh(topo, time.time())
    wait_until(lambda: all(ends(topo)[k].enc.key_in - start[k].enc.key_in >= 64 << 10
                           for k in start), 120, "64 KiB more key in each direction")
    end = fresh(topo, time.time())
    assert_balanced(end)
    for k in start:
        a, b = start[k].enc, end[k].enc
        control, key_in = b.used_control - a.used_control, b.key_in - a.key_in
        data = b.used_pad + b.used_mac - a.used_pad - a.used_mac
        assert control > 0, f"{k}: no keepalive went"
        assert control <= 0.025 * key_in, f"{k}: keepalives took {control} of {key_in} B"
        assert data <= 0.02 * key_in, f"{k}: relay pings took {data} of {key_in} B"
        assert b.wasted == a.wasted, f"{k}: key wasted on an idle link"
    for n in "AB":
        st = tunnel_state(prefix, n, "A-B")
        assert st["up"] and st["liveness"]["downs"] == downs[n], (n, st["liveness"])
    assert routes_complete(prefix, list(topo.nodes))


@pytest.mark.parametrize("rate", [10, 1, 0.2])
def test_global_key_reaches_applications_at_real_key_rates(tmp_path, prefix, rate):
    """The triangle with every link at 10, 1 or 0.2 Mb/s and every size derived from that: every
    ordered pair gets global key, and SAEs at A and C get identical keys through the
    ETSI GS QKD 014 API; no key is wasted doing it."""
    topo = up(tmp_path, metro(prefix, rate), prefix)

    def gkm(node: str) -> dict:
        return json.loads((paths.node_dir(prefix, node) / "gkm.json").read_text())

    def every_pair() -> bool:
        try:
            return all(gkm(o)["peers"][d]["enc"]["usable"] > 0 for o, d in topo.gkm.pairs)
        except (OSError, ValueError, KeyError):
            return False
    wait_until(every_pair, 120, "global key in every ordered pair")
    sae = {s.id: s for s in topo.saes}
    saes = Saes(topo, sae["SAE-A"], sae["SAE-C"])
    assert saes.wait_ready(60)
    k = saes.exchange(4 * 32, 32)
    assert k.keys == 4 and k.identical and k.refused_again
    back = Saes(topo, sae["SAE-C"], sae["SAE-A"]).exchange(2 * 32, 32)
    assert back.keys == 2 and back.identical
    retries = sum(gkm(o)["peers"][d]["relay"]["retries"] for o, d in topo.gkm.pairs)
    assert retries == 0, "a relay sent again what its path was still delivering"
    snap = fresh(topo, time.time())
    for where, end in snap.items():
        assert end.source_balance == 0 and all(d.balance == 0 for d in end.directions), where
    wasted, used = wasted_and_used(snap)
    assert used > 0 and wasted < 0.01 * used, f"wasted {wasted} of {used} B"
