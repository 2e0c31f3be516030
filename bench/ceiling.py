"""Ceilings and targets: each bench's figure beside what this machine does at best for the
same work, measured in the same run, and the targets set as ratios of that ceiling.

Absolute figures do not travel between machines, even of one kind (the same code gave
2.5-3.5x apart on two 2-core VMs); a ratio to a ceiling measured in the same run does.
Pure: the benches measure (``bench.bare_*``), these functions judge.

The ceilings (what each bench's work is bounded by, without our code in the way):
- ``otp``: iperf3 over the bare underlay between the same namespaces, no tunnel; via a
  relay, through the middle node with the kernel forwarding;
- ``api``: the same load generator against a bare Sanic HTTPS endpoint (mutual TLS)
  answering a constant key container of the same size;
- ``gkm``: the same bytes written to a bare RocksDB store with the key store's options
  and durability for received blocks;
- ``lkm``: the key source alone (the emulator read at both ends, no rings).
"""

from __future__ import annotations

# The result fields each target judges, as ratios of the bench's ceiling.
TARGETS: dict[str, dict[str, float]] = {
    "otp": {"ratio_direct_vs_ceiling": 0.5, "ratio_relay_vs_ceiling": 0.25},
    "api": {"ratio_256bit_vs_ceiling": 0.5, "ratio_1MiB_vs_ceiling": 0.5},
    "gkm": {"ratio_vs_ceiling": 0.7},
    "lkm": {"ratio_vs_ceiling": 0.5},
}


def vs(ours: float | None, ceiling: float | None) -> float | None:
    """ours / ceiling, or None when either is missing or the ceiling is not positive."""
    if ours is None or ceiling is None or ceiling <= 0:
        return None
    return ours / ceiling


def meets(result: dict, bench: str) -> bool:
    """Every target of ``bench`` met by the ratios in ``result`` (a missing ratio fails)."""
    return all(result.get(k) is not None and result[k] >= t
               for k, t in TARGETS[bench].items())


def shortfalls(result: dict, bench: str) -> dict[str, float | None]:
    """Per missed target: how far the ratio is below it, as a fraction of the target
    (0.2: the ratio is 20% short), or None where no ratio was measured."""
    out: dict[str, float | None] = {}
    for k, t in TARGETS[bench].items():
        r = result.get(k)
        if r is None:
            out[k] = None
        elif r < t:
            out[k] = 1 - r / t
    return out


def verdict_line(result: dict, bench: str) -> str:
    """One line per bench: each target, the ratio measured and met or not (rich markup)."""
    parts = []
    for k, t in TARGETS[bench].items():
        r = result.get(k)
        name = k.removeprefix("ratio_").removesuffix("_vs_ceiling") or "ratio"
        name = "ours" if k == "ratio_vs_ceiling" else name
        if r is None:
            parts.append(f"{name} >= {t:.2f} of the ceiling: [yellow]not measured[/yellow]")
        else:
            ok = "[green]met[/green]" if r >= t else "[red]not met[/red]"
            parts.append(f"{name} {r:.2f} of the ceiling (target {t:.2f}): {ok}")
    return "targets: " + "; ".join(parts)
