"""Shared-memory key rings: one per link and direction, written by the local key manager,
read by the OTP workers.

Layout of a ring file (``/dev/shm/<name>``, mapped with mmap, so no resource tracker can
unlink it when a reader exits):

    offset  size  field
    0       8     magic  b"QKDRING1"
    8       8     version (2)
    16      8     capacity      key bytes the data area holds
    24      8     block_size    the link's key block size (informational)
    32      8     write_pos     stream position after the last byte written
    40      8     claim_pos     ENC: stream position before which bytes were handed out
    48      8     release_pos   stream position below which no reader may use bytes
    56      8     epoch         random identity of this ring's incarnation
    64      8     role          0 = ENC (this node encrypts), 1 = DEC
    72      8     free_pos      stream position before which bytes are wiped (writer's bound)
    80      8     durable_pos   ENC: claims below it are covered by the cursor file already
    88      8     key_in        bytes the writer appended (accounting, below)
    96      8     wasted        ENC: bytes wiped unused; DEC: bytes wiped at a resync
    104     8     used_done     ENC: bytes data lanes used, of chunks they no longer hold
    112     8     used_control  ENC: the same for the control lane (keepalives)
    120     8     skipped       positions skipped at resyncs (no bytes behind them)
    128     8     released      DEC: bytes freed by release_dec
    136     8     claim_floor   ENC: the last resync's start: claim_pos never goes below it
    144..511      reserved (zero)
    512     1536  lane words, 64 lanes x 3 u64 (see below)
    2048    512   per-lane datagram counts (ENC: sent, DEC: accepted), 64 u64
    2560    512   DEC: per-lane bytes accepted, 64 u64
    3072..4095    reserved (zero)
    4096    capacity  key bytes; stream position p lives at 4096 + p % capacity

Positions are 64-bit byte offsets into the link direction's key stream; both link ends
use the same positions for the same bytes (the agreement decides them), so a datagram can
name its key by position. Invariants: free_pos <= release_pos <= claim_pos <= write_pos
for ENC, free_pos <= release_pos <= write_pos for DEC, write_pos - free_pos <= capacity.

Who writes what: the local key manager alone advances write_pos (after the bytes are in
place). Encryptors advance claim_pos under an exclusive fcntl lock on the ring file, and
persist the new claim high-water mark durably *before* using the bytes (invariant 1);
claims are large (about 1 MiB), so the lock is taken rarely. Whoever has finished with
bytes advances release_pos, wiping them first (invariant 6). Aligned 8-byte cursor stores
are single instructions on x86-64, so readers never see a torn cursor.

Lanes (one per OTP worker, plus a control lane for the tunnel manager). In an ENC ring,
lane i holds (start, used, end) of the chunk worker i holds: bytes [used, end) are still
its own, end = 0 when it holds none; the holder wipes bytes as it uses them (in cache),
and the rest is wiped when the chunk is given up (all of it if the holder died). The
release point is the lowest ``used`` of all held chunks (or claim_pos), so chunks
finishing out of order never free bytes someone still reads. In a
DEC ring, lane i's first word is the next position lane i may accept: positions below it
were accepted once and are refused from then on (no replay), also across a worker restart.

Giving a chunk up (idle, exiting, or to claim another) never wipes what can still be used:
a chunk that is the last one claimed (end == claim_pos) hands its unused rest back by
moving claim_pos down to its ``used`` mark, so the next claim takes those bytes. That is
safe for replay: every position any lane has sent is below that mark (all other chunks
were claimed before this one). Only the rest of a chunk that others have claimed past is
wiped, and counted as wasted (the worker keeps such a rest on a lane of its own instead
while it can still use it; see dataplane.worker).

Accounting (invariant 8): every byte appended is, at any moment, exactly one of unclaimed
(write_pos - claim_pos), held and unused (end - used of held chunks), used (used_done,
used_control, and used - start of held chunks) or wasted. :meth:`KeyRing.accounting`
reads the words; they live in the ring, not in a process, so they survive restarts of
every process but the writer's ring (a reboot starts a new ring and new counts).

Freeing bytes is three ordered stores: release_pos first, then the wipe, then free_pos. A
reader that finds release_pos still <= its position after using the bytes knows they were
not wiped under it (x86-64 keeps stores in order); the writer only reuses bytes below
free_pos, so it never writes where a wipe is still running. Readers never trust key that
starts or ends with 32 zero bytes (``wire.wiped``). A holder that meets such key above the
claims (a bug's trace) gives its chunk up as dead and moves claim_pos past the run of
zeros, counted as wasted (:meth:`KeyRing.retire_wiped`): the one move of claim_pos that
hands nothing out, so it needs no durable mark.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataplane.limits import RING_HEADER_SIZE
from dataplane.private import NotPrivateError, open_private

MAGIC = int.from_bytes(b"QKDRING1", "little")
VERSION = 3
SHM_DIR = Path("/dev/shm")

(F_MAGIC, F_VERSION, F_CAPACITY, F_BLOCK, F_WRITE, F_CLAIM, F_RELEASE, F_EPOCH, F_ROLE,
 F_FREE, F_DURABLE, F_IN, F_WASTED, F_USED_DONE, F_USED_CONTROL, F_SKIPPED,
 F_RELEASED, F_CLAIM_FLOOR) = range(18)
DURABLE_AHEAD = 64 << 20  # claims are made durable this far ahead: one fsync per 64 MiB
ZERO_SCAN = 1 << 20  # bytes looked at per step for a run of wiped key
ROLE_ENC, ROLE_DEC = 0, 1
LANE_BASE = 64  # header word index of lane 0
LANE_WORDS = 3  # ENC: start, used, end of the chunk held; DEC: next, announced release, -
MAX_LANES = 64
CONTROL_LANE = MAX_LANES - 1  # the tunnel manager's own lane (keepalives)
LANE_COUNT_BASE = 256  # header word of lane 0's datagram count
LANE_BYTES_BASE = 320  # header word of lane 0's accepted bytes (DEC)


def _map(fd: int, size: int) -> mmap.mmap:
    """Map a ring with its page tables filled up front (MAP_POPULATE): otherwise every
    process pays a page fault per 4 KiB of key on the ring's first lap."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags)


