"""enc_keys requests checked once per worker (api.request_memo): pure, no I/O."""

from __future__ import annotations

from api.etsi import EncKeysRequest
from api.request_memo import MEMO_MAX_INPUT, RequestMemo, plan


def test_a_plan_is_what_the_request_resolves_to():
    p = plan(EncKeysRequest(4, 256, ("b2",)), "a1", "b1", "B")
    assert p.peer == "B" and p.nbytes == 4 * 32
    assert p.pair == ("B", "a1", ("b1", "b2"), 32) and p.slaves == ["b1", "b2"]


def test_kept_under_everything_it_was_checked_from():
    memo = RequestMemo()
    key = memo.key("a1", "b1", "GET", "number=1&size=256", b"")
    p = plan(EncKeysRequest(1, 256), "a1", "b1", "B")
    assert memo.get(key) is None
    memo.put(key, p)
    assert memo.get(memo.key("a1", "b1", "GET", "number=1&size=256", None)) is p
    assert memo.hits == 1
    for other in (("a2", "b1", "GET", "number=1&size=256", b""),   # another caller
                  ("a1", "b2", "GET", "number=1&size=256", b""),   # another slave
                  ("a1", "b1", "POST", "number=1&size=256", b""),  # another method
                  ("a1", "b1", "GET", "number=2&size=256", b""),   # other words
                  ("a1", "b1", "GET", "size=256&number=1", b""),
                  ("a1", "b1", "GET", "number=1&size=256", b"{}")):  # a body
        assert memo.get(memo.key(*other)) is None, other


def test_long_requests_are_not_kept_and_a_callers_full_memo_starts_over_alone():
    memo = RequestMemo(per_caller=3)
    assert memo.key("a1", "b1", "POST", "", b"x" * (MEMO_MAX_INPUT + 1)) is None
    memo.put(None, plan(EncKeysRequest(1, 256), "a1", "b1", "B"))
    assert memo.get(None) is None and not memo.plans
    other = memo.key("a2", "b1", "GET", "number=1&size=256", b"")
    memo.put(other, plan(EncKeysRequest(1, 256), "a2", "b1", "B"))
    keys = [memo.key("a1", "b1", "GET", f"number={n}&size=256", b"") for n in range(1, 5)]
    for n, k in enumerate(keys, 1):  # a1 asks ever new things
        memo.put(k, plan(EncKeysRequest(n, 256), "a1", "b1", "B"))
    assert len(memo.plans["a1"]) == 1 and memo.get(keys[3]).req.number == 4
    assert memo.get(other) is not None  # a2's is still kept
