"""Property tests of the key block agreement (pure; no I/O).

A simulated link: a source delivering the same blocks to both ends (each end may miss
some), an in-order channel that can drop the connection, rings with capacity limits and
consumers that claim (ENC) and release (DEC) key, and crashes of either end — of the
process (rings survive in shared memory) or of the machine (rings restart at the durable
high-water mark). Whatever the schedule: no key position is ever handed out twice, and
wherever both ends hold bytes for a position, they are the same bytes.
"""

from __future__ import annotations

import random
from collections import deque

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.lkm.agreement import (
    AB,
    BA,
    Dropped,
    Follower,
    Leader,
    Send,
    SkipTo,
    SplitPolicy,
    Store,
)
from control.lkm.messages import Decide, Decision, Fate, Sync, decode, encode
from dataplane.limits import PENDING_BLOCK_TIMEOUT_S

LEADER, FOLLOWER = 0, 1
ENC_END = {AB: LEADER, BA: FOLLOWER}  # which end encrypts with each direction's key


class SimRing:
    def __init__(self, capacity: int, start: int):
        self.capacity = capacity
        self.write = self.claim = self.release = start
        self.data: dict[int, int] = {}
        self.high_water = start  # the durable cursor file

    def store(self, pos: int, data: bytes) -> None:
        assert pos == self.write, f"store at {pos}, write_pos {self.write}"
        assert len(data) <= self.capacity - (self.write - self.release), "ring overflow"
        for i, b in enumerate(data):
            self.data[pos + i] = b
        self.write += len(data)

    def skip_to(self, pos: int) -> None:
        assert pos >= self.write
        self.high_water = max(self.high_water, pos)
        for p in list(self.data):
            if p < pos:
                del self.data[p]
        self.write = pos
        self.claim = max(self.claim, pos)
        self.release = max(self.release, pos)

    def do_claim(self, n: int) -> tuple[int, bytes]:
        take = min(n, self.write - self.claim)
        pos = self.claim
        self.high_water = max(self.high_water, pos + take)  # persisted before use
        self.claim += take
        return pos, bytes(self.data[p] for p in range(pos, pos + take))

    def do_release(self, upto: int) -> None:
        upto = min(upto, self.write)
        for p in range(self.release, upto):
            self.data.pop(p, None)
        self.release = max(self.release, upto)


