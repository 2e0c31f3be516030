"""Signalling processes that were recorded earlier (in a manifest or a status file).

A recorded pid may belong to another process by the time it is read: the one recorded
exited and the kernel gave its pid to something else. So a process is named by its
identity (pid and start time, :func:`process_identity`) and signalled
through a pidfd opened *before* the identity is checked: the signal reaches the process
that was checked, or none.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["is_alive", "process_identity", "same_process_alive", "send_signal"]


def process_identity(pid: int) -> int:
    """pid and start time in one word, so that a recorded worker is never confused with a
    later process that reuses its pid."""
    try:
        start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0
    return (start << 24) | pid


def same_process_alive(identity: int) -> bool:
    """The recorded process still runs (a zombie does not: it holds nothing any more)."""
    pid = identity & 0xFFFFFF
    if pid == 0 or process_identity(pid) != identity:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_alive(identity: int) -> bool:
    """The identified process still runs. A zombie does not (it holds nothing any more);
    one that is our child is reaped here, so that it is not seen again."""
    pid = identity & 0xFFFFFF
    if same_process_alive(identity):
        return True
    with contextlib.suppress(OSError, IndexError):
        if process_identity(pid) == identity and \
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    return False


def send_signal(identity: int, sig: int) -> bool:
    """Send ``sig`` to the identified process if it still runs; False when it does not
    (exited, or its pid now names another process, which is left alone)."""
    pid = identity & 0xFFFFFF
    if pid == 0:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        if process_identity(pid) != identity:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
