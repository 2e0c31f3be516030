"""Keys reserved ahead of demand (`[gkm] reserve_ahead_s`, on by default), end to end: two
nodes in namespaces with their OTP tunnel, key managers and key APIs over mutual TLS; a
master that keeps asking is served from keys its pair has reserved at the slave's node,
and a kill -9 of its key manager keeps them."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest

from tests.nsutil import module_pid, wait_until
from tests.test_api_service import BASE, Net, _api_file, _node_log, running_net

pytestmark = pytest.mark.netns

# A second of demand held ahead, not the default tenth: a pool refills only while at least
# two takes are expected in that long, and the tests' one-at-a-time requests must count as
# steady demand on a machine slow enough to make fewer than 20 a second.
GKM = """block_size = "1MiB"
low_watermark = "24MiB"
high_watermark = "32MiB"
window = "8MiB"
reserve_ahead_s = 1.0
pairs = [["A", "B"]]"""


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    with running_net(tmp_path_factory, GKM) as n:
        yield n


def _ahead(net: Net) -> dict:
    return net.gkm("A")["peers"]["B"]["ahead"]


def _pull_until(net: Net, served: int, timeout: float = 120.0) -> list[tuple[str, bytes]]:
    """a1 asks for 32 keys of 256 bits at a time, four requests at once (some hundreds
    of keys a second even on a busy machine), until ``served`` keys came from keys
    reserved ahead since this process's key manager started."""
    issued: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(4) as ex:
        while _ahead(net)["served_keys"] < served:
            assert time.monotonic() < deadline, f"not served ahead: {_ahead(net)}"
            for keys in ex.map(lambda _: _enc(net, 32), range(16)):
                issued += keys
    return issued


def _enc(net: Net, number: int) -> list[tuple[str, bytes]]:
    """One enc_keys of a1 for b1: ``number`` keys of 256 bits, (ID, bytes) each."""
    status, doc = net.call("a1", "GET", f"{BASE}/b1/enc_keys?number={number}&size=256")
    assert status == 200, doc
    return [(k["key_ID"], base64.b64decode(k["key"])) for k in doc["keys"]]


def _slave_gets_each_once(net: Net, issued: list[tuple[str, bytes]]) -> None:
    """b1 fetches every key, byte for byte, once; b2 (another slave) gets none."""
    assert len({k for k, _ in issued}) == len(issued)
    for at in range(0, len(issued), 256):
        chunk = issued[at:at + 256]
        body = json.dumps({"key_IDs": [{"key_ID": k} for k, _ in chunk]}).encode()
        status, doc = net.call("b2", "POST", f"{BASE}/a1/dec_keys", body)
        assert status == 401, doc  # another slave: refused whole
        status, doc = net.call("b1", "POST", f"{BASE}/a1/dec_keys", body)
        assert status == 200, doc
        assert [(k["key_ID"], base64.b64decode(k["key"])) for k in doc["keys"]] == chunk
    status, doc = net.call_settled("b1", "GET", f"{BASE}/a1/dec_keys?key_ID={issued[-1][0]}")
    assert status == 400 and "not found on KME" in doc["message"], doc


def settled(net: Net) -> None:
    """Every reservation and confirmation A sent has been acknowledged by B."""
    wait_until(lambda: not _ahead(net)["reserving_keys"]
               and not net.gkm("A")["peers"]["B"]["enc"]["unacked_reservations"], 30,
               "A's reservations and confirmations acknowledged by B")


def test_a_master_that_keeps_asking_is_served_from_keys_reserved_ahead(net):
    """Its pair's steady demand has keys reserved at the slave's node ahead of it, and the
    master is served from them (one local sync, no round trip); the slave still gets each
    key once, byte for byte, and no other SAE gets it."""
    issued = _pull_until(net, 256)
    state = _ahead(net)
    assert state["reserved_keys"] >= state["served_keys"] >= 256
    assert state["cancelled_keys"] == 0
    assert len({v for _, v in issued}) == len(issued)
    _slave_gets_each_once(net, issued)


def test_keys_reserved_ahead_survive_a_kill_9_of_the_key_manager(net):
    """kill -9 of the master's key manager while its pool holds keys, some of them under
    a reservation the slave's node has not answered (its key manager held with
    SIGSTOP): the restarted one cancels only takers' unanswered reservations, not this
    one, has the same keys reserved ahead, serves them, and the slave gets every key
    handed out before and after once."""
    issued = _pull_until(net, _ahead(net)["served_keys"] + 64)
    settled(net)
    b_gkm = module_pid(net.prefix, "B", "gkm")
    a_gkm = module_pid(net.prefix, "A", "gkm")
    os.kill(b_gkm, signal.SIGSTOP)
    try:
        # One request at a time, each served from the pool, until a refill has left.
        deadline = time.monotonic() + 60
        while not _ahead(net)["reserving_keys"]:
            assert _ahead(net)["ready_keys"] >= 32 and time.monotonic() < deadline, \
                f"no refill while keys were ready: {_ahead(net)}"
            issued += _enc(net, 32)
        state = _ahead(net)
        held = state["ready_keys"] + state["reserving_keys"]
        os.kill(a_gkm, signal.SIGKILL)
        wait_until(lambda: module_pid(net.prefix, "A", "gkm") != a_gkm
                   and _ahead(net)["pools"] == 1, 60, "A's key manager restarted")
        state = _ahead(net)
        assert (state["ready_keys"] + state["reserving_keys"], state["served_keys"]) == \
            (held, 0)
        assert state["reserving_keys"] > 0  # restored as reserving: still unanswered
    finally:
        os.kill(b_gkm, signal.SIGCONT)
    settled(net)
    assert _ahead(net)["ready_keys"] == held and _ahead(net)["cancelled_keys"] == 0
    issued += _pull_until(net, held)
    _slave_gets_each_once(net, issued)


