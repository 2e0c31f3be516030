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


def _replay_waste(packets: list[tuple[int, int]], workers: int = 2, chunk: int = 4096
                  ) -> tuple[int, int]:
    """(wasted, used) key bytes when ``packets`` ((worker, pad bytes), 2 ms apart) go
    through the claim rules against one shared claim cursor, as OTP workers do."""
    claim_pos, wasted, used = 0, 0, 0
    pools = [({}, list(range(w, 63, workers))[:4], ClaimSizer(chunk)) for w in range(workers)]
    for i, (w, need) in enumerate(packets):
        held, lanes, sizer = pools[w]
        lane = pick_range(held, need)
        if lane is None:
            size = sizer.size(need, i * 0.002)
            lane, _ = lane_to_claim(held, lanes, claim_pos)
            if lane in held:
                cur, end = held.pop(lane)
                if end == claim_pos:
                    claim_pos = cur  # the last claim: its rest goes back
                else:
                    wasted += end - cur
            held[lane] = [claim_pos, claim_pos + size]
            claim_pos += size
        held[lane][0] += need
        sizer.used(need)
        used += need
    return wasted, used


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
    wasted, used = _replay_waste(packets)
    assert used > 100 << 20
    assert wasted / used < 0.0005  # giving up the lowest range instead: about 0.4 %
