"""The chaos bench's key ledger (bench.ledger), without a network."""

from __future__ import annotations

from bench.ledger import Ledger


def test_keys_obtained_and_delivered_alike_are_clean():
    led = Ledger()
    led.obtain([("k1", "d1"), ("k2", "d2")])
    led.deliver([("k1", "d1")])
    assert led.undelivered() == ["k2"]
    led.deliver([("k2", "d2")])
    assert led.report() == {"keys_obtained": 2, "keys_delivered": 2, "mismatched": 0,
                            "duplicated": 0, "reused": 0, "orphans": 0, "lost_answers": 0}


def test_other_bytes_a_second_delivery_and_reused_bytes_are_each_counted():
    led = Ledger()
    led.obtain([("k1", "d1"), ("k2", "d2"), ("k3", "d1")])  # k3: k1's bytes again
    led.deliver([("k1", "d1"), ("k2", "dX")])                # k2: other bytes
    led.deliver([("k1", "d1")])                              # k1 given twice
    led.deliver([("k9", "d9")])                              # never obtained
    r = led.report()
    assert r["mismatched"] == 2 and r["duplicated"] == 1 and r["reused"] == 1
    assert r["orphans"] == 1 and r["lost_answers"] == 0      # k3


def test_a_lost_answer_is_an_orphan_of_its_own_kind_until_delivered():
    led = Ledger()
    led.obtain([("k1", "d1"), ("k2", "d2"), ("k3", "d3")])
    led.answer_lost(["k1", "k2"])
    led.deliver([("k2", "d2")])  # fetched again after the lost answer
    r = led.report()
    assert r["orphans"] == 2 and r["lost_answers"] == 1     # k1 lost, k3 never asked
    led.answer_lost(["k2"])  # a key already delivered is not lost
    assert led.report()["lost_answers"] == 1
