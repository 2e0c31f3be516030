"""Per-SAE limits of the key API: the pure buckets (request rate, share of a pair's
store), the same limits shared by forked worker processes, and the share end to end
through the HTTPS API on a real network."""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing as mp
import ssl
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import pytest

from api.etsi import ApiError
from api.limits import AddressCap, SaeLimiter, SaeLimits
from api.pki import PkiLayout
from api.server import sae_limiter
from bench.topology import line, network, render, saes
from control.core import paths
from control.core.config import parse_topology
from control.gkm.client import GkmClient
from tests.nsutil import ROUTES_S, wait_until

KIB = 1 << 10


def test_an_sae_calling_too_fast_is_refused_and_others_are_not():
    lim = SaeLimiter(SaeLimits(requests_per_s=5), ["a1", "a2"], ["B"])
    for _ in range(5):  # a burst of one second's worth
        lim.admit("a1", 100.0)
    with pytest.raises(ApiError, match="too many requests from SAE a1") as e:
        lim.admit("a1", 100.0)
    assert e.value.status == 503 and "nothing was taken" in e.value.message
    lim.admit("a2", 100.0)  # another SAE's bucket
    lim.admit("a1", 100.2)  # a fifth of a second later: one more
    with pytest.raises(ApiError):
        lim.admit("a1", 100.2)
    lim.admit("zz", 100.2)  # not an SAE of this node: the caller check refuses it first
    unlimited = SaeLimiter(SaeLimits(), ["a1"], ["B"])
    for _ in range(1000):
        unlimited.admit("a1", 1.0)


def test_an_sae_takes_at_most_its_share_of_a_pairs_store():
    lim = SaeLimiter(SaeLimits(store_share=0.25, share_window_s=10, store_bytes=1000),
                     ["a1", "a2"], ["B", "C"])
    lim.take_share("a1", "B", 200, 0.0)
    with pytest.raises(ApiError, match="SAE a1 has taken its share of the keys for node B"):
        lim.take_share("a1", "B", 100, 0.0)
    lim.take_share("a2", "B", 250, 0.0)  # the others' keys are still there for them
    lim.take_share("a1", "C", 250, 0.0)  # and another pair's
    lim.refund("a1", "B", 200, 0.0)      # a take the store refused: given back
    lim.take_share("a1", "B", 250, 0.0)
    with pytest.raises(ApiError):
        lim.take_share("a1", "B", 1, 0.0)
    lim.take_share("a1", "B", 25, 1.0)   # refilled over the window: 25 B per second


def test_over_any_window_an_sae_gets_at_most_twice_its_share():
    lim = SaeLimiter(SaeLimits(store_share=0.1, share_window_s=5, store_bytes=10_000),
                     ["a1"], ["B"])
    got, t = 0, 0.0
    while t < 5.0:  # a greedy SAE, asking every 10 ms
        try:
            lim.take_share("a1", "B", 64, t)
            got += 64
        except ApiError:
            pass
        t += 0.01
    assert 1000 <= got <= 2000


def test_an_sae_holds_at_most_its_cap_of_connections_from_an_address_and_gets_them_back():
    cap = AddressCap(3)
    a1 = ("10.0.0.1", "a1")
    assert [cap.admit(a1) for _ in range(4)] == [True, True, True, False]
    assert cap.admit(("10.0.0.2", "a1"))  # the SAE from another address
    assert cap.admit(("10.0.0.1", "a2"))  # another SAE at the same address
    assert (cap.held(a1), cap.refused) == (3, 1)
    cap.release(a1)
    assert cap.admit(a1) and not cap.admit(a1)
    for _ in range(3):
        cap.release(a1)
    assert cap.held(a1) == 0 and a1 not in cap._held  # nothing kept
    assert cap.refused == 2
    refusal = cap.refusal("a1")  # what a connection over it is answered
    assert refusal.status == 503 and "SAE a1 holds 3 connections" in refusal.message
    assert "max_connections_per_address" in refusal.message
    unlimited = AddressCap(0)
    assert all(unlimited.admit(a1) for _ in range(10_000))
    unlimited.release(a1)
    assert unlimited.held(a1) == 0 and unlimited.refused == 0  # nothing kept


def _hammer(lim: SaeLimiter, start, n: int, q) -> None:
    start.wait()
    ok = 0
    for _ in range(n):
        try:
            lim.admit("a1", 50.0)  # one instant for all: no refill
            ok += 1
        except ApiError:
            pass
    q.put(ok)


