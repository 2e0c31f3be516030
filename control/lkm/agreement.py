"""Key block agreement between the two ends of a QKD link, without I/O (h11 style).

Both ends receive the same numbered key blocks from their key source. One end, the
*leader* (the link's end `a`), decides every block's fate — ENC a->b, ENC b->a, or
discard — and tells the *follower*, which applies exactly that (invariant 2). Neither end
infers a fate from its own state.

Protocol (messages in :mod:`control.lkm.messages`; ``sync`` numbers one session):

1. On connecting, the follower sends ``Hello(sync, write_pos, released)``. Per direction:
   where both ends' write positions are equal, both hold the same bytes below it (each
   end holds bytes only below its own write position, new decisions land at or above
   both, and the follower applies the leader's decisions in order, exactly); a ring lost
   to a reboot restarts empty (a decrypting one at its last skip, an encrypting one at
   its durable claim mark, above everything it ever handed out), so what the other end
   keeps is at worst unused there. The key is kept: ``start`` is that position and
   neither end skips.
   Where the follower is behind, the leader's decisions for the positions between were
   lost in flight (the connection ended under them). The leader keeps its recent
   decisions (``MAX_PENDING_BLOCKS`` of them): if they cover exactly the follower's
   position up to its own, ``start`` is the follower's position (neither end skips) and
   the leader sends those decisions again, in their order, right after ``Sync``; the
   follower still holds their blocks undecided and files them where the leader did. If
   it cannot apply one exactly (a block it no longer holds), it starts a new session on
   the same connection, and that second ``Hello`` from the same positions gets no second
   replay (a new connection does: the last one may have taken the replay with it).
   Otherwise (not covered, the follower ahead, or a replay that failed)
   ``start = max(both) + 1``: both ends skip past it, wiping every byte below, so bytes
   either end might not hold identically are never used. The leader skips, answers
   ``Sync(sync, start)``, and the follower skips up to it too (an end skips only to a
   position above its own write position). Positions only move forward, so no byte is
   reused; and a reconnection, lost decisions or not, costs no key while the follower
   still holds the blocks.
2. The follower reports the blocks it holds, ``Have(sync, ids, released)``. The leader
   decides a block once both ends hold it (`SplitPolicy` picks the direction by the
   configured ratio; a block that does not fit in the chosen direction's ring at *both*
   ends — the upper limit — goes to the other direction if that one has a share and room,
   else it is discarded), writes it to its ring at the direction's next
   position and sends ``Decide(sync, [(id, fate, pos)])``.
3. A block one end lacks is discarded: when the other end has already seen a later block
   of the same source epoch (sources deliver in order), or after a timeout.
4. The follower applies decisions in order; a decision it cannot apply exactly (block
   missing, position differs) starts a new session (step 1) instead of guessing.

Block ids are ``(epoch, seq)``: the source's random epoch and an in-order sequence number.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from control.lkm.messages import AB, BA, Decide, Decision, Fate, Have, Hello, Message, Sync
from dataplane.limits import MAX_PENDING_BLOCKS, MAX_PENDING_BYTES, PENDING_BLOCK_TIMEOUT_S

SWEEP_INTERVAL_S = 0.1
REPLAY_CHUNK = 16_384  # decisions per replayed Decide: 25 B each, well inside one frame

BlockId = tuple[int, int]
Positions = tuple[int, int]  # indexed by direction: (a->b, b->a)


# ---- actions the shell carries out ----------------------------------------------------

@dataclass(frozen=True)
class Send:
    msg: Message


@dataclass(frozen=True)
class Store:
    """Write ``data`` to the ring of ``direction`` at stream position ``pos``."""

    direction: int
    pos: int
    block: BlockId
    data: bytes


@dataclass(frozen=True)
class SkipTo:
    """Nothing below ``pos`` in the ring of ``direction`` may be used at this end."""

    direction: int
    pos: int


@dataclass(frozen=True)
class Dropped:
    """A block left this end without reaching a ring (for counters)."""

    block: BlockId
    size: int
    reason: str


Action = Send | Store | SkipTo | Dropped


@dataclass
class SplitPolicy:
    """Weighted split of key between the two directions by bytes, deterministic."""

    weights: tuple[int, int]
    assigned: list[int] = field(default_factory=lambda: [0, 0])

    def choose(self, size: int) -> int:
        wa, wb = self.weights
        if wb == 0:
            return AB
        if wa == 0:
            return BA
        # Pick the direction whose share would stay lowest relative to its weight.
        return AB if (self.assigned[AB] + size) * wb <= (self.assigned[BA] + size) * wa else BA

    def record(self, direction: int, size: int) -> None:
        self.assigned[direction] += size


@dataclass
class Counters:
    blocks_in: int = 0
    bytes_in: int = 0
    blocks_stored: list[int] = field(default_factory=lambda: [0, 0])
    bytes_stored: list[int] = field(default_factory=lambda: [0, 0])
    blocks_discarded: dict[str, int] = field(default_factory=dict)
    bytes_discarded: int = 0
    resyncs: int = 0
    bytes_skipped: list[int] = field(default_factory=lambda: [0, 0])
    decisions_replayed: int = 0  # lost in flight, sent again at a new session (leader)


class _Pending(OrderedDict):
    """Blocks held while undecided, in arrival order, with their total size."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __setitem__(self, key, value) -> None:
        if key in self:
            self.nbytes -= len(self[key][0])
        super().__setitem__(key, value)
        self.nbytes += len(value[0])

    def __delitem__(self, key) -> None:
        self.nbytes -= len(self[key][0])
        super().__delitem__(key)

    def pop(self, key, *default):
        if key in self:
            self.nbytes -= len(self[key][0])
        return super().pop(key, *default)

    def popitem(self, last: bool = True):
        key, value = super().popitem(last=last)
        self.nbytes -= len(value[0])
        return key, value


