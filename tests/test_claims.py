"""Tests of dataplane/claims.py: claims sized to the traffic, ranges chosen per packet."""

from __future__ import annotations

import random

from dataplane import wire
from dataplane.claims import ClaimSizer, lane_to_claim, pick_range

MTU_PAD = 65_491  # a full-size packet's pad


def test_a_sparse_sender_claims_exactly_its_packets():
    s = ClaimSizer(1 << 20)
    sizes = [s.size(200, t * 0.1) for t in range(50)]  # one 200 B pad every 100 ms
    for _ in sizes:
        s.used(200)
    assert set(sizes) == {200}


def test_a_bulk_sender_claims_whole_packets_up_to_the_chunk():
    s = ClaimSizer(1 << 20)
    now, sizes = 0.0, []
    for _ in range(40):  # 1 GB/s of full packets
        size = s.size(MTU_PAD, now)
        sizes.append(size)
        s.used(size)
        now += size / 1e9
    assert sizes[0] == MTU_PAD  # after idleness: one packet
    assert all(x % MTU_PAD == 0 for x in sizes)  # equal packets use a claim to the byte
    assert max(sizes) <= 1 << 20 and sizes[-1] == MTU_PAD * ((1 << 20) // MTU_PAD)


def test_a_claim_never_exceeds_the_chunk_but_always_fits_the_packet():
    s = ClaimSizer(4096)
    s.size(100, 0.0)
    s.used(10**9)
    assert s.size(100, 0.001) == 4000  # 40 pads of 100 B within 4 KiB
    assert s.size(9000, 0.002) == 9000  # larger than the chunk: the packet itself


def test_pick_range_takes_the_lowest_range_the_packet_fits():
    held = {0: [100, 150], 2: [500, 2000], 4: [300, 400]}
    assert pick_range(held, 40) == 0
    assert pick_range(held, 60) == 4
    assert pick_range(held, 101) == 2
    assert pick_range(held, 2000) is None
    assert pick_range({}, 1) is None


def test_a_new_claim_continues_the_last_range_else_takes_a_free_lane_else_the_least_rest():
    lanes = [1, 3, 5, 7]
    assert lane_to_claim({3: [10, 20], 1: [40, 50]}, lanes, 50) == (1, True)
    assert lane_to_claim({3: [10, 20], 1: [40, 50]}, lanes, 60) == (5, False)
    full = {1: [40, 50], 3: [10, 20], 5: [70, 80], 7: [90, 95]}
    assert lane_to_claim(full, lanes, 200) == (7, False)  # the smallest rest goes
    full[7] = [90, 100]  # equal rests: the lowest range goes
    assert lane_to_claim(full, lanes, 200) == (3, False)
    full[3] = [10, 30]
    assert lane_to_claim(full, lanes, 200) == (1, False)
    assert lane_to_claim({}, lanes, 0) == (1, False)


def test_rests_shorter_than_any_pad_count_as_nothing_so_the_lowest_of_them_goes():
    lanes = [1, 3, 5, 7]
    held = {1: [40, 60], 3: [10, 16], 5: [70, 90], 7: [90, 92]}  # rests 20, 6, 20, 2
    assert lane_to_claim(held, lanes, 200) == (7, False)  # no pad known: the least rest
    assert lane_to_claim(held, lanes, 200, dead_below=8) == (3, False)  # both dead: lowest
    assert lane_to_claim(held, lanes, 200, dead_below=6) == (7, False)  # 6 can still serve


def test_the_sizer_knows_the_smallest_pad_used():
    s = ClaimSizer(max_chunk=1 << 20)
    assert s.smallest == 0
    for n in (1500, 84, 9000, 120):
        s.used(n)
    assert s.smallest == 84


def _replay(packets: list[tuple[int, int]], workers: int = 2, chunk: int = 4096,
            pin_limit: int = 2 << 20) -> tuple[int, int, float]:
    """(wasted, used, mean lag) when ``packets`` ((worker, pad bytes), 2 ms apart) go
    through the claim rules against one shared claim cursor, as OTP workers do; the lag
    is how far the ring's release point (the lowest position still held) trails the
    claim cursor, which is key the ring cannot refill. A kept range others have claimed
    ``pin_limit`` past is given up, as the worker's unpinning does."""
    claim_pos, wasted, used, lag = 0, 0, 0, 0
    pools = [({}, list(range(w, 63, workers))[:4], ClaimSizer(chunk)) for w in range(workers)]

    def give_up(held: dict, lane: int) -> None:
        nonlocal claim_pos, wasted
        cur, end = held.pop(lane)
        if end == claim_pos:
            claim_pos = cur  # the last claim: its rest goes back
        else:
            wasted += end - cur

    for i, (w, need) in enumerate(packets):
        held, lanes, sizer = pools[w]
        lane = pick_range(held, need)
        if lane is None:
            size = sizer.size(need, i * 0.002)
            lane, _ = lane_to_claim(held, lanes, claim_pos, sizer.smallest)
            if lane in held:
                give_up(held, lane)
            held[lane] = [claim_pos, claim_pos + size]
            claim_pos += size
            lowest = min(r[0] for h, _, _ in pools for r in h.values())
            for other in [x for x, r in held.items() if x != lane and r[0] == lowest
                          and r[0] < claim_pos - pin_limit]:
                give_up(held, other)
        held[lane][0] += need
        sizer.used(need)
        used += need
        lag += claim_pos - min(r[0] for h, _, _ in pools for r in h.values())
    return wasted, used, lag / len(packets)


def test_two_workers_sending_segments_and_acks_waste_almost_no_key():
    """The rests that claims leave behind when packets of many sizes share a worker's
    ranges: with the least rest given up, what is wiped stays a tiny fraction."""
    rnd = random.Random(7)
    packets = []
    for i in range(40_000):
        w = rnd.randrange(2) if rnd.random() < 0.3 else i // 50 % 2  # bursts per worker
        r = rnd.random()
        n = 52 if r < 0.4 else rnd.choice([1448, 2896, 8192]) if r < 0.7 else \
            rnd.randrange(100, 30_000)
        packets.append((w, wire.pad_len(n)))
    wasted, used, lag = _replay(packets)
    assert used > 100 << 20
    assert wasted / used < 0.0005  # giving up the lowest range instead: about 0.4 %
    # and the release point keeps up: the smallest rest given up, but dead rests first
    # (else the lowest range, kept for its rest, trailed by about half a ring)
    assert lag < 1 << 20
