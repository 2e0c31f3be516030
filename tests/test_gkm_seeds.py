"""Global key blocks grown from seeds: the same seed gives the same bytes, every time and
in every version (the origin's stores hold seeds, so the construction may never change)."""

from __future__ import annotations

import pytest

from control.gkm import seeds

# RFC 7539, A.1, test vector 1: ChaCha20 under the all-zero key, nonce and counter.
ZERO_KEY_STREAM = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586")


def test_a_block_is_the_chacha20_keystream_of_its_seed():
    assert seeds.expand(bytes(32), 64) == ZERO_KEY_STREAM
    assert seeds.expand(bytes(32), 1000)[:64] == ZERO_KEY_STREAM


def test_the_same_seed_gives_the_same_bytes_and_others_other_bytes():
    a, b = seeds.new_blocks(2, 4096)
    assert a.seed != b.seed and a.data != b.data
    assert len(a.data) == 4096 and seeds.expand(a.seed, 4096) == a.data
    assert seeds.expand(b.seed, 4096) == b.data


@pytest.mark.parametrize("seed", [b"", bytes(16), bytes(33)])
def test_a_seed_of_another_length_is_refused(seed):
    with pytest.raises(ValueError, match="32 bytes"):
        seeds.expand(seed, 64)


def test_a_block_never_shows_its_seed_or_bytes():
    b, = seeds.new_blocks(1, 64)
    assert repr(b) == "Block()"  # a log line or a traceback naming it shows no key