class _End:
    def __init__(self, capacity: int, write_pos: Positions, timeout: float,
                 max_pending: int):
        self.capacity = capacity
        self.write_pos = list(write_pos)
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending: _Pending = _Pending()
        self.max_seen: dict[int, int] = {}
        self.sync = 0
        self.synced = False
        self.counters = Counters()

    def _note_seen(self, block: BlockId) -> None:
        epoch, seq = block
        if seq > self.max_seen.get(epoch, -1):
            self.max_seen[epoch] = seq

    def _accept_block(self, block: BlockId, data: bytes, now: float) -> list[Action]:
        out: list[Action] = []
        self.counters.blocks_in += 1
        self.counters.bytes_in += len(data)
        self._note_seen(block)
        if block in self.pending:
            out.append(self._drop(block, len(data), "duplicate"))
            return out
        self.pending[block] = (data, now)
        while len(self.pending) > self.max_pending or self.pending.nbytes > MAX_PENDING_BYTES:
            old, (odata, _) = self.pending.popitem(last=False)
            out.append(self._drop(old, len(odata), "overflow"))
        return out

    def on_block(self, block: BlockId, data: bytes, released: Positions,
                 now: float) -> list[Action]:
        return self.on_blocks([(block, data)], released, now)

    def on_blocks(self, blocks: list[tuple[BlockId, bytes]], released: Positions,
                  now: float) -> list[Action]:
        raise NotImplementedError

    def _accept_blocks(self, blocks: list[tuple[BlockId, bytes]], now: float) -> list[Action]:
        out: list[Action] = []
        for block, data in blocks:
            out += self._accept_block(block, data, now)
        return out

    def _drop(self, block: BlockId, size: int, reason: str) -> Dropped:
        c = self.counters
        c.blocks_discarded[reason] = c.blocks_discarded.get(reason, 0) + 1
        c.bytes_discarded += size
        return Dropped(block, size, reason)

    def _skip(self, direction: int, pos: int) -> list[Action]:
        # Only above write_pos: ``start`` equal to it means both ends keep what they hold
        # (the leader gives a start past both ends' positions when they must not).
        if pos <= self.write_pos[direction]:
            return []
        self.counters.bytes_skipped[direction] += pos - self.write_pos[direction]
        self.write_pos[direction] = pos
        return [SkipTo(direction, pos)]

    def _store(self, direction: int, pos: int, block: BlockId, data: bytes) -> Store:
        self.write_pos[direction] = pos + len(data)
        self.counters.blocks_stored[direction] += 1
        self.counters.bytes_stored[direction] += len(data)
        return Store(direction, pos, block, data)


def keep_or_skip(own: int, peer: int) -> int:
    """The start of a new session in one direction: both ends' position when they are
    equal (what they hold is the same: kept), else past both (everything below wiped)."""
    return own if own == peer else max(own, peer) + 1


