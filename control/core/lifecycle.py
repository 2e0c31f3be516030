"""How every node process lives and ends: it dies with its parent, dumps no core (it holds
key in memory, invariant 6), and stops cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import ctypes
import resource
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits; and no core dumps:
    a node process holds key in memory (invariant 6)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_until_stopped(module) -> None:
    """Run a module object's ``run()`` until SIGTERM or SIGINT sets its ``stop`` flag (it
    checks the flag in its loop and ends cleanly)."""
    def on_signal(*_: object) -> None:
        module.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    module.run()
