"""Tests of the shared-memory key rings (dataplane/ring.py), on real /dev/shm files."""

from __future__ import annotations

import multiprocessing
import os
from uuid import uuid4

import numpy as np
import pytest

from dataplane.limits import RING_HEADER_SIZE
from dataplane.ring import ROLE_DEC, ROLE_ENC, SHM_DIR, CursorFile, KeyRing, RingError
from tests.conftest import key

CAP = 256
BLOCK = 32


@pytest.fixture
def name():
    n = f"qkdnet-test{os.getpid()}-{uuid4().hex[:8]}"
    yield n
    KeyRing.unlink(n)


@pytest.fixture
def cursor(tmp_path):
    return CursorFile(tmp_path / "ring.cursor")


@pytest.fixture
def make(name, cursor, opened):
    def _make(role: int = ROLE_DEC, capacity: int = CAP, cf: CursorFile | None = None):
        r = KeyRing.create_or_attach(name, capacity, BLOCK, role, cf or cursor)
        opened.append(r)
        return r
    return _make



def raw(name: str, pos: int, n: int, capacity: int = CAP) -> bytes:
    """Bytes of stream positions [pos, pos+n) read straight from the ring file (no wrap)."""
    off = pos % capacity
    assert off + n <= capacity
    with open(SHM_DIR / name, "rb") as f:
        f.seek(RING_HEADER_SIZE + off)
        return f.read(n)


def cursors(r: KeyRing) -> tuple[int, int, int]:
    return r.write_pos, r.claim_pos, r.release_pos


# ---- creating, writing, reading --------------------------------------------------------

def test_create(make, name):
    r = make()
    assert r.capacity == CAP
    assert r.block_size == BLOCK
    assert cursors(r) == (0, 0, 0)
    c = r.cursors()
    assert (c.fill, c.free, c.capacity) == (0, CAP, CAP)
    path = SHM_DIR / name
    assert path.stat().st_size == RING_HEADER_SIZE + CAP
    assert path.read_bytes()[:8] == b"QKDRING1"
    assert raw(name, 0, CAP) == bytes(CAP)


def test_append_publishes_and_read_returns_the_same_bytes(make, name):
    r = make()
    r.append(0, key(100))
    assert cursors(r) == (100, 0, 0)
    assert r.cursors().fill == 100 and r.cursors().free == CAP - 100
    assert bytes(r.read(0, 100)) == key(100)
    assert bytes(r.read(10, 5)) == key(100)[10:15]
    assert raw(name, 0, 100) == key(100)
    # numpy arrays and memoryviews are accepted too
    r.append(100, np.frombuffer(key(20, 7), dtype=np.uint8))
    r.append(120, memoryview(key(8, 9)))
    assert r.write_pos == 128
    assert bytes(r.read(100, 28)) == key(20, 7) + key(8, 9)


def test_read_outside_written_range_raises(make):
    r = make()
    r.append(0, key(50))
    with pytest.raises(RingError, match="not available"):
        r.read(40, 11)
    with pytest.raises(RingError, match="not available"):
        r.read(50, 1)


@pytest.mark.parametrize("pos", [1, 99, 101])
def test_append_at_wrong_position_raises_and_changes_nothing(make, name, pos):
    r = make()
    r.append(0, key(100))
    with pytest.raises(RingError, match="write_pos is 100"):
        r.append(pos, key(10, 50))
    assert cursors(r) == (100, 0, 0)
    assert raw(name, 0, CAP) == key(100) + bytes(CAP - 100)


def test_append_beyond_free_space_raises_and_changes_nothing(make, name):
    r = make()
    r.append(0, key(200))
    with pytest.raises(RingError, match=r"do not fit \(56 B free\)"):
        r.append(200, key(57, 3))
    assert cursors(r) == (200, 0, 0)
    assert raw(name, 0, CAP) == key(200) + bytes(56)
    r.append(200, key(56, 3))  # exactly full is fine
    assert r.cursors().free == 0
    with pytest.raises(RingError, match="do not fit"):
        r.append(256, b"\x01")
    assert cursors(r) == (256, 0, 0)