def test_forked_workers_share_one_limit():
    """The key API's workers are forked after the limiter is made: what one admits, the
    others see (a limit per worker would let each SAE through once per worker)."""
    topo = parse_topology(net("tlim", limits={"sae_requests_per_s": 20}))
    lim = sae_limiter(topo, "A", shared=True)
    ctx = mp.get_context("fork")
    start, q = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(lim, start, 30, q)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    total = sum(q.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
    assert total == 20  # one bucket of one second's worth, across all four


# ---- end to end ----------------------------------------------------------------------------

def net(prefix: str, limits: Mapping[str, object] = MappingProxyType(
        {"sae_store_share": 0.25})) -> str:
    """A - B with global key between them, two SAEs at A and one at B, the per-SAE
    ``limits`` in [api]."""
    return render(
        network("test-limits", prefix,
                defaults={"key_rate_mbps": 400, "block_size": "256KiB",
                          "ring_capacity": "32MiB"},
                ports={"agreement": 7501}, dataplane={"workers": 1},
                gkm={"block_size": "256KiB", "low_watermark": "2MiB",
                     "high_watermark": "4MiB", "window": "1MiB", "pairs": [["A", "B"]]},
                api={"workers": 2, **limits, "sae_share_window_s": 600}),
        line("AB", 213, source={"generator": "aes-ctr"}),
        saes(("a1", "A"), ("a2", "A"), ("b1", "B")))


@pytest.mark.netns
def test_one_sae_cannot_drain_a_pair_for_the_others(tmp_path, prefix):
    from control.tools import emulation
    from tests.nsutil import routes_complete

    path = tmp_path / "net.toml"
    path.write_text(net(prefix))
    topo = parse_topology(path.read_text(), path)
    emulation.net_up(topo)
    wait_until(lambda: routes_complete(prefix, ["A", "B"]), ROUTES_S, "routes")
    pki = PkiLayout(topo.api.pki)
    pool = ThreadPoolExecutor(4, initializer=_enter, initargs=(paths.netns_name(prefix, "A"),))

    def call(sae: str, path: str) -> tuple[int, dict]:
        def go():
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.load_cert_chain(*pki.sae(sae))
            c = http.client.HTTPSConnection(str(topo.node("A").address), topo.ports.api,
                                            context=ctx, timeout=30)
            try:
                c.request("GET", path)
                r = c.getresponse()
                return r.status, json.loads(r.read())
            finally:
                c.close()
        return pool.submit(go).result(60)

    def enc() -> dict:
        c = GkmClient(prefix, "A")
        try:
            return c.summary()["peers"]["B"]["enc"]
        finally:
            c.close()

    def answers() -> bool:
        try:
            return call("a1", "/api/v1/keys/b1/status")[0] == 200
        except OSError:
            return False

    try:
        wait_until(answers, 60, "A's key API")
        wait_until(lambda: enc()["usable"] >= 3 << 20, 60, "A's store for B")
        # a1 takes its share (a quarter of the 4 MiB store), 256 KiB a request ...
        same = "/api/v1/keys/b1/enc_keys?number=1&size=2097152"
        for _ in range(4):
            status, doc = call("a1", same)
            assert status == 200 and len(base64.b64decode(doc["keys"][0]["key"])) == 256 * KIB
        # ... and is refused more, with nothing taken, while a2 is still served. The
        # same words again are refused too: three of them, so that at least two reach
        # one of the two workers, which has them checked already (api.request_memo) and
        # still applies the share.
        before = enc()["taken_keys"]
        for _ in range(3):
            status, doc = call("a1", same)
            assert status == 503 and "taken its share" in doc["message"], doc
        status, doc = call("a1", "/api/v1/keys/b1/enc_keys?number=1&size=524288")
        assert status == 503 and "taken its share" in doc["message"], doc
        assert enc()["taken_keys"] == before
        status, doc = call("a2", "/api/v1/keys/b1/enc_keys?number=1&size=524288")
        assert status == 200 and len(base64.b64decode(doc["keys"][0]["key"])) == 64 * KIB
        assert call("a1", "/api/v1/keys/b1/status")[0] == 200  # no rate limit set
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _enter(ns: str) -> None:
    from pyroute2 import netns

    netns.setns(ns)  # this thread only: its sockets live in the node's namespace
