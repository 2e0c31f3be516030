"""Repeated measurements: every bench reports the median run, with all runs' rates."""

from __future__ import annotations


def median_run(runs: list[dict], key: str = "gbps") -> dict:
    """A copy of the median of ``runs`` by ``key``, with every run's Gb/s in
    ``runs_gbps`` (and, when ranked by another key, its values in ``runs_<key>``), in
    that order."""
    ranked = sorted(runs, key=lambda r: r[key])
    med = dict(ranked[len(ranked) // 2])
    med["runs_gbps"] = [round(r["gbps"], 3) for r in ranked]
    if key != "gbps":
        med[f"runs_{key}"] = [round(r[key]) for r in ranked]
    return med
