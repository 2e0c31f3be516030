"""Structured logs (control.core.logs): one JSON object per line with the fields a log store
needs, and no key bytes even when a module passes bytes to the logger by mistake."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import sys

import pytest

from control.core.logs import redact, setup_logging

KEY = bytes(range(7, 7 + 48))


@pytest.fixture
def logged(monkeypatch):
    monkeypatch.setenv("QKDNET_NODE", "N1")
    monkeypatch.delenv("QKDNET_LOG_FORMAT", raising=False)
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored afterwards
    setup_logging(stream=buf)
    yield buf
    logging.captureWarnings(False)
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_each_line_is_json_with_the_fields_a_log_store_needs(logged):
    logging.getLogger("qkdnet.lkm").info("link %s: skipped to %d", "A-B", 4096,
                                         extra={"link": "A-B"})
    (line,) = _lines(logged)
    assert line["message"] == "link A-B: skipped to 4096"
    assert line["level"] == "INFO" and line["logger"] == "qkdnet.lkm"
    assert line["node"] == "N1" and line["link"] == "A-B"
    assert isinstance(line["pid"], int) and line["time"].startswith("20")


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_key_bytes_passed_to_the_logger_never_reach_the_line(logged, wrap):
    log = logging.getLogger("qkdnet.gkm")
    log.warning("block %s", wrap(KEY))
    log.warning("block %(b)r", {"b": wrap(KEY)})
    log.warning(wrap(KEY))
    log.warning("extra", extra={"key": wrap(KEY)})
    text = logged.getvalue()
    assert KEY.hex() not in text and repr(KEY)[2:20] not in text
    assert "\\u0007" not in text and "\\x07" not in text
    assert text.count("<48 bytes>") == 4


def test_key_bytes_inside_blocks_and_containers_never_reach_the_line(logged):
    @dataclasses.dataclass
    class Store:
        pos: int
        data: bytes

    block = ((7, 3), bytearray(KEY))  # what a key source hands the key manager
    log = logging.getLogger("qkdnet.lkm")
    log.info("got %s", block)
    log.info("%s", [block, {"k": memoryview(KEY)}, {KEY}])
    log.info("%r", Store(5, KEY))
    text = logged.getvalue()
    assert KEY.hex() not in text and "\\x07" not in text and "\\u0007" not in text
    assert text.count("<48 bytes>") == 5
    assert "(7, 3)" in text and "'pos': 5" in text  # the rest is still there


def test_an_exception_is_one_json_line_with_its_traceback(logged):
    try:
        raise RuntimeError("ring full")
    except RuntimeError:
        logging.getLogger("qkdnet.x").exception("store failed")
    (line,) = _lines(logged)
    assert line["level"] == "ERROR" and "RuntimeError: ring full" in line["exc_info"]


def test_text_format_for_reading_by_eye(monkeypatch):
    monkeypatch.setenv("QKDNET_LOG_FORMAT", "text")
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    buf = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers)
    try:
        setup_logging(stream=buf)
        logging.getLogger("qkdnet.y").info("hello")
    finally:
        logging.captureWarnings(False)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
    assert " INFO qkdnet.y node=" in buf.getvalue() and buf.getvalue().strip().endswith("hello")


def test_redact_leaves_other_values_alone():
    assert redact(5) == 5 and redact("abc") == "abc" and redact(b"ab") == "<2 bytes>"


# ---- one call site cannot flood the log (RepeatLimit) ---------------------------------------

def _flood(log: logging.Logger, n: int) -> None:
    for i in range(n):
        log.warning("refused request %d from %s", i, "10.0.0.9")  # one call site


def test_a_call_site_writes_its_burst_then_one_line_per_period(logged):
    """A thousand lines from one line of code at once (what an outsider repeating a
    refused request makes) write the burst only; other call sites are not held back."""
    from control.core.logs import BURST

    _flood(logging.getLogger("qkdnet.z"), 1000)
    logging.getLogger("qkdnet.z").warning("another call site")
    lines = _lines(logged)
    assert len(lines) == BURST + 1
    assert lines[-1]["message"] == "another call site"
    assert lines[BURST - 1]["message"] == f"refused request {BURST - 1} from 10.0.0.9"


def test_the_line_after_a_gap_says_how_many_were_left_out():
    from control.core.logs import RepeatLimit

    now = [100.0]
    limit = RepeatLimit(burst=3, every_s=10.0, clock=lambda: now[0])

    def one(i: int) -> logging.LogRecord | None:
        rec = logging.LogRecord("qkdnet.z", logging.ERROR, "/x.py", 7, "bad %s", (i,), None)
        return rec if limit.filter(rec) else None

    assert [one(i) is not None for i in range(10)] == [True] * 3 + [False] * 7
    now[0] += 9.9  # not yet a whole token
    assert one(10) is None
    now[0] += 0.1
    rec = one(11)
    assert rec is not None and rec.getMessage() == \
        "bad 11 (8 more line(s) from here not logged)" and rec.left_out == 8
    assert one(12) is None
    now[0] += 1000  # a long quiet: the burst again, no more
    assert [one(i) is not None for i in range(4)] == [True] * 3 + [False]
    other = logging.LogRecord("qkdnet.z", logging.ERROR, "/x.py", 8, "other", None, None)
    assert limit.filter(other)  # another line of the same file has its own budget


def test_a_left_out_count_names_no_key_bytes(logged):
    """The line that says how many were left out is written with its arguments already
    scrubbed: the key in them is still only its length."""
    from control.core.logs import BURST, RepeatLimit

    handler = logging.getLogger().handlers[0]
    limit = next(f for f in handler.filters if isinstance(f, RepeatLimit))
    now = [0.0]
    limit.clock = lambda: now[0]
    log = logging.getLogger("qkdnet.z")
    for i in range(BURST + 5):
        if i == BURST + 4:
            now[0] += 60.0
        log.warning("block %s", KEY)
    lines = _lines(logged)
    assert len(lines) == BURST + 1 and lines[-1]["left_out"] == 4
    assert lines[-1]["message"] == "block <48 bytes> (4 more line(s) from here not logged)"
    assert all(KEY.hex() not in line for line in logged.getvalue().splitlines())


def test_a_child_forked_while_the_limit_was_held_can_still_log():
    """A process forked while another thread was inside the filter (its lock held) logs
    in the child all the same."""
    import os
    import signal

    from control.core.logs import RepeatLimit

    limit = RepeatLimit()
    rec = logging.LogRecord("qkdnet.z", logging.INFO, "/x.py", 1, "hi", None, None)
    with limit.lock:
        pid = os.fork()
        if pid == 0:
            signal.alarm(30)  # a child stuck on the lock dies of SIGALRM
            os._exit(0 if limit.filter(rec) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