class Sim:
    def __init__(self, ratio, capacity, seed):
        self.rng = random.Random(seed)
        self.capacity = capacity
        self.ratio = ratio
        self.now = 0.0
        self.rings = [[SimRing(capacity, 0), SimRing(capacity, 0)] for _ in range(2)]
        self.ends = [Leader(ratio, capacity, (0, 0), timeout=3.0, max_pending=16),
                     Follower(capacity, (0, 0), timeout=3.0, max_pending=16)]
        self.source = [deque(), deque()]  # blocks in flight from the source to each end
        self.chan = [deque(), deque()]    # messages in flight to each end
        self.connected = False
        self.epoch = 7
        self.seq = 0
        self.claimed: dict[tuple[int, int], int] = {}  # (direction, pos) -> byte
        self.stored_bytes = 0
        self.follower_sync = 0

    def released(self, end: int) -> tuple[int, int]:
        return (self.rings[end][AB].release, self.rings[end][BA].release)

    def run(self, end: int, actions) -> None:
        for a in actions:
            if isinstance(a, Send):
                if self.connected:
                    mtype, payload = encode(a.msg)
                    self.chan[1 - end].append(decode(mtype, payload))
            elif isinstance(a, Store):
                self.rings[end][a.direction].store(a.pos, a.data)
                self.stored_bytes += len(a.data)
                self.check_position_agreement(a.direction, a.pos, len(a.data))
            elif isinstance(a, SkipTo):
                self.rings[end][a.direction].skip_to(a.pos)
            else:
                assert isinstance(a, Dropped)

    def check_position_agreement(self, d: int, pos: int, n: int) -> None:
        a, b = self.rings[LEADER][d].data, self.rings[FOLLOWER][d].data
        for p in range(pos, pos + n):
            if p in a and p in b:
                assert a[p] == b[p], f"direction {d} position {p}: ends disagree"

    def connect(self) -> None:
        if self.connected:
            return
        self.connected = True
        self.run(FOLLOWER, self.ends[FOLLOWER].on_connect(self.released(FOLLOWER)))

    def disconnect(self) -> None:
        if not self.connected:
            return
        self.connected = False
        self.chan = [deque(), deque()]
        for e in (LEADER, FOLLOWER):
            self.run(e, self.ends[e].on_disconnect())

    def new_block(self, size: int, miss_a: bool, miss_b: bool) -> None:
        data = bytes(self.rng.randrange(256) for _ in range(size))
        block = (self.epoch, self.seq)
        self.seq += 1
        if not miss_a:
            self.source[LEADER].append((block, data))
        if not miss_b:
            self.source[FOLLOWER].append((block, data))

    def deliver_block(self, end: int) -> None:
        if self.source[end]:
            block, data = self.source[end].popleft()
            self.run(end, self.ends[end].on_block(block, data, self.released(end), self.now))

    def deliver_msg(self, end: int) -> None:
        if self.chan[end]:
            msg = self.chan[end].popleft()
            self.run(end, self.ends[end].on_message(msg, self.released(end), self.now))

    def tick(self, dt: float) -> None:
        self.now += dt
        for e in (LEADER, FOLLOWER):
            self.run(e, self.ends[e].on_tick(self.released(e), self.now))

    def claim(self, d: int, n: int) -> None:
        ring = self.rings[ENC_END[d]][d]
        pos, data = ring.do_claim(n)
        other = self.rings[1 - ENC_END[d]][d].data
        for i, b in enumerate(data):
            key = (d, pos + i)
            assert key not in self.claimed, f"key position {key} handed out twice"
            self.claimed[key] = b
            if pos + i in other:
                assert other[pos + i] == b, f"claimed byte {key} differs at the peer"
        ring.do_release(ring.claim)  # used at once in this model

    def release_dec(self, d: int, frac: float) -> None:
        ring = self.rings[1 - ENC_END[d]][d]
        ring.do_release(ring.release + int((ring.write - ring.release) * frac))

    def crash(self, end: int, reboot: bool) -> None:
        self.disconnect()
        if reboot:
            # Shared memory is gone: rings restart at the durable high-water mark.
            self.rings[end] = [SimRing(self.capacity, r.high_water) for r in self.rings[end]]
            self.epoch += 1  # a restarted source starts a new epoch
            self.seq = 0
        write = (self.rings[end][AB].write, self.rings[end][BA].write)
        if end == LEADER:
            self.ends[end] = Leader(self.ratio, self.capacity, write, timeout=3.0,
                                    max_pending=16)
        else:
            # The session counter need not persist: any new Hello resets the leader.
            self.ends[end] = Follower(self.capacity, write, timeout=3.0, max_pending=16)
        self.source[end].clear()


event = st.one_of(
    st.tuples(st.just("block"), st.integers(1, 48), st.booleans(), st.booleans()),
    st.tuples(st.just("deliver"), st.sampled_from([LEADER, FOLLOWER]), st.integers(1, 4)),
    st.tuples(st.just("net"), st.sampled_from([LEADER, FOLLOWER]), st.integers(1, 4)),
    st.tuples(st.just("tick"), st.floats(0.01, 4.0)),
    st.tuples(st.just("claim"), st.sampled_from([AB, BA]), st.integers(1, 64)),
    st.tuples(st.just("release"), st.sampled_from([AB, BA]), st.floats(0, 1)),
    st.tuples(st.just("connect")),
    st.tuples(st.just("disconnect")),
    st.tuples(st.just("crash"), st.sampled_from([LEADER, FOLLOWER]), st.booleans()),
)


def drive(sim: Sim, events) -> None:
    sim.connect()
    for ev in events:
        # Background progress between disruptions, in a seeded random order.
        for _ in range(sim.rng.randrange(4)):
            sim.deliver_block(sim.rng.choice((LEADER, FOLLOWER)))
        for _ in range(sim.rng.randrange(5)):
            sim.deliver_msg(sim.rng.choice((LEADER, FOLLOWER)))
        kind = ev[0]
        if kind == "block":
            sim.new_block(ev[1], ev[2] and sim.rng.random() < 0.3, ev[3] and sim.rng.random() < 0.3)
        elif kind == "deliver":
            for _ in range(ev[2]):
                sim.deliver_block(ev[1])
        elif kind == "net":
            for _ in range(ev[2]):
                sim.deliver_msg(ev[1])
        elif kind == "tick":
            sim.tick(ev[1])
        elif kind == "claim":
            sim.claim(ev[1], ev[2])
        elif kind == "release":
            sim.release_dec(ev[1], ev[2])
        elif kind == "connect":
            sim.connect()
        elif kind == "disconnect":
            sim.disconnect()
        elif kind == "crash":
            sim.crash(ev[1], ev[2])
            sim.connect()