class Leader(_End):
    """The deciding end of a link (the link's end `a`)."""

    def __init__(self, ratio: tuple[int, int], capacity: int, write_pos: Positions,
                 timeout: float = PENDING_BLOCK_TIMEOUT_S,
                 max_pending: int = MAX_PENDING_BLOCKS):
        super().__init__(capacity, write_pos, timeout, max_pending)
        self.policy = SplitPolicy(ratio)
        self.peer_has: OrderedDict[BlockId, float] = OrderedDict()
        self.peer_released = [0, 0]
        self.peer_max_seen: dict[int, int] = {}
        self._next_sweep = 0.0
        # The decisions that filed a block, with its size, newest last: what a follower
        # that lost some in flight is sent again.
        self.filed: deque[tuple[Decision, int]] = deque(maxlen=max_pending)
        self._replayed_from: tuple[int, ...] | None = None  # one replay per positions

    def on_disconnect(self) -> list[Action]:
        self.synced = False
        self.peer_has.clear()
        # A replay the connection took with it was never tried: the next session's may
        # replay again. Only a Hello on the session that got the replay (the follower
        # could not apply it) means it failed.
        self._replayed_from = None
        return []

    def heartbeat(self, released: Positions) -> Message | None:
        """A frame that proves this end alive to a quiet session (an empty Decide)."""
        return Decide(self.sync, ()) if self.synced else None

    def _covered(self, d: int, start: int) -> bool:
        """Whether the kept decisions file direction ``d`` exactly from ``start`` up to
        this end's write position, without a gap."""
        at = start
        for dec, size in self.filed:
            if int(dec.fate) == d and dec.pos >= start:
                if dec.pos != at:
                    return False
                at += size
        return at == self.write_pos[d]

    def _start(self, peer_pos: Positions) -> tuple[list[int], list[Decision]]:
        """Each direction's start of a new session, and the decisions to send again."""
        again = tuple(peer_pos) != self._replayed_from
        start, replay = [], set()
        for d in (AB, BA):
            own, peer = self.write_pos[d], peer_pos[d]
            if peer < own and again and self._covered(d, peer):
                start.append(peer)
                replay.add(d)
            else:
                start.append(keep_or_skip(own, peer))
        self._replayed_from = tuple(peer_pos) if replay else None
        decisions = [dec for dec, _ in self.filed
                     if int(dec.fate) in replay and dec.pos >= peer_pos[int(dec.fate)]]
        return start, decisions

    def on_blocks(self, blocks: list[tuple[BlockId, bytes]], released: Positions,
                  now: float) -> list[Action]:
        out = self._accept_blocks(blocks, now)
        return out + self._decide(released, now, [b for b, _ in blocks])

    def on_message(self, msg: Message, released: Positions, now: float) -> list[Action]:
        out: list[Action] = []
        if isinstance(msg, Hello):
            self.sync = msg.sync
            self.synced = True
            self.counters.resyncs += 1
            self.peer_has.clear()
            self.peer_released = list(msg.released)
            self._next_sweep = 0.0
            start, replay = self._start(msg.write_pos)
            for d in (AB, BA):
                out += self._skip(d, start[d])
            out.append(Send(Sync(self.sync, tuple(start))))  # type: ignore[arg-type]
            for i in range(0, len(replay), REPLAY_CHUNK):
                out.append(Send(Decide(self.sync, tuple(replay[i:i + REPLAY_CHUNK]))))
            self.counters.decisions_replayed += len(replay)
        elif isinstance(msg, Have) and self.synced and msg.sync == self.sync:
            self.peer_released = [max(a, b) for a, b in zip(self.peer_released, msg.released,
                                                            strict=True)]
            for block in msg.ids:
                epoch, seq = block
                if seq > self.peer_max_seen.get(epoch, -1):
                    self.peer_max_seen[epoch] = seq
                self.peer_has[block] = now
            out += self._decide(released, now, msg.ids)
            return out
        out += self._decide(released, now)
        return out

    def on_tick(self, released: Positions, now: float) -> list[Action]:
        return self._decide(released, now)

    def _fits(self, direction: int, size: int, released: Positions) -> bool:
        w = self.write_pos[direction]
        own_free = self.capacity - (w - released[direction])
        peer_free = self.capacity - (w - self.peer_released[direction])
        return size <= own_free and size <= peer_free

    def _decide(self, released: Positions, now: float,
                candidates: list[BlockId] | tuple[BlockId, ...] = ()) -> list[Action]:
        """Decide the ``candidates`` both ends now hold; sweep for lost blocks at most
        every SWEEP_INTERVAL_S, so a burst of small blocks costs O(1) each."""
        if not self.synced:
            # Without the follower nothing can be decided; only age out old blocks.
            return self._expire_pending(now)
        out: list[Action] = []
        decisions: list[Decision] = []
        for block in candidates:
            if block not in self.pending or block not in self.peer_has:
                continue
            data, _ = self.pending.pop(block)
            del self.peer_has[block]
            d = self.policy.choose(len(data))
            fits = self._fits(d, len(data), released)
            if fits:
                self.policy.record(d, len(data))
            elif self.policy.weights[1 - d] and self._fits(1 - d, len(data), released):
                # Work-conserving: a full direction (idle traffic) does not waste key the
                # other direction can take. The ratio restarts from here.
                d, fits = 1 - d, True
                self.policy.assigned = [0, 0]
            if fits:
                pos = self.write_pos[d]
                out.append(self._store(d, pos, block, data))
                decisions.append(Decision(block, Fate(d), pos))
                self.filed.append((decisions[-1], len(data)))
            else:
                out.append(self._drop(block, len(data), "ring_full"))
                decisions.append(Decision(block, Fate.DISCARD, 0))
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self._sweep(now, out, decisions)
        if decisions:
            out.append(Send(Decide(self.sync, tuple(decisions))))
        return out

    def _sweep(self, now: float, out: list[Action], decisions: list[Decision]) -> None:
        for block in list(self.pending):
            data, t = self.pending[block]
            epoch, seq = block
            if self.peer_max_seen.get(epoch, -1) > seq:
                del self.pending[block]
                out.append(self._drop(block, len(data), "peer_missing"))
            elif now - t > self.timeout:
                del self.pending[block]
                out.append(self._drop(block, len(data), "timeout"))
                decisions.append(Decision(block, Fate.DISCARD, 0))
        for block in list(self.peer_has):
            epoch, seq = block
            t = self.peer_has[block]
            if self.max_seen.get(epoch, -1) > seq or now - t > self.timeout:
                # We will never hold it: the follower must let it go.
                del self.peer_has[block]
                decisions.append(Decision(block, Fate.DISCARD, 0))

    def _expire_pending(self, now: float) -> list[Action]:
        out: list[Action] = []
        for block in list(self.pending):
            data, t = self.pending[block]
            if now - t <= self.timeout:
                break
            del self.pending[block]
            out.append(self._drop(block, len(data), "timeout"))
        return out


