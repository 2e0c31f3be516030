"""The worker-pool scaling bench's arithmetic (streams shared among iperf3 processes, their
reports combined, key per run, speedup and efficiency) and its load generator for real:
several iperf3 pairs at once between two scratch namespaces, by time and by byte count."""

from __future__ import annotations

import pytest

from bench import iperf, scaling
from bench.calibrate import scratch_pair


def test_streams_are_shared_evenly_and_no_process_runs_without_one():
    assert iperf.split(4, 2) == [2, 2]
    assert iperf.split(5, 2) == [3, 2]
    assert iperf.split(32, 16) == [2] * 16
    assert iperf.split(2, 4) == [1, 1]  # never more processes than streams
    assert sum(iperf.split(7, 3)) == 7
    with pytest.raises(ValueError):
        iperf.split(0, 1)


def test_reports_of_processes_that_ran_at_once_add_their_bytes_over_the_longest_time():
    a = {"gbps": 8.0, "bytes": 1_000_000_000, "seconds": 1.0, "retransmits": 2,
         "bytes_sent": 1_000_100_000}
    b = {"gbps": 4.0, "bytes": 1_000_000_000, "seconds": 2.0, "retransmits": 1,
         "bytes_sent": 1_000_200_000}
    c = iperf.combine([a, b])
    # 2 GB in 2 s, not 8 + 4 Gb/s: b ran on after a had finished
    assert c["gbps"] == pytest.approx(8.0)
    assert (c["bytes"], c["seconds"], c["retransmits"]) == (2_000_000_000, 2.0, 3)
    assert c["bytes_sent"] == 2_000_300_000
    assert c["procs_gbps"] == [8.0, 4.0]
    assert iperf.combine([a]) is a


def test_a_run_sends_a_share_of_the_key_left_and_never_nothing():
    assert scaling.run_bytes(0.9, 4 << 30) == int(0.9 * (4 << 30) * scaling.KEY_SHARE)
    assert scaling.run_bytes(0.5, 4 << 30, share=0.5) == 1 << 30
    assert scaling.run_bytes(0.0, 4 << 30) == 1 << 20


def test_the_busiest_worker_share_counts_only_the_runs_packets():
    assert scaling.busiest_share([100, 0, 5], [160, 40, 5]) == pytest.approx(0.6)
    assert scaling.busiest_share([7, 7], [7, 7]) is None


def test_speedup_and_efficiency_are_against_the_smallest_pool():
    rows = scaling.scaling_rows([
        {"workers": 4, "gbps": 12.0, "ceiling_gbps": 60.0},
        {"workers": 1, "gbps": 4.0, "ceiling_gbps": 40.0},
        {"workers": 2, "gbps": 8.0, "ceiling_gbps": 0.0},
    ])
    assert [r["workers"] for r in rows] == [1, 2, 4]
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 3.0]
    assert [r["efficiency"] for r in rows] == [1.0, 1.0, 0.75]
    assert [r["ratio_vs_ceiling"] for r in rows] == [0.1, None, 0.2]
    assert scaling.scaling_rows([]) == []


@pytest.mark.netns
def test_parallel_iperf3_pairs_carry_every_stream_by_time_and_by_byte_count():
    with scratch_pair() as (ns_a, a, ns_b, b):
        timed = iperf.once(ns_a, a, ns_b, b, 1.0, streams=4, procs=2)
        assert len(timed["procs_gbps"]) == 2 and all(g > 0 for g in timed["procs_gbps"])
        assert timed["gbps"] > 0 and timed["seconds"] >= 0.9
        counted = iperf.once(ns_a, a, ns_b, b, 30.0, streams=3, procs=3, nbytes=30 << 20)
        assert len(counted["procs_gbps"]) == 3
        # each pair sends its share of the bytes, then stops (in whole 128 KiB blocks)
        assert 30 << 20 <= counted["bytes_sent"] < (30 << 20) + 3 * (128 << 10)
        assert 0 < counted["bytes"] <= counted["bytes_sent"]
        assert counted["seconds"] < 30