def quiesce(sim: Sim) -> None:
    sim.connect()
    for _ in range(200):
        busy = any(sim.source) or any(sim.chan)
        for e in (LEADER, FOLLOWER):
            sim.deliver_block(e)
            sim.deliver_msg(e)
        sim.tick(0.01)
        if not busy:
            break


def assert_rings_agree(sim: Sim) -> None:
    for d in (AB, BA):
        a, b = sim.rings[LEADER][d], sim.rings[FOLLOWER][d]
        assert a.write == b.write, f"direction {d}: write positions differ after quiescence"
        for p in set(a.data) & set(b.data):
            assert a.data[p] == b.data[p]


def test_a_replay_the_connection_took_with_it_is_sent_again_on_the_next():
    """A second reset (or flap) right after the first, before the follower read the
    replayed decisions: the next connection's Hello, from the same positions, gets the
    replay again, not the skip past both ends that wipes their rings (a review found it)."""
    sim = Sim((1, 1), capacity=1000, seed=3)
    sim.connect()
    quiesce(sim)
    for _ in range(4):
        both_get_block(sim, 32)
    sim.new_block(32, False, False)
    sim.deliver_block(FOLLOWER)
    sim.deliver_msg(LEADER)  # the follower's Have
    sim.deliver_block(LEADER)  # the leader decides; its Decide is lost ...
    sim.disconnect()
    sim.connect()
    sim.deliver_msg(LEADER)  # ... the Hello: Sync and the replay go out, and are lost
    sim.disconnect()
    sim.connect()
    quiesce(sim)
    assert [sim.rings[LEADER][d].write for d in (AB, BA)] == \
        [sim.rings[FOLLOWER][d].write for d in (AB, BA)]
    for e in (LEADER, FOLLOWER):
        assert sim.ends[e].counters.bytes_skipped == [0, 0]
    assert sim.ends[LEADER].counters.decisions_replayed == 2
    assert_rings_agree(sim)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ratio=st.tuples(st.integers(0, 4), st.integers(0, 4)).filter(lambda r: sum(r) > 0),
    capacity=st.integers(48, 400),
    seed=st.integers(0, 2**32),
    events=st.lists(event, min_size=40, max_size=160),
)
def test_random_schedules_never_reuse_and_always_agree(ratio, capacity, seed, events):
    sim = Sim(ratio, capacity, seed)
    drive(sim, events)
    quiesce(sim)
    assert_rings_agree(sim)
    for d in (AB, BA):
        sim.claim(d, 10_000)  # hand out everything left: still no reuse, still equal


def test_no_loss_schedule_stores_every_block_by_ratio():
    sim = Sim((3, 1), capacity=100_000, seed=1)
    sim.connect()
    quiesce(sim)
    for _ in range(400):
        sim.new_block(32, False, False)
        sim.deliver_block(LEADER)
        sim.deliver_block(FOLLOWER)
        quiesce(sim)
    assert sim.stored_bytes == 2 * 400 * 32  # every block, at both ends
    leader = sim.ends[LEADER]
    assert leader.counters.bytes_stored[AB] == 300 * 32
    assert leader.counters.bytes_stored[BA] == 100 * 32
    assert_rings_agree(sim)


def both_get_block(sim: Sim, size: int) -> None:
    """A new block reaches both ends, and every message in flight is delivered."""
    sim.new_block(size, False, False)
    sim.deliver_block(LEADER)
    sim.deliver_block(FOLLOWER)
    quiesce(sim)


def test_full_ring_discards_at_both_ends():
    sim = Sim((1, 1), capacity=64, seed=2)
    sim.connect()
    quiesce(sim)
    for _ in range(10):
        both_get_block(sim, 32)
    # 64 B per direction: two blocks each fit, the other six are discarded by agreement.
    for d in (AB, BA):
        assert sim.rings[LEADER][d].write == 64
        assert sim.rings[FOLLOWER][d].write == 64
    assert sim.ends[LEADER].counters.blocks_discarded["ring_full"] == 6
    assert not sim.ends[FOLLOWER].pending