def test_wrap_around(make, name):
    r = make()
    r.append(0, key(200))
    r.release(150)
    data = key(150, 11)
    r.append(200, data)  # positions 200..349: offsets 200..255 then 0..93
    assert cursors(r) == (350, 0, 150)
    assert r.cursors().fill == 200
    assert raw(name, 200, 56) == data[:56]
    assert raw(name, 0, 94) == data[56:]
    got = r.read(180, 120)  # crosses the end of the data area
    assert bytes(got) == key(200)[180:] + data[:100]
    assert bytes(r.read(256, 94)) == data[56:]
    # the still-unreleased bytes at offsets 150..199 were not overwritten
    assert raw(name, 150, 50) == key(200)[150:]


# ---- release --------------------------------------------------------------------------

def test_release_wipes_and_frees(make, name):
    r = make()
    r.append(0, key(200))
    r.release(120)
    assert r.release_pos == 120
    assert raw(name, 0, 120) == bytes(120)
    assert raw(name, 120, 80) == key(200)[120:]
    with pytest.raises(RingError, match="not available"):
        r.read(100, 10)
    with pytest.raises(RingError, match="not available"):
        r.read(119, 2)
    assert bytes(r.read(120, 80)) == key(200)[120:]
    assert r.cursors().free == CAP - 80


def test_release_wipes_across_the_wrap(make, name):
    r = make()
    r.append(0, key(200))
    r.release(200)
    r.append(200, key(150, 5))
    r.release(300)  # offsets 200..255 and 0..43
    assert raw(name, 200, 56) == bytes(56)
    assert raw(name, 0, 44) == bytes(44)
    assert raw(name, 44, 50) == key(150, 5)[100:]


def test_release_backwards_is_a_noop_and_beyond_write_raises(make, name):
    r = make()
    r.append(0, key(100))
    r.release(60)
    r.release(30)
    assert r.release_pos == 60
    with pytest.raises(RingError, match="beyond write_pos"):
        r.release(101)
    assert r.release_pos == 60
    assert raw(name, 60, 40) == key(100)[60:]


# ---- claim ----------------------------------------------------------------------------

def test_claim_hands_out_each_position_once(make, cursor):
    r = make()
    assert r.claim(10) == (0, 0)  # nothing written yet
    r.append(0, key(100))
    assert r.claim(30) == (0, 30)
    assert cursor.load() >= 30
    assert r.claim(50) == (30, 50)
    assert cursor.load() >= 80
    assert r.claim(50) == (80, 20)  # only up to write_pos
    assert cursor.load() >= 100
    assert r.claim(50) == (100, 0)
    assert cursors(r) == (100, 100, 0)
    r.append(100, key(40))
    assert r.claim(1000) == (100, 40)
    assert cursor.load() >= 140


def test_claims_from_two_handles_never_overlap(make, name, cursor, opened):
    r = make()
    other = KeyRing.attach(name, cursor)
    opened.append(other)
    r.append(0, key(CAP))
    seen: set[int] = set()
    handles = [r, other]
    for i in range(20):
        pos, n = handles[i % 2].claim(13)
        assert not seen & set(range(pos, pos + n))
        seen |= set(range(pos, pos + n))
    assert seen == set(range(CAP))


class FailingCursorFile(CursorFile):
    def store(self, high_water: int) -> None:
        raise OSError("disk full")


def test_claim_stores_the_high_water_mark_before_handing_out(make, tmp_path):
    r = make(cf=FailingCursorFile(tmp_path / "c"))
    r.append(0, key(100))
    with pytest.raises(OSError, match="disk full"):
        r.claim(40)
    assert r.claim_pos == 0  # nothing handed out that is not durable


def test_cursor_file_roundtrip(tmp_path):
    cf = CursorFile(tmp_path / "x.cursor")
    assert cf.load() == 0
    cf.store(12345)
    assert cf.load() == 12345
    assert CursorFile(tmp_path / "x.cursor").load() == 12345
    assert not (tmp_path / "x.tmp").exists()


# ---- attaching (workers) --------------------------------------------------------------

def test_attach_sees_the_writer(make, name, opened):
    w = make()
    w.append(0, key(100))
    a = KeyRing.attach(name)
    opened.append(a)
    assert a.capacity == CAP and a.epoch == w.epoch
    assert cursors(a) == (100, 0, 0)
    assert bytes(a.read(0, 100)) == key(100)
    w.append(100, key(20, 4))
    assert a.write_pos == 120  # live view of the writer's cursor
    assert bytes(a.read(100, 20)) == key(20, 4)
    a.release(50)
    assert w.release_pos == 50
    a.close()
    assert (SHM_DIR / name).exists()
    assert bytes(w.read(50, 70)) == key(100)[50:] + key(20, 4)


