"""Carving application keys from global key blocks, and key IDs (control/gkm/carving.py)."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control.gkm.carving import (
    MAX_BLOCK,
    MAX_NODE_ID,
    MAX_SEQ,
    CarveError,
    Cursor,
    KeySlice,
    carve,
    decode,
    id_text,
)

slices = st.builds(
    lambda o, d, s, size, off: KeySlice(o, d, s, min(off, MAX_BLOCK - size), size),
    st.integers(0, MAX_NODE_ID), st.integers(0, MAX_NODE_ID), st.integers(0, MAX_SEQ),
    st.integers(1, MAX_BLOCK - 1), st.integers(0, MAX_BLOCK - 1))


@given(slices)
def test_key_id_round_trips_and_is_an_rfc9562_version_8_uuid(s):
    u = s.key_id
    assert u.version == 8 and u.variant == uuid.RFC_4122
    assert decode(u) == s
    assert decode(str(u)) == s
    assert decode(str(u).upper()) == s


@given(slices)
def test_a_key_ids_bytes_and_text_are_its_uuids(s):
    assert s.id_bytes == s.key_id.bytes and decode(s.id_bytes) == s
    assert id_text(s.id_bytes) == str(uuid.UUID(bytes=s.id_bytes))


@pytest.mark.parametrize(("s", "text"), [
    (KeySlice(1, 2, 3, 4, 5), "00004000-8000-8000-8003-000004000005"),
    (KeySlice(MAX_NODE_ID, 7, MAX_SEQ, MAX_BLOCK - 2, 1),
     "3fffc001-ffff-8fff-bfff-fffffe000001")])
def test_key_ids_are_spelled_as_they_always_were(s, text):
    # Key IDs outlive a version: both nodes' stores key records by them, SAEs hold them.
    assert str(s.key_id) == text and decode(text) == s


@pytest.mark.parametrize("bad", [b"", bytes(15), bytes(17)])
def test_a_key_id_of_other_than_16_bytes_is_refused(bad):
    with pytest.raises(CarveError):
        decode(bad)
    with pytest.raises(ValueError):
        id_text(bad)


@given(slices, slices)
def test_different_slices_have_different_key_ids(a, b):
    assert (a.key_id == b.key_id) == (a == b)


@pytest.mark.parametrize("bad", ["", "not-a-uuid", "123", None, 42,
                                 "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e",  # version 4: not ours
                                 "00000000-0000-8000-0000-000000000000"])  # wrong variant
def test_decode_refuses_what_is_not_a_key_id(bad):
    with pytest.raises(CarveError):
        decode(bad)


def test_decode_refuses_an_unknown_layout():
    u = KeySlice(1, 2, 3, 4, 5).key_id.int | (1 << 126)  # layout bits live at the top
    with pytest.raises(CarveError, match="layout"):
        decode(uuid.UUID(int=u))


@pytest.mark.parametrize("kw", [dict(origin=-1), dict(destination=MAX_NODE_ID + 1),
                                dict(seq=MAX_SEQ + 1), dict(size=0),
                                dict(offset=MAX_BLOCK - 10, size=20)])
def test_slices_out_of_range_are_refused(kw):
    base = dict(origin=1, destination=2, seq=3, offset=0, size=16)
    with pytest.raises(CarveError):
        KeySlice(**{**base, **kw})


def test_carve_cuts_in_order_skips_a_short_rest_and_moves_the_cursor():
    blocks = {0: 100, 1: 100, 3: 64}
    keys, cur = carve(Cursor(0, 40), blocks, 3, 32, origin=1, destination=2)
    assert [(k.seq, k.offset) for k in keys] == [(0, 40), (1, 0), (1, 32)]  # 28 B skipped
    assert cur == Cursor(1, 64)
    keys, cur = carve(cur, blocks, 2, 32, origin=1, destination=2)
    assert [(k.seq, k.offset) for k in keys] == [(1, 64), (3, 0)]  # block 2 is not usable
    assert cur == Cursor(3, 32)
    with pytest.raises(CarveError, match="1 of 2"):  # one more fits, two do not: none
        carve(cur, blocks, 2, 32, origin=1, destination=2)
    keys, cur = carve(cur, blocks, 1, 32, origin=1, destination=2)
    assert [(k.seq, k.offset) for k in keys] == [(3, 32)] and cur == Cursor(3, 64)


def test_carve_refuses_whole_when_short():
    with pytest.raises(CarveError, match="2 of 3"):
        carve(Cursor(0, 0), {0: 64}, 3, 32, origin=1, destination=2)
    with pytest.raises(CarveError):
        carve(Cursor(0, 0), {0: 64}, 0, 32, origin=1, destination=2)


@given(st.lists(st.integers(1, 4096), min_size=1, max_size=8),
       st.lists(st.tuples(st.integers(1, 4), st.integers(1, 600)), min_size=1, max_size=20))
def test_carved_keys_never_share_a_byte_and_both_ends_find_identical_bytes(sizes, asks):
    # The origin's ENC block and the destination's DEC block are the same bytes.
    blocks = {seq: os.urandom(n) for seq, n in enumerate(sizes)}
    enc_store, dec_store = dict(blocks), {s: bytes(b) for s, b in blocks.items()}
    cursor, used, issued = Cursor(0, 0), set(), []
    for number, size in asks:
        try:
            keys, cursor = carve(cursor, {s: len(b) for s, b in enc_store.items()}, number,
                                 size, origin=7, destination=9)
        except CarveError:
            continue
        for k in keys:
            span = {(k.seq, i) for i in range(k.offset, k.offset + k.size)}
            assert not span & used, "a byte went into two keys"
            used |= span
            issued.append((str(k.key_id), enc_store[k.seq][k.offset:k.offset + k.size]))
    for key_id, master_bytes in issued:  # the slave's node knows only the key ID
        s = decode(key_id)
        assert (s.origin, s.destination) == (7, 9)
        assert dec_store[s.seq][s.offset:s.offset + s.size] == master_bytes