class RingError(Exception):
    """A ring operation that would break an invariant; nothing was changed."""


@dataclass(frozen=True)
class RingCursors:
    write_pos: int
    claim_pos: int
    release_pos: int
    capacity: int

    @property
    def fill(self) -> int:
        return self.write_pos - self.release_pos

    @property
    def free(self) -> int:
        return self.capacity - self.fill


@dataclass(frozen=True)
class KeyAccount:
    """Where a ring's key went, in bytes since the ring was made (invariant 8).

    ENC: ``key_in == stored + used_data + used_control + wasted`` at every quiet moment
    (a moment when no worker is between using bytes and publishing that it did).
    DEC: ``key_in == stored + released + wasted``; ``used_data`` is what datagrams were
    accepted with (held or already released).
    """

    role: str
    key_in: int
    stored: int  # ENC: unclaimed plus held and unused; DEC: not released yet
    used_data: int  # pads and one-time MAC keys of data datagrams
    used_control: int  # the keepalives' pads and MAC keys (ENC)
    datagrams: int  # data datagrams sent (ENC) or accepted (DEC)
    control_datagrams: int
    wasted: int  # ENC: wiped unused; DEC: wiped at a resync
    released: int  # DEC: freed after use (ENC: 0)
    skipped: int  # positions skipped at resyncs, with no bytes behind them

    @property
    def used_mac(self) -> int:
        """The one-time MAC keys among the data pads (32 bytes a datagram)."""
        return 32 * self.datagrams

    @property
    def used_pad(self) -> int:
        return self.used_data - self.used_mac

    @property
    def balance(self) -> int:
        """key_in minus where it went: 0 when every byte is accounted for."""
        if self.role == "enc":
            return self.key_in - self.stored - self.used_data - self.used_control - self.wasted
        return self.key_in - self.stored - self.released - self.wasted