def test_block_missing_at_follower_is_discarded_not_guessed():
    sim = Sim((1, 0), capacity=1000, seed=3)
    sim.connect()
    quiesce(sim)
    sim.new_block(16, False, True)   # only the leader gets block 0
    sim.new_block(16, False, False)  # both get block 1
    quiesce(sim)
    sim.tick(0.2)  # the next sweep finds block 0 lost at the follower
    assert sim.rings[LEADER][AB].write == 16
    assert sim.rings[FOLLOWER][AB].write == 16
    assert sim.ends[LEADER].counters.blocks_discarded == {"peer_missing": 1}
    assert_rings_agree(sim)


def test_a_block_waits_out_a_restart_of_the_other_ends_source():
    """One end's source away for 25 s (its device restarted, reconnects backing off 1, 2,
    4, 8 s): the block the other end took meanwhile is stored at both once it comes, not
    lost at both (5 s was the timeout); one that never comes is let go after the
    timeout, and the follower told."""
    lead = Leader((1, 0), capacity=1000, write_pos=(0, 0))
    fol = Follower(capacity=1000, write_pos=(0, 0))
    (hello,) = fol.on_connect((0, 0))
    (sync,) = lead.on_message(hello.msg, (0, 0), 0.0)
    fol.on_message(sync.msg, (0, 0), 0.0)
    lead.on_block((7, 0), b"k" * 16, (0, 0), 0.0)
    for t in range(1, 26):  # the follower's source is away; the leader sweeps
        assert not any(isinstance(a, Dropped) for a in lead.on_tick((0, 0), float(t)))
    (have,) = fol.on_block((7, 0), b"k" * 16, (0, 0), 25.0)
    acts = lead.on_message(have.msg, (0, 0), 25.0)
    assert [(a.direction, a.pos) for a in acts if isinstance(a, Store)] == [(AB, 0)]
    (decide,) = [a for a in acts if isinstance(a, Send)]
    assert [(a.direction, a.pos) for a in fol.on_message(decide.msg, (0, 0), 25.0)
            if isinstance(a, Store)] == [(AB, 0)]
    lead.on_block((7, 1), b"j" * 16, (0, 0), 26.0)  # never comes at the follower
    assert not lead.on_tick((0, 0), 26.0 + PENDING_BLOCK_TIMEOUT_S - 0.5)
    acts = lead.on_tick((0, 0), 26.0 + PENDING_BLOCK_TIMEOUT_S + 0.5)
    assert [a.reason for a in acts if isinstance(a, Dropped)] == ["timeout"]
    assert [d.fate for a in acts if isinstance(a, Send) for d in a.msg.decisions] == \
        [Fate.DISCARD]


def test_follower_applies_only_what_the_leader_decided():
    f = Follower(capacity=1000, write_pos=(0, 0))
    f.on_connect((0, 0))
    f.on_message(Sync(1, (0, 0)), (0, 0), 0.0)
    f.on_block((1, 0), b"x" * 8, (0, 0), 0.0)
    # A decision for a position the follower is not at: it resyncs instead of storing.
    acts = f.on_message(Decide(1, (Decision((1, 0), Fate.BA, 40),)), (0, 0), 0.0)
    assert not any(isinstance(a, Store) for a in acts)
    assert any(isinstance(a, Send) and a.msg.__class__.__name__ == "Hello" for a in acts)
    # A decision from an old session is ignored outright.
    assert f.on_message(Decide(1, (Decision((1, 0), Fate.BA, 0),)), (0, 0), 0.0) == []


def test_split_policy_follows_ratio_exactly():
    p = SplitPolicy((2, 1))
    picks = []
    for _ in range(300):
        d = p.choose(10)
        p.record(d, 10)
        picks.append(d)
    assert picks.count(AB) == 200 and picks.count(BA) == 100
    assert SplitPolicy((0, 1)).choose(5) == BA
    assert SplitPolicy((1, 0)).choose(5) == AB


def test_full_direction_spills_over_to_the_other():
    # 1:1, but nothing frees b->a: once it is full, a->b takes every block (no waste),
    # and a direction with no share never gets any.
    sim = Sim((1, 1), capacity=64, seed=5)
    sim.connect()
    quiesce(sim)
    for _ in range(10):
        both_get_block(sim, 16)
        sim.claim(AB, 16)
        sim.release_dec(AB, 1.0)
    assert sim.rings[LEADER][BA].write == 64  # b->a full after its 4 alternate blocks
    assert sim.rings[LEADER][AB].write == 96  # ... so a->b took the other 6
    assert sim.ends[LEADER].counters.blocks_discarded.get("ring_full", 0) == 0
    assert_rings_agree(sim)
    one_way = Sim((1, 0), capacity=32, seed=6)
    one_way.connect()
    quiesce(one_way)
    for _ in range(4):
        both_get_block(one_way, 16)
    assert one_way.rings[LEADER][BA].write == 0
    assert one_way.ends[LEADER].counters.blocks_discarded["ring_full"] == 2


