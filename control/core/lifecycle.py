"""How every node process lives and ends: it dies with its parent, dumps no core (it holds
key in memory, invariant 6), and stops cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import resource
import signal

PR_SET_PDEATHSIG = 1
OPEN_FILES_UNLIMITED = 1 << 20  # the soft limit asked for when the hard one is unlimited


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits; and no core dumps:
    a node process holds key in memory (invariant 6).

    The request covers only a parent that exits after it: one that died between the
    fork and here would leave an orphan running beside its replacement (an OTP worker
    on the lane its successor serves). So a process forked by multiprocessing checks its
    parent is still the one that forked it, and stops at once if not."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if orphaned():
        raise SystemExit("the parent process exited before this one started: stopping")


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit, and return it. A
    server facing the network (the key API, the global key manager's relay port) holds
    one descriptor per connection: at a service manager's usual soft limit of 1,024,
    about a thousand idle connections from anyone who can reach its port would stop it
    accepting the SAEs' own, or make the next file it opens fail (the global key manager
    crashed on its next status file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, OPEN_FILES_UNLIMITED)
    if soft < want:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def orphaned(parent_pid: int | None = None) -> bool:
    """Whether the process that forked this one (``parent_pid``, by default the one
    multiprocessing recorded; None for a process it did not fork) has exited, leaving
    this one to another parent."""
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    return parent_pid is not None and os.getppid() != parent_pid


def run_until_stopped(module) -> None:
    """Run a module object's ``run()`` until SIGTERM or SIGINT sets its ``stop`` flag (it
    checks the flag in its loop and ends cleanly)."""
    def on_signal(*_: object) -> None:
        module.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    module.run()
