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


def _starting_module(pid_file: Path) -> None:
    die_with_parent()
    pid_file.write_text(str(os.getpid()))
    time.sleep(600)  # still starting: no handler of its own yet


def _supervisor_like(pid_file: Path) -> None:
    import signal

    from control.node.supervisor import module_main

    signal.signal(signal.SIGTERM, lambda *_: None)  # as the supervisor's run() does
    CTX.Process(target=module_main, args=("lkm:A-B", _starting_module, pid_file)).start()
    time.sleep(60)


def test_a_module_still_starting_dies_with_its_supervisor(tmp_path):
    """A module forked with the supervisor's SIGTERM handler used to swallow the SIGTERM
    its parent's death sends, and run on as an orphan beside its replacement."""
    pid_file = tmp_path / "pid"
    sup = CTX.Process(target=_supervisor_like, args=(pid_file,))
    sup.start()
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the module never started"
        time.sleep(0.02)
    pid = int(pid_file.read_text())
    sup.kill()  # SIGKILL: no shutdown, only the kernel's SIGTERM to its children
    sup.join(30)
    try:
        deadline = time.monotonic() + 30  # (it dies at once; the module sleeps 600 s)
        while _running(pid):
            assert time.monotonic() < deadline, "the module outlived its supervisor"
            time.sleep(0.05)
    finally:
        if _running(pid):
            os.kill(pid, 9)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_module_that_fails_says_so_in_the_nodes_log(caplog):
    import signal

    from control.node.supervisor import module_main

    def fails() -> None:
        raise RuntimeError("no ring")

    def refuses() -> None:
        raise SystemExit("link authentication key /k is missing")

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with caplog.at_level("INFO", logger="qkdnet.node"):
            for target, code in ((fails, 1), (refuses, 1)):
                try:
                    module_main("lkm:A-B", target)
                except SystemExit as e:
                    assert e.code == code
                else:
                    raise AssertionError("module_main returned")
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    text = caplog.text
    assert "lkm:A-B crashed" in text and "RuntimeError: no ring" in text
    assert "lkm:A-B stopped: link authentication key /k is missing" in text