def test_upper_limit_counts_the_peers_ring_too():
    # a->b only; the leader uses its ENC key at once, the follower never frees its DEC ring.
    sim = Sim((1, 0), capacity=64, seed=4)
    sim.connect()
    quiesce(sim)
    for _ in range(6):
        both_get_block(sim, 32)
        sim.claim(AB, 32)
    assert sim.rings[FOLLOWER][AB].write == 64  # full: later blocks discarded at both ends
    assert sim.rings[LEADER][AB].write == 64
    assert sim.ends[LEADER].counters.blocks_discarded["ring_full"] == 4


def test_a_reconnection_keeps_the_key_lost_decisions_are_sent_again_and_only_else_wiped():
    """Equal write positions at both ends: what they hold is the same, and kept (an
    underlay hiccup or a restarted process cost a whole ring of key before). A decision
    lost in flight is sent again at the next session, so the key is kept too (a forged
    reset under a Decide wiped every stored byte of a ring at both ends, 100 MiB a packet
    in an audit). Only when the follower no longer holds the block do both skip past the
    higher position, so no byte either end might not hold alike is ever used."""
    sim = Sim((1, 1), capacity=1000, seed=3)
    sim.connect()
    quiesce(sim)
    for _ in range(4):
        both_get_block(sim, 32)
    held = {d: dict(sim.rings[FOLLOWER][d].data) for d in (AB, BA)}
    writes = [(sim.rings[e][AB].write, sim.rings[e][BA].write) for e in (LEADER, FOLLOWER)]
    assert writes[0] == writes[1] == (64, 64) and held[AB] and held[BA]
    sim.disconnect()
    sim.crash(FOLLOWER, reboot=False)  # its process restarted: the rings are still there
    sim.connect()
    quiesce(sim)
    for d in (AB, BA):  # nothing skipped, nothing wiped: both ends still hold it all
        assert (sim.rings[LEADER][d].write, sim.rings[FOLLOWER][d].write) == (64, 64)
        assert sim.rings[FOLLOWER][d].data == held[d]
        assert sim.rings[LEADER][d].data == held[d]
    sim.claim(AB, 64)  # and it is used: the same bytes at both ends (checked in claim)

    def lose_a_decision() -> int:
        """A block both ends got; the leader decides it and its Decide is lost."""
        sim.new_block(32, False, False)
        sim.deliver_block(FOLLOWER)
        sim.deliver_msg(LEADER)  # the follower's Have
        before = [sim.rings[LEADER][d].write for d in (AB, BA)]
        sim.deliver_block(LEADER)  # the leader decides and sends Decide ...
        sim.disconnect()  # ... which is lost
        decided = [d for d in (AB, BA) if sim.rings[LEADER][d].write == before[d] + 32]
        assert len(decided) == 1
        return decided[0]

    d = lose_a_decision()
    kept = {e: dict(sim.rings[e][d].data) for e in (LEADER, FOLLOWER)}
    sim.connect()
    quiesce(sim)
    assert sim.rings[LEADER][d].write == sim.rings[FOLLOWER][d].write == 96  # sent again
    assert sim.ends[LEADER].counters.decisions_replayed == 1
    for e in (LEADER, FOLLOWER):
        assert all(sim.rings[e][d].data.get(p) == v for p, v in kept[e].items())
        assert sim.ends[e].counters.bytes_skipped == [0, 0]
    assert_rings_agree(sim)
    # Lost again, and this time the follower's process restarts: it no longer holds the
    # block, so the decision cannot be filed there; both skip past the higher position.
    d = lose_a_decision()
    past = sim.rings[LEADER][d].write + 1
    sim.crash(FOLLOWER, reboot=False)
    sim.connect()
    quiesce(sim)
    assert sim.rings[LEADER][d].write == sim.rings[FOLLOWER][d].write == past  # past both
    assert not [p for p in sim.rings[FOLLOWER][d].data if p < past]
    assert not [p for p in sim.rings[LEADER][d].data if p < past]
    assert_rings_agree(sim)