class Follower(_End):
    """The applying end of a link (the link's end `b`)."""

    def __init__(self, capacity: int, write_pos: Positions,
                 timeout: float = PENDING_BLOCK_TIMEOUT_S,
                 max_pending: int = MAX_PENDING_BLOCKS, sync: int = 0):
        super().__init__(capacity, write_pos, timeout, max_pending)
        self.sync = sync
        self.last_released: Positions = (-1, -1)

    def on_connect(self, released: Positions) -> list[Action]:
        self.sync += 1
        self.synced = False
        self.last_released = released
        return [Send(Hello(self.sync, tuple(self.write_pos), released))]  # type: ignore[arg-type]

    def on_disconnect(self) -> list[Action]:
        self.synced = False
        return []

    def on_blocks(self, blocks: list[tuple[BlockId, bytes]], released: Positions,
                  now: float) -> list[Action]:
        """Take a batch from the source and report it in one ``Have``."""
        out = self._accept_blocks(blocks, now)
        held = tuple(b for b, _ in blocks if b in self.pending)
        if self.synced and held:
            out.append(Send(Have(self.sync, held, released)))
            self.last_released = released
        return out

    def on_message(self, msg: Message, released: Positions, now: float) -> list[Action]:
        if isinstance(msg, Sync) and msg.sync == self.sync and not self.synced:
            out: list[Action] = []
            for d in (AB, BA):
                out += self._skip(d, msg.start[d])
            self.synced = True
            self.counters.resyncs += 1
            out.append(Send(Have(self.sync, tuple(self.pending), released)))
            self.last_released = released
            return out
        if isinstance(msg, Decide) and self.synced and msg.sync == self.sync:
            return self._apply(msg.decisions, released)
        return []

    def heartbeat(self, released: Positions) -> Message | None:
        """A frame that proves this end alive to a quiet session (an empty Have)."""
        if not self.synced:
            return None
        self.last_released = released
        return Have(self.sync, (), released)

    def on_tick(self, released: Positions, now: float) -> list[Action]:
        if self.synced and released != self.last_released:
            self.last_released = released
            return [Send(Have(self.sync, (), released))]
        return []

    def _apply(self, decisions: tuple[Decision, ...], released: Positions) -> list[Action]:
        out: list[Action] = []
        for dec in decisions:
            entry = self.pending.pop(dec.block, None)
            if dec.fate == Fate.DISCARD:
                if entry is not None:
                    out.append(self._drop(dec.block, len(entry[0]), "leader_discard"))
                continue
            d = int(dec.fate)
            if entry is None or dec.pos != self.write_pos[d]:
                # Cannot apply exactly: never guess, start a new session instead.
                if entry is not None:
                    out.append(self._drop(dec.block, len(entry[0]), "desync"))
                return out + self.on_connect(released)
            out.append(self._store(d, dec.pos, dec.block, entry[0]))
        return out