def _steady_ones(net: Net, seconds: float) -> list[tuple[str, bytes]]:
    """a1 asks for one 256-bit key at a time, eight requests at once, for ``seconds``
    (hundreds of requests a second even on a busy machine: a steady demand)."""
    issued: list[tuple[str, bytes]] = []
    end = time.monotonic() + seconds
    with ThreadPoolExecutor(8) as ex:
        while time.monotonic() < end or len(issued) < 200:
            for keys in ex.map(lambda _: _enc(net, 1), range(32)):
                issued += keys
    return issued


def _held_at_b(net: Net) -> int:
    """Keys B holds for A, reserved and not delivered, beyond those A's pools hold
    ahead (unconfirmed): keys taken at A that no slave has fetched."""
    state = _ahead(net)
    return net.gkm("B")["peers"]["A"]["dec"]["reserved_keys"] - \
        state["ready_keys"] - state["reserving_keys"]


def test_a_worker_answers_from_its_hand_without_its_key_manager(net):
    """After a steady demand, the master's key API worker holds keys for the pair in its
    hand: with A's key manager stopped (SIGSTOP) requests are still answered, which no
    request that asks the key manager can be; the slave gets each key once."""
    issued = _steady_ones(net, 3.0)
    a_gkm = module_pid(net.prefix, "A", "gkm")
    os.kill(a_gkm, signal.SIGSTOP)
    try:
        # Several at once, one key each: any that meets an empty hand waits for the key
        # manager (refused after the link's timeout, or answered once it runs again).
        with ThreadPoolExecutor(8) as ex:
            futures = [ex.submit(net.call, "a1", "GET",
                                 f"{BASE}/b1/enc_keys?number=1&size=256")
                       for _ in range(8)]
            status, doc = next(as_completed(futures, timeout=60)).result()
            assert status == 200, doc  # answered with the key manager stopped
            os.kill(a_gkm, signal.SIGCONT)
            answers = [f.result(60) for f in futures]
    finally:
        os.kill(a_gkm, signal.SIGCONT)
    issued += [(k["key_ID"], base64.b64decode(k["key"]))
               for status, doc in answers if status == 200 for k in doc["keys"]]
    settled(net)
    _slave_gets_each_once(net, issued)


def test_hands_are_given_back_when_the_api_stops(net):
    """Keys held in the workers' hands reach no application when the key API stops: they
    are cancelled at both nodes, so B keeps only the keys A's pools hold ahead."""
    issued = _steady_ones(net, 2.0)
    settled(net)
    _slave_gets_each_once(net, issued)
    held = _held_at_b(net)
    assert held > 0  # in the workers' hands: taken, confirmed at B, not handed out
    wait_until(lambda: _hands(net)["held_keys"] == held, 30,
               f"the API's manager to count the {held} key(s) in hands")
    api = module_pid(net.prefix, "A", "api")
    os.kill(api, signal.SIGTERM)  # the workers stop gracefully, giving their hands back
    wait_until(lambda: module_pid(net.prefix, "A", "api") not in (None, api), 60,
               "the key API restarted")
    settled(net)
    wait_until(lambda: _held_at_b(net) == 0, 30, f"B to drop the {held} key(s) given back")
    assert "given back at stop or when idle" in _node_log(net.prefix, "A")


def _hands(net: Net) -> dict:
    return _api_file(net.prefix, "A")["hands"]


def test_a_worker_killed_with_keys_in_hand_counts_them_lost(net):
    """kill -9 of every key API worker while their hands hold keys: those keys are
    confirmed at B and reach no application; the API's manager counts them lost, to the
    key, and the workers forked again serve."""
    issued = _steady_ones(net, 2.0)
    settled(net)
    _slave_gets_each_once(net, issued)
    held = _held_at_b(net)
    assert held > 0
    wait_until(lambda: _hands(net)["held_keys"] == held, 30,
               f"the API's manager to count the {held} key(s) in hands")
    before = _hands(net)
    workers = [w["pid"] for w in _api_file(net.prefix, "A")["slots"]]
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (h := _hands(net))["lost_keys"] == before["lost_keys"] + held
               and h["held_keys"] == 0, 30, "the lost keys counted")
    assert _hands(net)["lost_bytes"] == before["lost_bytes"] + 32 * held
    assert _held_at_b(net) == held  # still at B: nobody gave them back
    wait_until(lambda: _api_file(net.prefix, "A")["workers_alive"] == 2, 60,
               "the workers forked again")
    _slave_gets_each_once(net, _steady_ones(net, 0.5))