def test_attach_to_missing_ring_raises(name):
    with pytest.raises(RingError, match="does not exist"):
        KeyRing.attach(name)


def test_attach_to_uninitialised_ring_raises(name):
    (SHM_DIR / name).write_bytes(b"")
    os.chmod(SHM_DIR / name, 0o600)  # the node's own, only not initialised
    with pytest.raises(RingError, match="not initialised"):
        KeyRing.attach(name)
    (SHM_DIR / name).write_bytes(bytes(RING_HEADER_SIZE + CAP))
    with pytest.raises(RingError, match="not initialised"):
        KeyRing.attach(name)


def _child(name: str, expect: bytes, close: bool) -> None:
    """Leaves by ``os._exit`` (see ``tests.nsutil._child``: no exit path of a fork)."""
    try:
        r = KeyRing.attach(name)
        if bytes(r.read(0, len(expect))) != expect:
            os._exit(3)
        pos, n = r.claim(10)
        if (pos, n) != (0, 10):
            os._exit(4)
        if close:
            r.close()
    except BaseException:
        os._exit(5)
    os._exit(0)


@pytest.mark.parametrize("close", [True, False], ids=["close", "no-close"])
def test_child_process_attach_leaves_ring_in_place(make, name, close):
    w = make()
    w.append(0, key(64))
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_child, args=(name, key(64), close))
    p.start()
    p.join(60)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0, f"the child's exit code: {p.exitcode} (None: still running)"
    assert (SHM_DIR / name).exists()
    assert w.claim_pos == 10  # the child's claim is visible here
    assert bytes(w.read(0, 64)) == key(64)
    again = KeyRing.attach(name)
    assert again.epoch == w.epoch
    again.close()


# ---- survival: process crash and reboot -----------------------------------------------

def test_reopen_after_process_crash_keeps_cursors_and_bytes(make, name):
    r = make()
    r.append(0, key(200))
    r.claim(80)
    r.release(30)
    epoch = r.epoch
    r.close()
    r2 = make()
    assert cursors(r2) == (200, 80, 30)
    assert r2.epoch == epoch
    assert bytes(r2.read(30, 170)) == key(200)[30:]
    assert r2.claim(1000) == (80, 120)


def test_restart_after_reboot_starts_at_the_high_water_mark(make, name, cursor):
    r = make()
    r.append(0, key(200))
    r.claim(120)
    epoch = r.epoch
    r.close()
    KeyRing.unlink(name)  # /dev/shm is gone after a reboot; the cursor file is not
    assert not (SHM_DIR / name).exists()
    assert cursor.load() == 120
    r2 = make()
    assert cursors(r2) == (120, 120, 120)
    assert r2.epoch != epoch
    assert r2.cursors().free == CAP
    assert raw(name, 0, CAP) == bytes(CAP)
    with pytest.raises(RingError):
        r2.append(0, key(10))
    with pytest.raises(RingError):
        r2.read(100, 10)
    assert r2.claim(10) == (120, 0)
    r2.append(120, key(50, 9))
    assert r2.claim(100) == (120, 50)  # never a position below the mark


def test_restart_after_reboot_respects_skip_high_water(make, name, cursor):
    r = make(role=ROLE_DEC)
    r.append(0, key(10))
    r.skip_to(500)
    assert cursor.load() == 500
    r.close()
    KeyRing.unlink(name)
    assert cursors(make(role=ROLE_DEC)) == (500, 500, 500)


def test_other_capacity_on_existing_ring_raises(make, name):
    r = make()
    r.append(0, key(100))
    with pytest.raises(RingError, match="exists with another layout") as ei:
        make(capacity=CAP * 2)
    assert name in str(ei.value)
    assert "capacity" in str(ei.value)
    # the existing ring is untouched
    assert (SHM_DIR / name).stat().st_size == RING_HEADER_SIZE + CAP
    assert cursors(r) == (100, 0, 0)
    assert bytes(make().read(0, 100)) == key(100)


def test_other_role_on_existing_ring_raises(make):
    make(role=ROLE_ENC)
    with pytest.raises(RingError, match="another layout"):
        make(role=ROLE_DEC)


