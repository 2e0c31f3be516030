"""The key API fuzzer's request generator (bench.fuzz_cases), without a network."""

from __future__ import annotations

import random
from collections import Counter

from bench.fuzz_cases import SEND, WHO, draw


def cases(n: int, seed: int = 7):
    rng = random.Random(seed)
    return [draw(rng) for _ in range(n)]


def test_the_same_seed_gives_the_same_cases():
    assert cases(300) == cases(300)
    assert cases(300) != cases(300, seed=8)


def test_every_way_of_sending_and_every_identity_is_drawn():
    got = cases(3000)
    assert {c.send for c in got} == set(SEND)
    assert {c.who for c in got} == set(WHO)
    methods = Counter(c.method for c in got)
    assert {"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"} <= set(methods)


def test_valid_cases_are_well_formed_requests_for_the_slave():
    got = [c for c in cases(3000) if c.valid]
    assert len(got) > 100, "too few valid requests to take key"
    for c in got:
        head, _, body = c.raw.partition(b"\r\n\r\n")
        line = head.split(b"\r\n")[0].decode()
        method, target, version = line.split(" ")
        assert version == "HTTP/1.1" and method in ("GET", "POST")
        assert target.startswith("/api/v1/keys/SAE-B/")
        assert c.send != "cut"
        if method == "POST":
            assert f"Content-Length: {len(body)}".encode() in head


def test_most_cases_are_almost_right_not_noise():
    got = cases(3000)
    aimed = sum(1 for c in got if c.endpoint)
    assert 0.6 < aimed / len(got) < 0.95
    assert sum(c.valid for c in got) < len(got) / 3
