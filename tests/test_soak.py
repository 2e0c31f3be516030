"""The soak bench's arithmetic (bench.soak.growth, disk_use), without a network."""

from __future__ import annotations

import pytest

from bench.soak import Sample, disk_use, growth


def series(anon_of, n: int = 10, step: float = 10.0, fds: int = 5) -> list[Sample]:
    """``n`` samples; ``anon_of(i, t)`` gives process i's private memory at time t (None:
    not alive then)."""
    out = []
    for k in range(n):
        t = k * step
        anon = {i: v for i in (1, 2, 3) if (v := anon_of(i, t)) is not None}
        out.append(Sample(t=t, anon=anon, rss={i: 2 * v for i, v in anon.items()},
                          fds={i: fds for i in anon}, names={i: f"p{i}" for i in anon}))
    return out


def test_flat_memory_is_no_growth():
    g = growth(series(lambda i, t: 1000 * i), warmup_s=20)
    assert g["rss_growth_pct"] == 0 and g["fd_growth"] == 0 and g["processes"] == 3


def test_a_leak_after_the_warm_up_shows_and_is_named():
    # Process 2 grows by 100 B/s; the warm-up's growth (the first 30 s) is not counted.
    def anon(i, t):
        return 10_000 + (100 * t if i == 2 else 0) + (5_000 if t < 30 else 0)
    g = growth(series(anon), warmup_s=30)
    # Medians of samples 3-5 (t 30..50) and 7-9 (t 70..90): +4,000 B of 30,000.
    assert g["rss_growth_pct"] == pytest.approx(100 * 4000 / 34000, abs=0.01)
    assert g["top_growth"][0] == {"process": "p2", "bytes": 4000}


def test_a_process_missing_at_either_end_is_left_out():
    g = growth(series(lambda i, t: None if i == 3 and t > 60 else 1000 * i), warmup_s=0)
    assert g["processes"] == 2 and g["rss_growth_pct"] == 0


def test_descriptors_that_grow_are_counted():
    samples = series(lambda i, t: 1000)
    for k, s in enumerate(samples):
        s.fds = {i: 5 + k for i in s.fds}
    g = growth(samples, warmup_s=0)
    # Medians of the first three (5, 6, 7 each) and the last three (12, 13, 14).
    assert g["fd_start"] == 18 and g["fd_end"] == 39 and g["fd_growth"] == 21


def test_a_run_shorter_than_its_warm_up_is_refused():
    with pytest.raises(ValueError, match="warm-up"):
        growth(series(lambda i, t: 1000, n=3), warmup_s=100)


def test_disk_use_counts_allocated_blocks(tmp_path):
    assert disk_use(tmp_path) == 0
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 10_000)
    assert disk_use(tmp_path) >= 10_000
    assert disk_use(tmp_path / "missing") == 0