# ---- skip_to --------------------------------------------------------------------------

def test_skip_to_enc_keeps_claimed_bytes(make, name, cursor):
    r = make(role=ROLE_ENC)
    r.append(0, key(200))
    assert r.claim(20) == (0, 20)
    r.release(20)
    assert r.claim(60) == (20, 60)  # an encryptor is using [20, 80)
    r.skip_to(300)
    assert raw(name, 20, 60) == key(200)[20:80]  # not wiped under the encryptor
    assert raw(name, 80, 120) == bytes(120)  # unclaimed bytes are wiped
    assert (r.write_pos, r.claim_pos) == (300, 300)
    assert r.release_pos == 20  # the encryptor still holds [20, 80)
    assert cursor.load() >= 300
    assert r.claim(10) == (300, 0)
    # the encryptor finishes and releases its claim: wiped then
    r.release(80)
    assert raw(name, 20, 60) == bytes(60)
    assert r.release_pos == 80


def test_a_chunk_claimed_before_a_resync_gives_no_rest_back_below_its_start(make, name):
    r = make(role=ROLE_ENC)
    r.append(0, key(200))
    assert r.claim_chunk(0, 200) == (0, 200)  # all key claimed: write = claim = 200
    r.set_used(0, 20)
    r.skip_to(200)  # a resync whose start is this end's write_pos: no cursor moves
    r.give_back_idle(0, 1 << 20)
    # The rest [20, 200) is not handed out again: the peer wiped it at its own skip, so
    # every datagram using it would be dropped there. It is wiped and counted wasted.
    assert r.claim_pos == 200 and raw(name, 20, 180) == bytes(180)
    r.append(200, key(100, 2))
    assert r.claim_chunk(1, 100)[0] == 200
    acc = r.accounting()
    assert acc.balance == 0 and acc.wasted == 180
    # A chunk claimed after the resync gives its rest back as before.
    r.set_used(1, 250)
    r.give_back_idle(1, 1 << 20)
    assert r.claim_pos == 250


def test_skip_to_enc_without_claims_moves_release(make, name):
    r = make(role=ROLE_ENC)
    r.append(0, key(100))
    r.claim(40)
    r.release(40)
    r.skip_to(150)
    assert cursors(r) == (150, 150, 150)
    assert raw(name, 0, CAP) == bytes(CAP)
    r.append(150, key(CAP, 2))  # the whole capacity is free again
    assert bytes(r.read(150, CAP)) == key(CAP, 2)


def test_skip_to_dec_wipes_everything_below(make, name, cursor):
    r = make(role=ROLE_DEC)
    r.append(0, key(200))
    r.release(50)
    r.skip_to(230)
    assert cursors(r) == (230, 230, 230)
    assert raw(name, 0, CAP) == bytes(CAP)
    assert cursor.load() >= 230
    with pytest.raises(RingError):
        r.read(100, 10)
    r.append(230, key(CAP, 1))
    assert bytes(r.read(230, CAP)) == key(CAP, 1)


def test_skip_to_far_ahead_wipes_everything(make, name):
    r = make(role=ROLE_DEC)
    r.append(0, key(CAP))
    r.skip_to(10 * CAP + 7)
    assert raw(name, 0, CAP) == bytes(CAP)
    assert cursors(r) == (10 * CAP + 7,) * 3


@pytest.mark.parametrize("role", [ROLE_ENC, ROLE_DEC])
def test_skip_to_backwards_raises_and_changes_nothing(make, name, cursor, role):
    r = make(role=role)
    r.append(0, key(100))
    with pytest.raises(RingError, match="cannot skip back"):
        r.skip_to(99)
    assert cursors(r) == (100, 0, 0)
    assert raw(name, 0, 100) == key(100)
    assert cursor.load() == 0
    r.skip_to(100)  # to write_pos itself: allowed
    assert r.write_pos == 100


# ---- real bugs, kept as expected failures ----------------------------------------------

def test_enc_release_cannot_overtake_claim(make):
    r = make(role=ROLE_ENC)
    r.append(0, key(100))
    try:
        r.release(60)  # nothing was claimed
    except RingError:
        return  # refusing is a fix
    pos, n = r.claim(100)
    assert n > 0
    assert bytes(r.read(pos, n)) == key(100)[pos:pos + n]

