"""Waiting for the node's own address, which the router adds to the namespace's loopback
once it runs: a module that binds it before then would fail and be restarted."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable


def wait_for_address(address: str, stop: Callable[[], bool] = lambda: False,
                     timeout_s: float = 60.0, poll_s: float = 0.1) -> bool:
    """True once ``address`` is local here (a socket can bind it); False if ``stop()``
    turned true or ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    while not stop() and time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((address, 0))
                return True
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
        time.sleep(poll_s)
    return False
