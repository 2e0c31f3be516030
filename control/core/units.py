"""Sizes and rates as an operator reads them, in the unit that suits each figure (pure).

One network spans links of 50 kb/s and of 1 Gb/s: a column in fixed MiB or Mb/s shows a
slow link's key as 0, so the sizes and rates in ``qkdctl status`` carry their own units
(all but the key accounting table's, in KiB: its columns add up to the byte).
"""

from __future__ import annotations

BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
RATE_UNITS = ("b/s", "kb/s", "Mb/s", "Gb/s", "Tb/s")


def _three_figures(v: float) -> str:
    """``v`` (>= 0) to about three significant figures: 1.23, 12.3, 123, 1,000."""
    return f"{v:.2f}" if round(v, 2) < 10 else f"{v:.1f}" if round(v, 1) < 100 \
        else f"{v:,.0f}"


def _scaled(v: float, base: int, units: tuple[str, ...]) -> str:
    """``v`` in the first unit in which it rounds to less than ``base`` (negative and
    not-a-number values read as 0)."""
    v = v if v > 0 else 0.0
    i = 0
    while i < len(units) - 1 and round(v) >= base:
        v /= base
        i += 1
    return f"{v:,.0f} {units[0]}" if i == 0 else f"{_three_figures(v)} {units[i]}"


def size(n: float) -> str:
    """Bytes in binary units: ``0 B``, ``750 B``, ``96.0 KiB``, ``1.25 MiB``."""
    return _scaled(n, 1024, BINARY_UNITS)


def rate(bps: float) -> str:
    """Bits per second in decimal units, as QKD links are quoted: ``0 b/s``,
    ``50.0 kb/s``, ``9.87 Mb/s``, ``1.02 Gb/s``."""
    return _scaled(bps, 1000, RATE_UNITS)
