"""Tests of the ring's lane API (dataplane/ring.py): per-worker ENC chunks, DEC lane words,
release_dec, locate and the durable claim high-water mark. Real /dev/shm files, no I/O
beyond them and a cursor file in tmp_path."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from uuid import uuid4

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dataplane.limits import RING_HEADER_SIZE
from dataplane.ring import (
    CONTROL_LANE,
    LANE_BASE,
    LANE_WORDS,
    MAX_LANES,
    ROLE_DEC,
    ROLE_ENC,
    SHM_DIR,
    CursorFile,
    KeyRing,
    RingError,
)
from tests.conftest import key

CAP = 1024
BLOCK = 32


@pytest.fixture
def name():
    n = f"qkdnet-lanes{os.getpid()}-{uuid4().hex[:8]}"
    yield n
    KeyRing.unlink(n)


class CountingCursorFile(CursorFile):
    def __init__(self, path):
        super().__init__(path)
        self.stores: list[int] = []

    def store(self, high_water: int) -> None:
        self.stores.append(high_water)
        super().store(high_water)


@pytest.fixture
def cursor(tmp_path):
    return CountingCursorFile(tmp_path / "ring.cursor")


@pytest.fixture
def make(name, cursor, opened):
    def _make(role: int = ROLE_ENC, capacity: int = CAP, cf: CursorFile | None = None):
        r = KeyRing.create_or_attach(name, capacity, BLOCK, role, cf or cursor)
        opened.append(r)
        return r
    return _make



def stream(name: str, capacity: int = CAP) -> bytes:
    """The whole data area, straight from the ring file."""
    with open(SHM_DIR / name, "rb") as f:
        f.seek(RING_HEADER_SIZE)
        return f.read(capacity)


def at(name: str, pos: int, n: int, capacity: int = CAP) -> bytes:
    """Bytes of stream positions [pos, pos+n) in the ring file, following the wrap."""
    data = stream(name, capacity)
    return bytes(data[(pos + i) % capacity] for i in range(n))


def zero(name: str, pos: int, n: int) -> bool:
    return at(name, pos, n) == bytes(n)


def filled(make, n: int = CAP, role: int = ROLE_ENC) -> KeyRing:
    r = make(role=role)
    r.append(0, key(n))
    return r


def use(r: KeyRing, lane: int, upto: int, wipe: bool = True) -> None:
    """What a worker does with its chunk: use bytes below ``upto``, wipe them, publish."""
    _, used, _ = r.chunk_of(lane)
    if wipe:
        r.wipe_used(used, upto - used)
    r.set_used(lane, upto)


# ---- chunks and the release point -----------------------------------------------------

def test_lanes_claim_disjoint_chunks_in_order(make):
    r = filled(make)
    got = {}
    for lane in (0, 1, 5, CONTROL_LANE):
        pos, n = r.claim_chunk(lane, 100)
        got[lane] = (pos, n)
        assert r.chunk_of(lane) == (pos, pos, pos + n)
    assert got == {0: (0, 100), 1: (100, 100), 5: (200, 100), CONTROL_LANE: (300, 100)}
    assert r.claim_pos == 400
    assert r.release_pos == 0 and r.free_pos == 0
    assert r.chunk_of(2) == (0, 0, 0)  # never held one


def test_release_waits_for_the_lowest_used_of_the_held_chunks(make, name):
    r = filled(make)
    assert r.claim_chunk(0, 100) == (0, 100)
    assert r.claim_chunk(1, 100) == (100, 100)
    assert r.claim_chunk(2, 100) == (200, 100)
    # lane 2 finishes first: nothing can be freed, lane 0 still reads from 0
    use(r, 2, 300)
    r.retire(2)
    assert (r.release_pos, r.free_pos) == (0, 0)
    # lane 1 finishes: still held back by lane 0
    use(r, 1, 150)
    r.retire(1)
    assert (r.release_pos, r.free_pos) == (0, 0)
    # lane 0 has used 40 bytes: the release point follows at the next lock (a claim)
    use(r, 0, 40)
    assert r.claim_chunk(3, 50) == (300, 50)
    assert (r.release_pos, r.free_pos) == (40, 40)
    # lane 0 gives up: the lowest held byte is now lane 3's
    r.retire(0)
    assert (r.release_pos, r.free_pos) == (300, 300)
    use(r, 3, 320)
    r.retire(3)
    # nothing held: up to claim_pos, which lane 3's unused rest went back below
    assert (r.release_pos, r.free_pos) == (320, 320)
    assert r.claim_pos == 320
    assert zero(name, 0, 320)
    assert at(name, 320, CAP - 320) == key(CAP)[320:]


def test_release_point_never_passes_a_held_used_mark(make):
    r = filled(make)
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 100)
    use(r, 1, 170)
    use(r, 0, 90)
    r.retire(1)
    assert r.release_pos == 90
    use(r, 0, 100)  # lane 0 used its whole chunk but still holds it
    r.retire(7)  # a lane holding nothing: just moves the release point
    assert r.release_pos == 100
    assert r.chunk_of(0) == (0, 100, 100)


def test_read_below_the_release_point_fails_but_held_bytes_are_readable(make):
    r = filled(make)
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 100)
    r.retire(0)
    assert r.release_pos == 100
    with pytest.raises(RingError):
        r.read(99, 2)
    assert bytes(r.read(100, 100)) == key(CAP)[100:200]


# ---- wiping ---------------------------------------------------------------------------

def test_retire_alive_wipes_exactly_used_to_end(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 100)
    r.claim_chunk(2, 100)
    use(r, 1, 130, wipe=False)  # the holder claims it wiped [100, 130): retire trusts it
    r.retire(1)
    data = key(CAP)
    assert at(name, 0, 100) == data[:100]  # lane 0's chunk: untouched
    assert at(name, 100, 30) == data[100:130]  # [start, used): the holder's business
    assert zero(name, 130, 70)  # [used, end): wiped
    assert at(name, 200, 100) == data[200:300]  # lane 2's chunk: untouched
    assert at(name, 300, CAP - 300) == data[300:]  # unclaimed: untouched
    assert r.chunk_of(1)[2] == 0


def test_retire_dead_wipes_the_whole_chunk(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 100)
    r.claim_chunk(2, 100)
    use(r, 1, 130, wipe=False)  # killed before it could wipe what it used
    r.retire(1, dead=True)
    data = key(CAP)
    assert at(name, 0, 100) == data[:100]
    assert zero(name, 100, 100)
    assert at(name, 200, CAP - 200) == data[200:]
    assert r.chunk_of(1)[2] == 0
    assert r.release_pos == 0  # lane 0 still holds [0, 100)


def test_bytes_wiped_by_the_holder_stay_zero(make, name):
    r = filled(make)
    r.claim_chunk(0, 200)
    r.claim_chunk(1, 10)  # claimed past lane 0's chunk: its rest cannot go back
    use(r, 0, 60)
    assert zero(name, 0, 60)
    assert at(name, 60, 140) == key(CAP)[60:200]
    r.retire(0)
    assert zero(name, 0, 200)
    assert at(name, 210, CAP - 210) == key(CAP)[210:]
    assert r.release_pos == 200
    assert r.accounting().wasted == 140


def test_the_last_chunk_claimed_hands_its_rest_back_unwiped(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 200)
    use(r, 1, 160)
    r.retire(1)  # [160, 300) goes back: claimed again, never wiped or wasted
    assert r.claim_pos == 160 and r.chunk_of(1)[2] == 0
    assert at(name, 160, CAP - 160) == key(CAP)[160:]
    assert r.release_pos == 0  # lane 0 still holds [0, 100)
    assert r.claim_chunk(2, 100) == (160, 100)
    assert r.accounting().wasted == 0


def test_a_chunk_continues_where_the_same_lane_left_off_when_it_is_the_last(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)
    use(r, 0, 70)
    assert r.claim_chunk(0, 100) == (70, 100)  # the 30 bytes left come first
    assert at(name, 70, 100) == key(CAP)[70:170]
    assert r.accounting().wasted == 0
    r.claim_chunk(1, 10)  # now lane 0's chunk is not the last one any more
    use(r, 0, 150)
    assert r.claim_chunk(0, 100, if_top=True) == (-1, 0)  # kept, nothing claimed
    assert r.chunk_of(0) == (70, 150, 170)
    assert r.claim_chunk(0, 100) == (180, 100)  # given up: its rest [150, 170) wiped
    assert zero(name, 150, 20)
    assert r.accounting().wasted == 20


def test_idle_give_back_keeps_a_chunk_until_it_pins_the_ring(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)
    use(r, 0, 40)
    r.claim_chunk(1, 100)  # lane 0's chunk is not the last any more
    assert not r.give_back_idle(0, pin_limit=500)  # kept for its holder: no waste
    assert r.chunk_of(0) == (0, 40, 100)
    use(r, 1, 200)
    r.retire(1)
    r.claim_chunk(2, 400)
    use(r, 2, 600)  # others used 560 bytes past lane 0's used mark
    assert r.give_back_idle(2, pin_limit=500)  # the last chunk: back (all used)
    assert r.claim_pos == 600
    assert r.give_back_idle(0, pin_limit=500)  # pins the ring by more than the limit
    assert r.chunk_of(0)[2] == 0
    assert zero(name, 40, 60)
    assert r.accounting().wasted == 60
    assert r.release_pos == 600
    # the last chunk claimed always goes back at once
    r.claim_chunk(3, 50)
    assert r.give_back_idle(3, pin_limit=10**9)
    assert r.claim_pos == 600 and r.accounting().wasted == 60


def test_claim_chunk_claims_nothing_below_min_take(make):
    r = make()
    r.append(0, key(100))
    assert r.claim_chunk(0, 500, min_take=101) == (0, 0)
    assert r.claim_pos == 0 and r.chunk_of(0)[2] == 0
    assert r.claim_chunk(0, 500, reserve=20, min_take=81) == (0, 0)
    assert r.claim_chunk(0, 500, reserve=20, min_take=80) == (0, 80)
    assert r.accounting().wasted == 0


def test_reset_lanes_wipes_every_held_chunk_whole(make, name):
    r = filled(make)
    for lane in range(4):
        r.claim_chunk(lane, 100)
    r.claim_chunk(CONTROL_LANE, 50)
    use(r, 0, 30)
    use(r, 2, 250)
    r.wipe_used(250, 20)  # lane 2's holder was killed mid-wipe, before it published
    r.retire(3)  # already given up: stays so
    r.reset_lanes()
    assert all(r.chunk_of(lane)[2] == 0 for lane in range(MAX_LANES))
    assert zero(name, 0, 450)
    assert at(name, 450, CAP - 450) == key(CAP)[450:]  # never claimed: kept
    assert (r.release_pos, r.free_pos, r.claim_pos) == (450, 450, 450)
    assert r.claim_chunk(0, 10) == (450, 10)  # what was held is never handed out again


def test_retire_of_a_wrapping_chunk_wipes_across_the_end(make, name):
    r = filled(make)
    r.claim_chunk(0, 900)
    use(r, 0, 900)
    r.retire(0)
    assert r.free_pos == 900
    r.append(CAP, key(500, 9))  # positions 1024..1523: the ring holds [900, 1524)
    assert r.claim_chunk(1, 300) == (900, 300)  # offsets 900..1023, then 0..175
    assert r.claim_chunk(2, 50) == (1200, 50)
    use(r, 1, 950)
    r.retire(1)
    assert zero(name, 900, 300)
    assert at(name, 1200, 324) == key(500, 9)[176:]  # lane 2 and the unclaimed rest
    assert r.release_pos == 1200


# ---- claim_chunk: amounts -------------------------------------------------------------

def test_claim_chunk_without_key_returns_nothing(make):
    r = make()
    assert r.claim_chunk(0, 100) == (0, 0)
    assert r.chunk_of(0)[2] == 0
    r.append(0, key(60))
    assert r.claim_chunk(0, 100) == (0, 60)  # partial: what there is
    assert r.chunk_of(0) == (0, 0, 60)
    assert r.claim_chunk(1, 100) == (60, 0)  # none left
    assert r.chunk_of(1)[2] == 0
    assert r.claim_pos == 60


def test_claim_chunk_gives_up_the_previous_chunk(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 100)
    use(r, 0, 40)
    assert r.claim_chunk(0, 100) == (200, 100)
    assert zero(name, 0, 100)  # the unused rest [40, 100) too: lane 1 claimed past it
    assert r.release_pos == 100
    # also when no new key is there: the old chunk is given up all the same
    r.claim_chunk(0, CAP)
    use(r, 0, CAP)
    assert r.claim_chunk(0, 10) == (CAP, 0)
    assert r.chunk_of(0)[2] == 0
    assert r.release_pos == 100  # lane 1 still holds [100, 200)


class FailingCursorFile(CursorFile):
    def store(self, high_water: int) -> None:
        raise OSError("disk full")


def test_claim_chunk_hands_out_nothing_it_could_not_make_durable(make, tmp_path):
    r = make(cf=FailingCursorFile(tmp_path / "c"))
    r.append(0, key(100))
    with pytest.raises(OSError, match="disk full"):
        r.claim_chunk(0, 40)
    assert r.claim_pos == 0
    assert r.chunk_of(0)[2] == 0


# ---- claim_chunk: the durable high-water mark ------------------------------------------

def test_claim_chunk_is_durable_before_returning(make, cursor):
    r = filled(make)
    for lane in range(8):
        pos, n = r.claim_chunk(lane, 100)
        assert n > 0
        assert cursor.load() >= pos + n
        assert CursorFile(cursor.path).load() >= pos + n  # as a restarted node reads it


def test_claims_within_the_durable_window_do_not_rewrite_the_cursor_file(make, cursor):
    r = filled(make)
    pos, n = r.claim_chunk(0, 10)
    assert len(cursor.stores) == 1
    mark = cursor.load()
    assert mark >= pos + n
    content = cursor.path.read_bytes()
    claims = 0
    for i in range(1, 1000):
        free = CAP - (r.write_pos - r.free_pos)
        if free:
            r.append(r.write_pos, key(free, i))
        pos, n = r.claim_chunk(i % 8, 10)
        assert n == 10
        if pos + n > mark:
            break
        claims += 1
        assert cursor.path.read_bytes() == content
    assert claims >= 50  # many claims happened inside the window
    # one store for the first claim and one for the claim that left the window
    assert len(cursor.stores) == 2
    assert cursor.load() >= pos + n > mark
    assert cursor.path.read_bytes() != content


def test_claims_within_the_window_leave_the_file_as_it_was(make, cursor):
    r = filled(make)
    r.claim_chunk(0, 10)
    st = os.stat(cursor.path)
    content = cursor.path.read_bytes()
    for lane in range(1, 6):
        r.claim_chunk(lane, 10)
    st2 = os.stat(cursor.path)
    assert (st2.st_ino, st2.st_mtime_ns, st2.st_size) == (st.st_ino, st.st_mtime_ns,
                                                         st.st_size)
    assert cursor.path.read_bytes() == content
    assert len(cursor.stores) == 1


def test_after_a_reboot_no_claimed_position_is_handed_out_again(make, name, cursor):
    r = make()
    claimed: set[int] = set()
    w = 0
    for i in range(30):  # several laps, so that marks are stored more than once
        free = CAP - (r.write_pos - r.free_pos)
        if free:
            r.append(w, key(free, i))
            w += free
        lane = i % 4
        use(r, lane, r.chunk_of(lane)[2] or r.chunk_of(lane)[1])
        pos, n = r.claim_chunk(lane, 97)
        assert n > 0
        assert not claimed & set(range(pos, pos + n))
        claimed |= set(range(pos, pos + n))
    assert len(cursor.stores) >= 2
    top = max(claimed) + 1
    r.close()
    KeyRing.unlink(name)  # a reboot: /dev/shm is gone, the cursor file is not
    r2 = make()
    assert r2.write_pos >= top and r2.claim_pos >= top and r2.release_pos >= top
    assert r2.free_pos == r2.write_pos
    # what a reboot skips is bounded: the mark is at most a capacity beyond the claims
    assert r2.write_pos <= top + CAP
    assert r2.chunk_of(0) == (0, 0, 0)
    r2.append(r2.write_pos, key(200, 3))
    pos, n = r2.claim_chunk(0, 100)
    assert n == 100 and pos >= top
    assert cursor.load() >= pos + n


def test_after_a_process_crash_the_durable_mark_is_kept(make, name, cursor):
    """The ring survives in /dev/shm: no new store needed for claims inside the window."""
    r = filled(make)
    r.claim_chunk(0, 10)
    r.close()
    r2 = make()
    assert r2.chunk_of(0) == (0, 0, 10)
    r2.claim_chunk(1, 10)
    assert len(cursor.stores) == 1


# ---- DEC: release_dec and lane words --------------------------------------------------

def test_release_dec_wipes_and_frees_bounded_by_write_pos(make, name):
    r = filled(make, 600, role=ROLE_DEC)
    r.release_dec(200)
    assert (r.release_pos, r.free_pos) == (200, 200)
    assert zero(name, 0, 200)
    assert at(name, 200, 400) == key(600)[200:]
    r.release_dec(100)  # backwards: nothing
    assert (r.release_pos, r.free_pos) == (200, 200)
    assert at(name, 200, 400) == key(600)[200:]
    r.release_dec(200)
    assert r.release_pos == 200
    r.release_dec(10_000)  # bounded by write_pos
    assert (r.release_pos, r.free_pos, r.write_pos) == (600, 600, 600)
    assert zero(name, 0, 600)
    r.release_dec(0)
    assert r.release_pos == 600
    # the writer may now fill the whole capacity again
    r.append(600, key(CAP, 4))
    assert bytes(r.read(600, CAP)) == key(CAP, 4)


def test_dec_lane_words_are_independent(make):
    r = filled(make, 100, role=ROLE_DEC)
    before = (r.write_pos, r.claim_pos, r.release_pos, r.free_pos, r.capacity, r.epoch)
    assert all(r.lane_next(lane) == 0 for lane in range(MAX_LANES))
    values = {lane: (lane + 1) * 1_000_003 + (1 << 40) * (lane % 3) for lane in
              range(MAX_LANES)}
    for lane in range(MAX_LANES):
        r.set_lane_next(lane, values[lane])
        for other in range(MAX_LANES):  # no lane's word touches another's
            assert r.lane_next(other) == (values[other] if other <= lane else 0)
    assert (r.write_pos, r.claim_pos, r.release_pos, r.free_pos, r.capacity,
            r.epoch) == before
    assert bytes(r.read(0, 100)) == key(100)
    r.set_lane_next(CONTROL_LANE, 2**64 - 1)
    assert r.lane_next(CONTROL_LANE) == 2**64 - 1
    assert r.lane_next(CONTROL_LANE - 1) == values[CONTROL_LANE - 1]


def test_dec_lane_words_survive_a_process_restart(make):
    r = filled(make, 100, role=ROLE_DEC)
    r.set_lane_next(4, 77)
    r.close()
    assert make(role=ROLE_DEC).lane_next(4) == 77


# ---- locate ---------------------------------------------------------------------------

@pytest.mark.parametrize("pos,n", [(0, 1), (0, CAP), (100, 200), (CAP - 50, 50),
                                   (CAP - 50, 51), (CAP - 1, 300), (CAP + 10, 5)])
def test_locate_matches_read_and_points_at_the_bytes(make, pos, n):
    r = make(role=ROLE_DEC)
    data = key(CAP, 1) + key(CAP, 2)
    r.append(0, data[:CAP])
    r.release_dec(min(pos, CAP))
    r.append(CAP, data[CAP:CAP + r.free_pos])
    pad, addr = r.locate(pos, n)
    assert bytes(pad) == bytes(r.read(pos, n)) == data[pos:pos + n]
    assert ctypes.string_at(addr, n) == data[pos:pos + n]
    assert addr == pad.ctypes.data
    off = pos % CAP
    wraps = off + n > CAP
    in_ring = r.data_addr <= addr < r.data_addr + CAP
    assert in_ring != wraps
    if not wraps:
        assert addr == r.data_addr + off
    else:  # a copy: writing it leaves the ring alone
        pad[:] = 0
        assert bytes(r.read(pos, n)) == data[pos:pos + n]


def test_data_addr_is_the_ring_files_data_area(make, name):
    r = filled(make)
    assert ctypes.string_at(r.data_addr, CAP) == stream(name)


# ---- the writer's bound ---------------------------------------------------------------

def test_append_only_below_free_pos_plus_capacity(make):
    r = filled(make)
    with pytest.raises(RingError, match="do not fit"):
        r.append(CAP, b"\x01")
    r.claim_chunk(0, 100)
    r.claim_chunk(1, 100)
    use(r, 1, 200)
    r.retire(1)  # lane 0 still holds [0, 100): nothing can be freed
    assert r.free_pos == 0
    with pytest.raises(RingError, match="do not fit"):
        r.append(CAP, b"\x01")
    use(r, 0, 60)
    r.retire(0)
    assert r.free_pos == 200
    with pytest.raises(RingError, match=r"\(200 B free\)"):
        r.append(CAP, key(201))
    assert r.write_pos == CAP
    r.append(CAP, key(200, 6))  # exactly up to free_pos + capacity
    assert r.write_pos == CAP + 200 == r.free_pos + CAP
    with pytest.raises(RingError, match="do not fit"):
        r.append(CAP + 200, b"\x01")
    # the bytes still to be claimed were not overwritten
    assert bytes(r.read(200, CAP - 200)) == key(CAP)[200:]


def test_a_held_chunk_blocks_the_writer_however_many_others_finish(make, name):
    r = filled(make)
    r.claim_chunk(0, 100)  # [0, 100), held for ever
    w = CAP
    for lane in range(1, 30):
        pos, n = r.claim_chunk(lane % 5 + 1, 50)
        free = CAP - (r.write_pos - r.free_pos)
        if free:
            r.append(w, key(free, lane))
            w += free
        if n == 0:
            break
    assert r.release_pos == 0 and r.free_pos == 0
    assert r.write_pos == CAP
    assert bytes(r.read(0, 100)) == key(CAP)[:100]


def test_claim_chunk_leaves_the_reserve_to_others(make):
    r = make()
    r.append(0, key(1000))
    assert r.claim_chunk(0, 2000, reserve=100) == (0, 900)
    assert r.claim_chunk(1, 50, reserve=100) == (900, 0)  # only the reserve is left
    assert r.claim_chunk(CONTROL_LANE, 100) == (900, 100)  # ... for the keepalives


def test_giving_up_a_half_published_chunk_never_wipes_unclaimed_key(make, name):
    # A holder killed after publishing its lane words but before claim_pos moved (the
    # order claim_chunk avoids) must not make a later give-up wipe unclaimed bytes.
    r = make()
    r.append(0, key(600))
    assert r.claim_chunk(0, 100) == (0, 100)
    hdr = np.ndarray((512,), dtype=np.uint64, buffer=r._mm)
    base = LANE_BASE + LANE_WORDS * 1
    hdr[base], hdr[base + 1], hdr[base + 2] = 100, 100, 400  # lane 1 "holds" [100, 400)
    r.retire(1, dead=True)
    assert at(name, 100, 500) == key(600)[100:600]  # still there, still claimable
    assert r.claim_chunk(2, 500) == (100, 500)


@pytest.mark.parametrize("give_up", ["retire dead", "reset_lanes"])
def test_a_dead_holders_chunk_never_wipes_key_written_after_the_release_passed_it(
        make, name, give_up):
    # A full ring (the key manager keeps it so): the release point follows a held
    # chunk's used mark, so the writer refills the slots of what the holder used while
    # it still holds the chunk. Giving the chunk up as dead (a killed worker, a tunnel
    # manager's restart) wipes its unused rest, never those slots' new key: else the
    # next claims meet wiped key, and a link whose keepalives meet it stays down.
    r = filled(make)
    assert r.claim_chunk(0, 100) == (0, 100)
    use(r, 0, 60)
    assert r.claim_chunk(1, 10) == (100, 10)  # another worker's claim moves the release
    assert (r.release_pos, r.free_pos) == (60, 60)
    fresh = key(60, seed=7)
    r.append(CAP, fresh)  # slots 0-59 now hold positions 1024-1083
    if give_up == "retire dead":
        r.retire(0, dead=True)
    else:
        r.reset_lanes()
    assert zero(name, 60, 40)  # the chunk's rest: wiped, never handed out
    assert at(name, CAP, 60) == fresh
    assert at(name, 110, CAP - 110) == key(CAP)[110:]
    assert r.claim_chunk(2, CAP - 50) == (110, CAP - 50)


def test_wiped_key_met_by_a_holder_gives_its_chunk_up_and_skips_the_run_ahead(make, name):
    # Wiped key at or above the claims is a bug's trace (as the give-up fixed above left):
    # the holder that meets it gives its chunk up whole, and the zeros ahead of the claims
    # are skipped at once, counted as wasted, so the next claims start on key instead of
    # meeting the run a keepalive (about 100 B) at a time.
    r = filled(make)
    assert r.claim_chunk(0, 100) == (0, 100)
    use(r, 0, 20)
    r._wipe(20, 500)  # the chunk's rest and 400 B of unclaimed key
    assert r.retire_wiped(0) == 400
    assert r.chunk_of(0)[2] == 0 and r.claim_pos == 500
    acct = r.accounting()
    assert acct.balance == 0 and acct.wasted == 80 + 400 and acct.used_data == 20
    pos, take = r.claim_chunk(1, 100)
    assert (pos, take) == (500, 100) and at(name, 500, 100) == key(CAP)[500:600]
    # Nothing wiped ahead: nothing skipped, the chunk still given up (nothing of it used).
    assert r.retire_wiped(1) == 0 and r.claim_pos == 600 and r.chunk_of(1)[2] == 0


def test_a_wiped_run_is_skipped_across_the_wrap_and_up_to_the_write_position(make, name):
    r = filled(make)
    assert r.claim_chunk(0, 900) == (0, 900)
    use(r, 0, 900)
    r.retire(0)
    r.append(CAP, key(900, seed=3))  # positions 1024-1923 in slots 0-899
    r._wipe(900, 1100)  # across the end of the data area
    assert r.retire_wiped(CONTROL_LANE) == 200 and r.claim_pos == 1100
    assert r.claim_chunk(CONTROL_LANE, 50) == (1100, 50)
    r._wipe(1150, 1924)  # everything unclaimed: skipped to the write position
    assert r.retire_wiped(CONTROL_LANE) == 1924 - 1150
    assert r.claim_pos == r.write_pos == 1924 and r.release_pos == 1924
    assert r.accounting().balance == 0


# ---- accounting: a random schedule of a ring's users -------------------------------------

LANES = [0, 1, 2, CONTROL_LANE]
OPS = ["append", "claim", "use", "retire", "dead", "idle", "skip", "reset"]


def _step(r: KeyRing, op: str, lane: int, n: int, used: set[int]) -> None:
    """One step of a ring's users in a random schedule; ``used`` gathers every position
    a holder used or may have used (a dead one's whole chunk)."""
    if op == "append":
        free = r.capacity - (r.write_pos - r.free_pos)
        if free:
            r.append(r.write_pos, key(min(n, free), n))
    elif op == "claim":
        r.claim_chunk(lane, n, reserve=n % 7, min_take=n % 5 + 1, if_top=bool(n % 2))
    elif op == "use":  # as a worker: the next bytes of its chunk, each once
        start, u, end = r.chunk_of(lane)
        if end:
            upto = min(end, u + n)
            assert not used & set(range(u, upto)), "a byte used twice"
            used |= set(range(u, upto))
            r.wipe_used(u, upto - u)
            r.set_used(lane, upto)
    elif op == "retire":
        r.retire(lane)
    elif op in ("dead", "wiped"):  # its holder was killed, or met wiped key: nothing of
        start, u, end = r.chunk_of(lane)  # its chunk is used again
        used |= set(range(start, end))
        if op == "dead":
            r.retire(lane, dead=True)
        else:
            r.retire_wiped(lane)
            c, w = r.claim_pos, r.write_pos
            assert c == w or r.read(c, 1)[0] != 0, "claims start on wiped key"
    elif op == "idle":
        r.give_back_idle(lane, pin_limit=n * 5)
    elif op == "skip":
        r.skip_to(r.write_pos + n % 3 * 50)
    elif op == "reset":
        for lane_ in LANES:
            start, u, end = r.chunk_of(lane_)
            used |= set(range(start, end))
        r.reset_lanes()
    elif op == "wipe ahead":  # a bug's trace: zeros from the claims on
        r._lock()
        try:
            r._wipe(r.claim_pos, min(r.write_pos, r.claim_pos + n))
        finally:
            r._unlock()
    acct = r.accounting()
    assert acct.balance == 0, (op, acct)
    assert r.free_pos <= r.release_pos <= r.claim_pos <= r.write_pos


@contextlib.contextmanager
def _ring_for(tmp_path_factory, tag: str) -> Iterator[KeyRing]:
    """A fresh ENC ring of CAP bytes (often full), closed and removed afterwards."""
    name = f"qkdnet-{tag}{os.getpid()}-{uuid4().hex[:8]}"
    cf = CursorFile(tmp_path_factory.mktemp(tag) / "c")
    r = KeyRing.create_or_attach(name, CAP, BLOCK, ROLE_ENC, cf)
    try:
        yield r
    finally:
        r.close()
        KeyRing.unlink(name)


@settings(max_examples=200)
# a dead holder's chunk after the release passed its start and the writer refilled there
@example([("append", 0, 300)] * 4 + [("claim", 0, 100), ("use", 0, 60), ("claim", 1, 10),
                                     ("append", 0, 60), ("dead", 0, 1)])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 3), st.integers(1, 300)),
                max_size=60))
def test_every_byte_is_accounted_for_and_none_is_used_twice(tmp_path_factory, ops):
    used: set[int] = set()
    with _ring_for(tmp_path_factory, "acct") as r:
        for op, li, n in ops:
            _step(r, op, LANES[li], n, used)
            c, w = r.claim_pos, r.write_pos  # unclaimed key is never wiped under anyone
            assert w == c or r.read(c, w - c).all(), (op, "unclaimed key wiped")


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(OPS + ["wipe ahead", "wiped"]), st.integers(0, 3),
                          st.integers(1, 300)), max_size=60))
def test_wiped_key_met_and_skipped_keeps_every_byte_accounted_for(tmp_path_factory, ops):
    # Zeros written ahead of the claims (what the give-up bug left) and holders that meet
    # them: the balance stays exact, no byte is used twice, and after a skip the claims
    # start on key.
    used: set[int] = set()
    with _ring_for(tmp_path_factory, "wiped") as r:
        for op, li, n in ops:
            _step(r, op, LANES[li], n, used)
