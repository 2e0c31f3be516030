"""`qkdctl bench lkm`: sustained local key processing per link, emulator unthrottled.

Two nodes in their own namespaces, one link, the emulator at full speed (AES-256-CTR
generator, so the emulator is not the bottleneck), both link ends running the real key
manager processes: source -> agreement over the veth underlay -> shared-memory rings.
A consumer at each end releases what the rings hold (as OTP workers would), so the
upper limit never throttles the measurement. Speed = key bytes stored into rings per
second at one end (both ends store the same bytes), measured after a warm-up.

Baseline in the same run (the paper's "conventional" processing): the same pipeline with
small key blocks of 4 KiB, i.e. one agreement decision and one ring write per small
chunk, as a per-file / per-key local key manager does.

Ceiling in the same run (``bench.bare_source``): the key source alone, the same emulator
read at both ends with nothing behind it; and, for reference, numpy copying the same
blocks into a /dev/shm mapping the size of a ring. The target is a ratio of the first.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from bench import bare_source
from bench.ceiling import TARGETS, meets, verdict_line, vs
from bench.harness import Net
from bench.topology import line, template
from control.core import paths
from dataplane.ring import CONTROL_LANE, KeyRing, RingError

BENCH_LANE = CONTROL_LANE - 1  # a worker lane the bench's 2-worker tunnels never use
PAPER_MBPS = 414.0
RING_CAPACITY = 256 << 20

TEMPLATE = """
[network]
name = "bench-lkm"
prefix = "{prefix}"
[defaults]
key_rate_mbps = 0
block_size = {block}
ring_capacity = {capacity}
[gkm]
pairs = []  # no global key: this network measures or tests other modules
""" + template(line("AB", 203))


class LkmNet(Net):
    """A - B, one link, nothing but its key managers' work to measure."""

    TEMPLATE = TEMPLATE
    TAG = "bl"


class _Rings:
    """Attaches to the network's rings as OTP workers would: releases what is written
    (so the upper limit never throttles) and reads how much node A has stored."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.rings: dict[str, KeyRing] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._consume, daemon=True)

    def _attach(self) -> None:
        for name in paths.ring_names_of_network(self.prefix):
            if name not in self.rings:
                with contextlib.suppress(RingError):
                    self.rings[name] = KeyRing.attach(name)

    def _consume(self) -> None:
        while not self.stop.is_set():
            self._attach()
            for r in list(self.rings.values()):
                with contextlib.suppress(RingError):
                    if r.is_enc:  # as an OTP worker on a lane of its own would
                        pos, n = r.claim_chunk(BENCH_LANE, r.capacity)
                        r.set_used(BENCH_LANE, pos + n)  # all of it used: none handed back
                        r.retire(BENCH_LANE)
                    else:
                        r.release(r.write_pos)
            time.sleep(0.02)

    def stored_at_a(self) -> int:
        mine = [r for n, r in list(self.rings.items())
                if n.startswith(f"qkdnet-{self.prefix}-A-")]
        return sum(r.write_pos for r in mine) if len(mine) == 2 else -1

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(2)
        for r in self.rings.values():
            r.close()


def measure(block: int, seconds: float, console: Console, label: str) -> dict:
    net = LkmNet(console, block=block, capacity=RING_CAPACITY)
    prefix = net.prefix
    rings = _Rings(prefix)
    try:
        net.up(ready=False)
        rings.thread.start()
        deadline = time.monotonic() + 20
        while rings.stored_at_a() <= 0:
            if time.monotonic() > deadline:
                raise RuntimeError("no key reached the rings within 20 s; see "
                                   f"{paths.log_dir(prefix)}")
            time.sleep(0.1)
        time.sleep(1.0)  # warm-up
        b0, t0 = rings.stored_at_a(), time.monotonic()
        with Progress(TextColumn("  {task.description}"), BarColumn(),
                      TextColumn("{task.fields[gbps]:.2f} Gb/s"), console=console,
                      transient=True) as bar:
            task = bar.add_task(label, total=seconds, gbps=0.0)
            while (elapsed := time.monotonic() - t0) < seconds:
                time.sleep(0.25)
                gbps = (rings.stored_at_a() - b0) * 8 / max(elapsed, 1e-3) / 1e9
                bar.update(task, completed=elapsed, gbps=gbps)
        b1, t1 = rings.stored_at_a(), time.monotonic()
        gbps = (b1 - b0) * 8 / (t1 - t0) / 1e9
        console.print(f"  {label}: {gbps:.2f} Gb/s")
        return {"block_size": block, "seconds": t1 - t0, "bytes": b1 - b0, "gbps": gbps}
    finally:
        rings.close()
        net.down()


def run(seconds: float = 10.0, console: Console | None = None) -> dict:
    console = console or Console()
    console.print(f"[bold]bench lkm[/bold]: one link, two namespaces, emulator unthrottled, "
                  f"{seconds:.0f} s per mode on {os.cpu_count()} cores")
    ours = measure(1 << 20, seconds, console, "proposed (1 MiB blocks)")
    base = measure(4096, seconds, console, "conventional (4 KiB blocks)")
    source = bare_source.source_alone(1 << 20, seconds)
    console.print(f"  ceiling, key source alone (emulator read at both ends): "
                  f"{source['gbps']:.2f} Gb/s")
    copy = bare_source.shm_copy(1 << 20, RING_CAPACITY)
    console.print(f"  ceiling, numpy copy into /dev/shm (1 MiB blocks): {copy['gbps']:.2f} Gb/s")
    result = {
        "bench": "lkm", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "paper_mbps": PAPER_MBPS, "ours_gbps": ours["gbps"],
        "baseline_gbps": base["gbps"], "ratio_vs_paper": ours["gbps"] * 1000 / PAPER_MBPS,
        "ratio_vs_baseline": ours["gbps"] / base["gbps"] if base["gbps"] else None,
        "ceiling_source_gbps": source["gbps"], "ceiling_shm_copy_gbps": copy["gbps"],
        "ratio_vs_ceiling": vs(ours["gbps"], source["gbps"]),
        "ratio_vs_shm_copy": vs(ours["gbps"], copy["gbps"]),
        "floor": TARGETS["lkm"], "runs": [ours, base], "ceiling_runs": [source, copy],
    }
    result["meets_floor"] = meets(result, "lkm")
    from rich.table import Table

    t = Table(title="local key manager: key stored into rings per link (one end)")
    for c in ("mode", "paper", "ours", "x paper", "x baseline", "x ceiling"):
        t.add_column(c)
    t.add_row("proposed, 1 MiB blocks", f"{PAPER_MBPS:.0f} Mb/s", f"{ours['gbps']:.2f} Gb/s",
              f"{result['ratio_vs_paper']:.1f}",
              f"{result['ratio_vs_baseline']:.1f}" if result["ratio_vs_baseline"] else "-",
              f"{result['ratio_vs_ceiling']:.2f}" if result["ratio_vs_ceiling"] else "-")
    t.add_row("conventional, 4 KiB blocks", "-", f"{base['gbps']:.2f} Gb/s", "-", "1.0", "-")
    t.add_row("ceiling: key source alone", "-", f"{source['gbps']:.2f} Gb/s", "-", "-", "1.0")
    t.add_row("numpy copy into /dev/shm", "-", f"{copy['gbps']:.2f} Gb/s", "-", "-", "-")
    console.print(t)
    console.print(verdict_line(result, "lkm"))
    return result
