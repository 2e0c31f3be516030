"""Sizes and rates as an operator reads them, in the unit that suits each figure (pure).

One network spans links of 50 kb/s and of 1 Gb/s: a column in fixed MiB or Mb/s shows a
slow link's key as 0, so every size and rate in ``qkdctl status`` carries its own unit.
"""

from __future__ import annotations

BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
RATE_UNITS = ("b/s", "kb/s", "Mb/s", "Gb/s", "Tb/s")


def _three_figures(v: float) -> str:
    """``v`` (>= 0) to about three significant figures: 1.23, 12.3, 123, 1,234."""
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def size(n: float) -> str:
    """Bytes in binary units: ``0 B``, ``750 B``, ``96.0 KiB``, ``1.25 MiB``."""
    if n < 1024:
        return f"{n:,.0f} B"
    i = 0
    while n >= 1024 and i < len(BINARY_UNITS) - 1:
        n /= 1024
        i += 1
    return f"{_three_figures(n)} {BINARY_UNITS[i]}"


def rate(bps: float) -> str:
    """Bits per second in decimal units, as QKD links are quoted: ``0 b/s``,
    ``50.0 kb/s``, ``9.87 Mb/s``, ``1.02 Gb/s``."""
    if bps < 1000:
        return f"{bps:,.0f} b/s"
    i = 0
    while bps >= 1000 and i < len(RATE_UNITS) - 1:
        bps /= 1000
        i += 1
    return f"{_three_figures(bps)} {RATE_UNITS[i]}"
