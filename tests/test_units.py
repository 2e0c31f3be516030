"""Sizes and rates shown to operators, and a counter's rate over a window (pure)."""

import random

import pytest

from control.core.counter_rate import CounterRate
from control.core.units import rate, size


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (750, "750 B"), (1023, "1,023 B"), (1024, "1.00 KiB"),
    (96 * 1024, "96.0 KiB"), (756 * 1024, "756 KiB"), (int(1.25 * 2**20), "1.25 MiB"),
    (64 * 2**30, "64.0 GiB"),
    # at a unit's edge, the next unit (not "1,024 KiB"), and three figures (not "10.00")
    (1023.6, "1.00 KiB"), (2**20 - 1, "1.00 MiB"), (10239, "10.0 KiB"), (102389, "100 KiB"),
    (-5, "0 B"), (float("nan"), "0 B"),
])
def test_sizes_carry_the_unit_that_suits_them(n, text):
    assert size(n) == text


@pytest.mark.parametrize(("bps", "text"), [
    (0, "0 b/s"), (999, "999 b/s"), (50e3, "50.0 kb/s"), (200e3, "200 kb/s"),
    (9.87e6, "9.87 Mb/s"), (1.02e9, "1.02 Gb/s"), (22.83e9, "22.8 Gb/s"),
    (999.6, "1.00 kb/s"), (999_999, "1.00 Mb/s"),
])
def test_rates_carry_the_unit_that_suits_them(bps, text):
    assert rate(bps) == text


def test_a_slow_links_blocks_average_out_over_the_window():
    """4 KiB blocks of a 0.2 Mb/s link, arriving 10 % early or late, sampled every 0.5 s: the
    rate over the window is within 5 % of 25 kB/s, where one half second swings by a
    block (8 KiB/s) either way."""
    rnd = random.Random(7)
    meter, got, t, step, total = CounterRate(span=10.0), 0, 0.0, 0.5, 0
    arrivals = []
    while t < 60:
        t += 4096 / 25_000 * rnd.uniform(0.9, 1.1)
        arrivals.append(t)
    half_second_rates = []
    prev = 0
    for i in range(1, 121):
        now = i * step
        total = 4096 * sum(1 for a in arrivals if a <= now)
        got = meter.update(total, now)
        half_second_rates.append((total - prev) / step)
        prev = total
        if now >= 12:
            assert got == pytest.approx(25_000, rel=0.05)
    assert max(abs(r - 25_000) for r in half_second_rates[24:]) > 0.2 * 25_000
    assert len(meter.marks) <= 10.0 / step + 2


def test_the_rate_starts_from_the_first_sample_and_never_divides_by_zero():
    meter = CounterRate(span=10.0)
    assert meter.update(0, 5.0) == 0.0
    assert meter.update(100, 5.0) == 0.0
    assert meter.update(300, 7.0) == pytest.approx(150.0)
