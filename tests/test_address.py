"""control.core.address: modules wait for the node address instead of failing to bind it."""

from __future__ import annotations

import time

from control.core.address import wait_for_address


def test_a_local_address_is_there_at_once_and_a_foreign_one_never():
    assert wait_for_address("127.0.0.1", timeout_s=1.0)
    t0 = time.monotonic()
    assert not wait_for_address("192.0.2.1", timeout_s=0.3)  # TEST-NET-1: never local
    assert 0.25 < time.monotonic() - t0 < 2.0


def test_a_stop_request_ends_the_wait():
    t0 = time.monotonic()
    assert not wait_for_address("192.0.2.1", stop=lambda: time.monotonic() - t0 > 0.2)
    assert time.monotonic() - t0 < 2.0
