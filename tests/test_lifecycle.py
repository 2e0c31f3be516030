"""A node process dies with its parent, also when the parent died before the process could
ask the kernel to tell it: an orphan left running beside its replacement (an OTP worker on
the lane its successor serves) would break the one-owner-per-lane rule."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

from control.core.lifecycle import OPEN_FILES_UNLIMITED, die_with_parent, orphaned

CTX = mp.get_context("fork")  # how node processes are started


def _look(out: Path, go) -> None:
    go.wait(30)
    try:
        die_with_parent()
    except SystemExit:
        out.write_text("stopped")
        raise
    out.write_text("running")


def _parent_that_exits_first(out: Path, go) -> None:
    CTX.Process(target=_look, args=(out, go)).start()
    os._exit(0)  # gone before its child looks (multiprocessing would wait for it)


def _wait_for(out: Path) -> str:
    deadline = time.monotonic() + 60
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline, "the process never said what it did"
        time.sleep(0.05)
    return out.read_text()


def test_a_process_whose_parent_died_before_it_started_stops(tmp_path):
    go = CTX.Event()
    parent = CTX.Process(target=_parent_that_exits_first, args=(tmp_path / "state", go))
    parent.start()
    deadline = time.monotonic() + 60  # (not join: its child holds the exit pipe open)
    while parent.exitcode is None:
        assert time.monotonic() < deadline, "the parent never exited"
        time.sleep(0.02)
    go.set()
    assert _wait_for(tmp_path / "state") == "stopped"


def test_a_process_whose_parent_lives_runs(tmp_path):
    go = CTX.Event()
    go.set()
    child = CTX.Process(target=_look, args=(tmp_path / "state", go))
    child.start()
    child.join(30)
    assert _wait_for(tmp_path / "state") == "running" and child.exitcode == 0
    assert not orphaned()  # this process was not forked by multiprocessing
    assert orphaned(parent_pid=os.getppid() + 1) and not orphaned(parent_pid=os.getppid())


def _limit_after_raise(out: Path) -> None:
    import resource

    from control.core.lifecycle import raise_open_files_limit

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))  # a low soft limit
    out.write_text(f"{raise_open_files_limit()} {resource.getrlimit(resource.RLIMIT_NOFILE)}")


def test_the_open_files_limit_is_raised_to_the_hard_limit(tmp_path):
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    child = CTX.Process(target=_limit_after_raise, args=(tmp_path / "limit",))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    raised, limits = (tmp_path / "limit").read_text().split(" ", 1)
    want = hard if hard != resource.RLIM_INFINITY else OPEN_FILES_UNLIMITED
    assert int(raised) == want and limits == str((want, hard))