class CursorFile:
    """Durable high-water mark of a ring's positions (survives reboots, unlike /dev/shm).

    Written with fsync before the bytes it covers are used, so a restarted node never
    hands out key below it again.
    """

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["high_water"])
        except FileNotFoundError:
            return 0

    def store(self, high_water: int) -> None:
        """Record ``high_water`` durably; never lowers the recorded mark."""
        high_water = max(high_water, self.load())
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"high_water": high_water}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class KeyRing:
    """A mapped ring. Open with :meth:`create_or_attach` (the key manager) or
    :meth:`attach` (workers, status readers)."""

    def __init__(self, name: str, fd: int, mm: mmap.mmap, cursor_file: CursorFile | None):
        self.name = name
        self._fd = fd
        self._mm = mm
        self._hdr = np.ndarray((RING_HEADER_SIZE // 8,), dtype=np.uint64, buffer=mm)
        self.capacity = int(self._hdr[F_CAPACITY])
        self._data = np.ndarray((self.capacity,), dtype=np.uint8, buffer=mm,
                                offset=RING_HEADER_SIZE)
        self._cursor_file = cursor_file
        self.data_addr = self._data.ctypes.data  # for address-level MAC calls

    # ---- opening ----------------------------------------------------------------------

    @classmethod
    def create_or_attach(cls, name: str, capacity: int, block_size: int, role: int,
                         cursor_file: CursorFile) -> KeyRing:
        """Attach to the ring if it survived (a process crash), else create it.

        A new ring starts at the durable high-water mark, so that after a reboot no
        position below it is ever written, and so never handed out, again.
        """
        path = SHM_DIR / name
        size = RING_HEADER_SIZE + capacity
        try:  # never a file or link another user planted under our name
            fd = open_private(path, create=True)
        except NotPrivateError as e:
            raise RingError(str(e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            fresh = st.st_size == 0
            if not fresh:
                mm = _map(fd, st.st_size)
                hdr = np.ndarray((9,), dtype=np.uint64, buffer=mm)
                valid = (int(hdr[F_MAGIC]) == MAGIC and int(hdr[F_VERSION]) == VERSION
                         and int(hdr[F_CAPACITY]) == capacity and int(hdr[F_ROLE]) == role
                         and st.st_size == size)
                del hdr
                if not valid:
                    mm.close()
                    raise RingError(f"ring {name} exists with another layout; remove it "
                                    f"(qkdctl net down) or keep the old capacity")
            else:
                os.ftruncate(fd, size)
                mm = _map(fd, size)
                hdr = np.ndarray((10,), dtype=np.uint64, buffer=mm)
                start = cursor_file.load()
                hdr[F_CAPACITY] = capacity
                hdr[F_BLOCK] = block_size
                hdr[F_WRITE] = start
                hdr[F_CLAIM] = start
                hdr[F_RELEASE] = start
                hdr[F_FREE] = start
                hdr[F_EPOCH] = secrets.randbits(63)
                hdr[F_ROLE] = role
                hdr[F_VERSION] = VERSION
                hdr[F_MAGIC] = MAGIC  # last: a half-made ring is never valid
                del hdr
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, fd, mm, cursor_file)

    @classmethod
    def attach(cls, name: str, cursor_file: CursorFile | None = None) -> KeyRing:
        path = SHM_DIR / name
        try:
            fd = open_private(path)
        except FileNotFoundError:
            raise RingError(f"ring {name} does not exist (is the node running?)") from None
        except NotPrivateError as e:
            raise RingError(str(e)) from None
        size = os.fstat(fd).st_size
        if size <= RING_HEADER_SIZE:
            os.close(fd)
            raise RingError(f"ring {name} is not initialised yet")
        mm = _map(fd, size)
        if int.from_bytes(mm[:8], "little") != MAGIC:
            mm.close()
            os.close(fd)
            raise RingError(f"ring {name} is not initialised yet")
        return cls(name, fd, mm, cursor_file)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            del self._data, self._hdr
            self._mm.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    @staticmethod
    def unlink(name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / name).unlink()

    # ---- cursors ----------------------------------------------------------------------

    @property
    def write_pos(self) -> int:
        return int(self._hdr[F_WRITE])

    @property
    def claim_pos(self) -> int:
        return int(self._hdr[F_CLAIM])

    @property
    def release_pos(self) -> int:
        return int(self._hdr[F_RELEASE])

    @property
    def free_pos(self) -> int:
        return int(self._hdr[F_FREE])

    @property
    def epoch(self) -> int:
        return int(self._hdr[F_EPOCH])

    @property
    def block_size(self) -> int:
        return int(self._hdr[F_BLOCK])

    def cursors(self) -> RingCursors:
        return RingCursors(self.write_pos, self.claim_pos, self.release_pos, self.capacity)

    # ---- writer (the local key manager) ------------------------------------------------

    def append(self, pos: int, data: bytes | memoryview | np.ndarray) -> None:
        """Write key bytes at stream position ``pos`` (must equal write_pos) and publish."""
        n = len(data)
        w = self.write_pos
        if pos != w:
            raise RingError(f"{self.name}: write at {pos} but write_pos is {w}")
        free = self.capacity - (w - self.free_pos)
        if n > free:
            raise RingError(f"{self.name}: {n} B do not fit ({free} B free)")
        src = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        off = w % self.capacity
        first = min(n, self.capacity - off)
        self._data[off:off + first] = src[:first]
        if first < n:
            self._data[:n - first] = src[first:]
        self._hdr[F_IN] += n
        self._hdr[F_WRITE] = w + n  # publish after the bytes are in place

    def skip_to(self, pos: int) -> None:
        """Resynchronise: nothing below ``pos`` may be used at this end any more.

        Moves every cursor up to ``pos`` (never down), wiping what is skipped, and
        records the high-water mark durably first.
        """
        if pos < self.write_pos:
            raise RingError(f"{self.name}: cannot skip back from {self.write_pos} to {pos}")
        self._lock()
        try:
            if self._cursor_file is not None:
                self._cursor_file.store(pos)
            w, c, r = self.write_pos, self.claim_pos, self.release_pos
            self._hdr[F_SKIPPED] += pos - w
            if int(self._hdr[F_ROLE]) == ROLE_ENC:
                self._hdr[F_WASTED] += w - c
                # Claimed bytes belong to the encryptor using them: wiping them under it
                # could turn its XOR into a no-op. Only the unclaimed tail is wiped, and
                # only after the cursors moved past it: a crash mid-wipe must leave
                # zeroed bytes unclaimable (else a worker would send them as its pad).
                self._hdr[F_WRITE] = pos
                self._hdr[F_CLAIM] = pos
                self._hdr[F_CLAIM_FLOOR] = pos  # a chunk claimed before it gives no
                self._wipe(c, w)                # rest back below it (the peer skipped it)
                if r == c:
                    self._hdr[F_RELEASE] = pos
                    self._hdr[F_FREE] = pos
            else:
                self._hdr[F_WASTED] += w - r
                self._hdr[F_RELEASE] = pos  # first: readers re-check it after use
                self._wipe(r, w)
                self._hdr[F_WRITE] = pos
                self._hdr[F_CLAIM] = pos
                self._hdr[F_FREE] = pos
        finally:
            self._unlock()

    # ---- readers (OTP workers) ---------------------------------------------------------

    def claim(self, n: int) -> tuple[int, int]:
        """Hand out up to ``n`` unused ENC bytes: returns (pos, length), length may be 0.

        No lane holds them: they count as used at once. The new claim high-water mark is
        made durable before returning, so no crash or restart can hand out the same bytes
        again (invariant 1).
        """
        self._lock()
        try:
            c = self.claim_pos
            take = min(n, self.write_pos - c)
            if take <= 0:
                return c, 0
            if self._cursor_file is not None:
                self._cursor_file.store(c + take)
            self._hdr[F_CLAIM] = c + take
            self._hdr[F_USED_DONE] += take
            return c, take
        finally:
            self._unlock()

    def read(self, pos: int, n: int) -> np.ndarray:
        """Key bytes [pos, pos+n); a copy only when the range wraps around the end."""
        if pos < self.release_pos or pos + n > self.write_pos:
            raise RingError(f"{self.name}: bytes [{pos}, {pos + n}) are not available "
                            f"(have [{self.release_pos}, {self.write_pos}))")
        off = pos % self.capacity
        if off + n <= self.capacity:
            return self._data[off:off + n]
        first = self.capacity - off
        return np.concatenate((self._data[off:], self._data[:n - first]))

    def locate(self, pos: int, n: int) -> tuple[np.ndarray, int]:
        """:meth:`read` plus the bytes' address (of the copy, when they wrap)."""
        pad = self.read(pos, n)
        off = pos % self.capacity
        if off + n <= self.capacity:
            return pad, self.data_addr + off
        return pad, pad.ctypes.data

    def wipe_used(self, pos: int, n: int) -> None:
        """Wipe key just used, while it is still in cache (cheaper than at release)."""
        self._wipe(pos, pos + n)

    def release(self, upto: int) -> None:
        """Wipe and free everything below ``upto`` (used in large blocks, Fig. 4(b))."""
        r = self.release_pos
        if upto <= r:
            return
        limit = self.claim_pos if int(self._hdr[F_ROLE]) == ROLE_ENC else self.write_pos
        if upto > limit:
            raise RingError(f"{self.name}: release to {upto} beyond "
                            f"{'claim_pos' if limit == self.claim_pos else 'write_pos'} {limit}"
                            " (ENC key must be claimed before it is released)")
        if int(self._hdr[F_ROLE]) == ROLE_DEC:
            self._hdr[F_RELEASED] += upto - r
        self._free_upto(upto)

    # ---- lanes (OTP workers) -----------------------------------------------------------

    def claim_chunk(self, lane: int, n: int, reserve: int = 0, min_take: int = 1,
                    if_top: bool = False) -> tuple[int, int]:
        """ENC: give up ``lane``'s current chunk, free what nobody holds, claim a new one.

        Returns (pos, length); length 0 when fewer than ``min_take`` bytes are there (then
        nothing is claimed, so nothing claimed is ever wiped for want of more). Durable
        before returning, like :meth:`claim`. The chunk given up hands its unused rest
        back when it is the last one claimed, so the new chunk continues it; otherwise the
        rest is wiped (wasted). With ``if_top``, a lane whose chunk is not the last one
        claimed keeps it and nothing is claimed: returns (-1, 0). The last ``reserve``
        bytes are left for others (keepalives, control traffic), decided under the lock.
        """
        base = LANE_BASE + LANE_WORDS * lane
        self._lock()
        try:
            end = int(self._hdr[base + 2])
            if if_top and end and end != self.claim_pos:
                return -1, 0
            self._give_up_locked(lane, dead=False)
            c = self.claim_pos
            take = min(n, self.write_pos - c - reserve)
            if take < max(1, min_take):
                return c, 0
            self._make_durable(c + take)
            # claim_pos first: a holder killed between these stores leaves bytes that are
            # claimed and unused (lost), never a lane whose give-up wipes unclaimed bytes.
            self._hdr[F_CLAIM] = c + take
            self._hdr[base] = c
            self._hdr[base + 1] = c
            self._hdr[base + 2] = c + take
            return c, take
        finally:
            self._unlock()

    def _make_durable(self, upto: int) -> None:
        """Persist a high-water mark covering ``upto`` before anything below it is used.

        Marks are stored DURABLE_AHEAD beyond the need, so the fsync is paid once per
        64 MiB of key, not per chunk: after a crash or reboot the ring restarts at the
        stored mark and skips the unused rest (key is lost, never reused).
        """
        if self._cursor_file is None or upto <= int(self._hdr[F_DURABLE]):
            return
        mark = upto + min(DURABLE_AHEAD, self.capacity)
        self._cursor_file.store(mark)
        self._hdr[F_DURABLE] = mark

    def set_used(self, lane: int, used: int) -> None:
        """ENC hot path: bytes of ``lane``'s chunk below ``used`` are spent (and wiped)."""
        self._hdr[LANE_BASE + LANE_WORDS * lane + 1] = used

    def count_datagram(self, lane: int) -> None:
        """One datagram sent (ENC) or accepted (DEC) on ``lane``; one writer per lane."""
        self._hdr[LANE_COUNT_BASE + lane] += 1

    def count_accepted(self, lane: int, nbytes: int) -> None:
        """DEC: a datagram of ``lane`` was accepted with ``nbytes`` of key."""
        self._hdr[LANE_COUNT_BASE + lane] += 1
        self._hdr[LANE_BYTES_BASE + lane] += nbytes

    def data_accepted(self) -> int:
        """DEC: datagrams the data lanes accepted so far (each one's MAC checked): what
        the tunnel manager takes for a sign of the peer's life when keepalives are late."""
        return int(self._hdr[LANE_COUNT_BASE:LANE_COUNT_BASE + CONTROL_LANE].sum())

    def retire(self, lane: int, dead: bool = False) -> None:
        """ENC: ``lane`` gives up its chunk (exiting, or ``dead``: its holder was killed,
        so even what it used may not be wiped, and nothing of it is handed out again)."""
        self._lock()
        try:
            self._give_up_locked(lane, dead)
        finally:
            self._unlock()

    def retire_wiped(self, lane: int) -> int:
        """ENC: ``lane``'s holder met wiped key (zeros) where its pad should be.

        Wiped key never lies at or above the claims unless something went wrong (it did
        once: a give-up that wiped refilled slots). Its chunk is given up as dead, so
        nothing of it is handed out again, and the run of zeros from the claim point on
        is skipped as wasted, so the next claims start on key instead of meeting the same
        run a packet or a keepalive at a time (one keepalive a claim: a link of 100 B
        steps through megabytes of zeros for hours, down all along). Returns the bytes
        skipped."""
        self._lock()
        try:
            self._give_up_locked(lane, dead=True)
            c = self.claim_pos
            n = self._zero_run(c, self.write_pos)
            if n:
                self._hdr[F_CLAIM] = c + n
                self._hdr[F_WASTED] += n
                self._release_enc_locked()
            return n
        finally:
            self._unlock()

    def _zero_run(self, start: int, end: int) -> int:
        """How many bytes from ``start`` on (before ``end``) are zero."""
        pos = start
        while pos < end:
            off = pos % self.capacity
            piece = self._data[off:off + min(end - pos, self.capacity - off, ZERO_SCAN)]
            if piece.any():
                return pos - start + int(np.argmax(piece != 0))
            pos += len(piece)
        return end - start

    def give_back_idle(self, lane: int, pin_limit: int) -> bool:
        """ENC: an idle ``lane`` offers its chunk back; True if it holds none afterwards.

        The last chunk claimed hands its rest back (nothing wasted). Any other chunk is
        kept for the holder's next packets, unless it holds the release point back by
        more than ``pin_limit`` bytes of key others used since: then its rest is wiped,
        so one idle worker cannot stop the ring from being refilled.
        """
        self._lock()
        try:
            start, used, end = self.chunk_of(lane)
            if not end:
                return True
            c = self.claim_pos
            if end != c:
                held = self._lanes()
                lowest = int(held[held[:, 2] != 0, 1].min())
                if used > lowest or c - used <= pin_limit:
                    return False
            self._give_up_locked(lane, dead=False)
            return True
        finally:
            self._unlock()

    def chunk_of(self, lane: int) -> tuple[int, int, int]:
        """(start, used, end) of the chunk ``lane`` holds; end = 0 when none."""
        base = LANE_BASE + LANE_WORDS * lane
        return int(self._hdr[base]), int(self._hdr[base + 1]), int(self._hdr[base + 2])

    def _lanes(self) -> np.ndarray:
        return self._hdr[LANE_BASE:LANE_BASE + LANE_WORDS * MAX_LANES].reshape(MAX_LANES,
                                                                              LANE_WORDS)

    def _give_up_locked(self, lane: int, dead: bool) -> None:
        start, used, end = self.chunk_of(lane)
        if end:
            c = self.claim_pos
            used = min(max(used, start), end)
            self._hdr[F_USED_CONTROL if lane == CONTROL_LANE else F_USED_DONE] += used - start
            if not dead and end == c and used >= int(self._hdr[F_CLAIM_FLOOR]):
                # The last chunk claimed: its rest goes back unclaimed. Every position any
                # lane sent is below ``used`` (the others' chunks lie below this one). Not
                # below the last resync's start, though: a chunk claimed before a resync
                # that moved nothing (start = write_pos = claim_pos) is still the last one,
                # but the peer has wiped those positions; its rest is wasted, as below.
                self._hdr[F_CLAIM] = used
            else:
                # A dead holder may not have wiped what it used: from its start, but never
                # below the release point. The release follows a held chunk's used mark,
                # so the writer may already have refilled the slots below it with new key
                # (unclaimed: wiping it would hand zeros to the next claims).
                rest_end = min(end, c)
                self._wipe(max(start if dead else used, self.release_pos), rest_end)
                self._hdr[F_WASTED] += max(0, rest_end - used)
            self._hdr[LANE_BASE + LANE_WORDS * lane + 2] = 0
        self._release_enc_locked()

    def _release_enc_locked(self) -> None:
        """Move the release point up to the lowest byte still held; every byte below it
        was wiped by its holder or when its chunk was given up."""
        words = self._lanes()
        used = words[words[:, 2] != 0, 1]
        target = min(self.claim_pos, int(used.min())) if len(used) else self.claim_pos
        if target > self.release_pos:
            self._free_upto(target, wipe=False)

    def lane_next(self, lane: int) -> int:
        """DEC: the lowest position ``lane`` may still accept."""
        return int(self._hdr[LANE_BASE + LANE_WORDS * lane])

    def set_lane_next(self, lane: int, pos: int) -> None:
        self._hdr[LANE_BASE + LANE_WORDS * lane] = pos

    def announce_release(self, lane: int, pos: int) -> None:
        """DEC: the peer said, on ``lane``, that it sends nothing below ``pos`` any more.
        The tunnel manager frees up to it a little later (see dataplane.tunnel)."""
        self._hdr[LANE_BASE + LANE_WORDS * lane + 1] = pos

    def announced_release(self) -> int:
        """DEC: the highest release point any lane was told."""
        return int(self._lanes()[:, 1].max())

    def release_dec(self, upto: int) -> None:
        """DEC: free everything below ``upto`` (bounded by write_pos), under the lock;
        release_pos moves before the wipe so readers can detect it."""
        self._lock()
        try:
            upto = min(upto, self.write_pos)
            r = self.release_pos
            if upto > r:
                self._hdr[F_RELEASED] += upto - r
                self._free_upto(upto)
        finally:
            self._unlock()

    def reset_lanes(self) -> None:
        """ENC: give up every held chunk (no holder is running any more): wiped whole,
        never used again."""
        self._lock()
        try:
            for lane in range(MAX_LANES):
                self._give_up_locked(lane, dead=True)
        finally:
            self._unlock()

    # ---- accounting (invariant 8) -------------------------------------------------------

    def accounting(self) -> KeyAccount:
        """Where this ring's key went (see :class:`KeyAccount`). Under the ring lock, so
        no claim or give-up is half seen: the ENC balance is exact whenever the writer
        is not mid-append (the key manager, which publishes it, never is)."""
        self._lock()
        try:
            return self._accounting_locked()
        finally:
            self._unlock()

    def _accounting_locked(self) -> KeyAccount:
        h = self._hdr
        counts = h[LANE_COUNT_BASE:LANE_COUNT_BASE + MAX_LANES]
        datagrams = int(counts[:CONTROL_LANE].sum())
        control_datagrams = int(counts[CONTROL_LANE])
        if self.is_enc:
            lanes = self._lanes().astype(np.int64)
            held = lanes[:, 2] != 0
            held_used = np.clip(lanes[:, 1], lanes[:, 0], lanes[:, 2]) - lanes[:, 0]
            rest = lanes[:, 2] - np.clip(lanes[:, 1], lanes[:, 0], lanes[:, 2])
            live_data = int(held_used[:CONTROL_LANE][held[:CONTROL_LANE]].sum())
            live_control = int(held_used[CONTROL_LANE]) if held[CONTROL_LANE] else 0
            stored = self.write_pos - self.claim_pos + int(rest[held].sum())
            return KeyAccount("enc", int(h[F_IN]), stored,
                              int(h[F_USED_DONE]) + live_data,
                              int(h[F_USED_CONTROL]) + live_control, datagrams,
                              control_datagrams, int(h[F_WASTED]), 0, int(h[F_SKIPPED]))
        accepted = h[LANE_BYTES_BASE:LANE_BYTES_BASE + MAX_LANES]
        return KeyAccount("dec", int(h[F_IN]), self.write_pos - self.release_pos,
                          int(accepted[:CONTROL_LANE].sum()), int(accepted[CONTROL_LANE]),
                          datagrams, control_datagrams, int(h[F_WASTED]),
                          int(h[F_RELEASED]), int(h[F_SKIPPED]))

    @property
    def is_enc(self) -> bool:
        return int(self._hdr[F_ROLE]) == ROLE_ENC

    def _free_upto(self, upto: int, wipe: bool = True) -> None:
        """Release, wipe, then free [release_pos, upto), in that order (see module doc)."""
        r = self.release_pos
        self._hdr[F_RELEASE] = upto
        if wipe:
            self._wipe(r, upto)
        self._hdr[F_FREE] = upto

    def _wipe(self, start: int, end: int) -> None:
        n = end - start
        if n <= 0:
            return
        if n >= self.capacity:
            self._data[:] = 0
            return
        off = start % self.capacity
        first = min(n, self.capacity - off)
        self._data[off:off + first] = 0
        if first < n:
            self._data[:n - first] = 0

    def _lock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
