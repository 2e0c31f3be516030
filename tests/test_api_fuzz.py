"""The running key API under fuzzed requests (issue 17 item 5, the short version of
`qkdctl bench fuzz`): two real nodes, A's KME over HTTPS with mutual TLS, requests of
every kind sent whole, slowly and cut off, as the master SAE, another SAE and nobody."""

from __future__ import annotations

import pytest
from rich.console import Console

from bench.fuzz import run

pytestmark = pytest.mark.netns


def test_fuzzed_requests_get_only_the_standards_answers_and_take_only_what_they_get():
    r = run(requests=3000, clients=4, seed=11, console=Console(quiet=True))
    assert r["unexpected_statuses"] == {}, r["examples"]
    assert set(r["statuses"]) <= {"200", "400", "401", "503"}
    # Every kind of answer was provoked, and nearly every request answered.
    assert {"200", "400", "401"} <= set(r["statuses"]), r["statuses"]
    assert r["answered"] + r["cut"] + r["closed_without_answer"] == r["requests"]
    # Sanic dropped the connection without a word on a URL it could not parse (a tab, a
    # NUL): some 15 % of these requests before api.server's request class. Left, and not
    # fixed yet: a request the KME refuses at its first line (a bad method, say) and
    # closes while bytes of it are still unread, or still arriving (sent slowly): the
    # close is then a reset, which discards the 400 it sent. One such request came in
    # two of three suite runs; 5 in 100,000 in the long run. (A request the client cuts
    # off that the KME refused and closed first counts as cut: no answer was awaited. On
    # a busy machine 2-5 a run did, and failed this bound as "closed without answer".)
    assert r["closed_without_answer"] <= 3, r["examples"]
    assert 0 <= r["cut_closed_by_kme"] <= r["cut"]
    assert r["restarted"] == [] and r["api_workers_same"]
    assert r["bad_answers"] == 0
    # The store took exactly the keys handed out (it drops by them and by block rests too
    # small for a request, which carving skips), and B reserved exactly those keys.
    assert r["keys_handed_out"] > 0
    assert r["taken_keys"] == r["keys_handed_out"]
    assert r["taken_bytes"] == r["key_bytes_handed_out"]
    assert 0 <= r["carving_skipped_bytes"] < r["carving_bound_bytes"]
    assert r["reserved_at_b_added"] == r["keys_handed_out"]
    assert r["meets"]
