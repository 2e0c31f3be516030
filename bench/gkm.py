"""`qkdctl bench gkm`: the global key manager (module 3), the paper's method: the time until
a pair's global key store is filled to its maximum, for several global key (block) sizes,
direct and via one relay.

Three nodes in a line, A - B - C, with the real node processes. Pairs A-B and A-C keep
global key; B fills B->A over one OTP link (*direct*) and C fills C->A through B (*via
relay*: decrypted and encrypted again at B). Every key manager starts paused; the rings
are filled from the emulators, which are then paused (SIGSTOP) so the measurement is the
global key manager's own cost, with the OTP tunnels under it, not the CPU spent emulating
QKD. Then one origin at a time is released, and the key manager's own clock (from the
first block generated to the store holding the maximum, all of it acknowledged) gives the
fill time; the bench checks it against its own wall clock.

Baseline: the paper's key manager shares one key at a time; ours pipelines a window of
blocks and batches them per message and per database write. The same code with a window
of one block (stop and wait, one block per message and write) is the baseline, measured
in the same run.

Ceiling in the same run (``bench.bare_store``): the same bytes (the store's size, 1 MiB
blocks) written to a bare RocksDB store with the key store's options and the durability
of received blocks, in the same filesystem, no relay; and, for reference, the same
written to two such stores at once (what bounded a fill while the origin also stored each
block's bytes, not its seed: both ends here share one disk and two cores) and the disk's
own synced write rate. The target is a ratio of the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import bare_store
from bench.ceiling import TARGETS, meets, verdict_line, vs
from bench.harness import BenchError, Net
from bench.plotting import figure, finish, log_axes, paper_table, save
from bench.runs import median_run
from bench.topology import line, template
from control.core import paths
from control.gkm.manager import PAUSE_FLAG

PAPER = {"mbps_at_1MB": 85.0}
DEFAULT_SIZES = (1 << 10, 16 << 10, 256 << 10, 1 << 20)
TEMPLATE = """
[network]
name = "bench-gkm"
prefix = "{prefix}"
[defaults]
key_rate_mbps = 0
block_size = "1MiB"
ring_capacity = "{ring}"
[gkm]
block_size = {block}
low_watermark = {low}
high_watermark = {high}
window = {window}
pairs = [["A", "B"], ["A", "C"]]
""" + template(line("ABC", 205))


class GkmNet(Net):
    """The bench network, with every global key manager paused at start."""

    TEMPLATE = TEMPLATE
    TAG = "bg"

    def __init__(self, block: int, store: int, window: int, ring: str, console: Console):
        super().__init__(console, ring=ring, block=block, low=store // 2, high=store,
                         window=window)
        self.store = store

    def up(self) -> None:
        super().up(paused_gkm=self.topo.nodes)

    def gkm(self, node: str) -> dict:
        try:
            return json.loads((paths.node_dir(self.prefix, node) / "gkm.json").read_text())
        except (OSError, ValueError):
            return {}

    def median_fill(self, origin: str, dest: str, repeat: int, timeout: float) -> dict:
        """The median of ``repeat`` fills of ``origin``'s store for ``dest`` (each after
        the rings are refilled), with every run's rate in ``runs_gbps``."""
        runs = []
        for _ in range(repeat):
            low = self.fill(min_fill=0.9, timeout=90)
            r = self.fill_store(origin, dest, timeout)
            r.update(ring_fill_before=round(low, 3))
            runs.append(r)
        return median_run(runs)

    def fill_store(self, origin: str, dest: str, timeout: float) -> dict:
        """Release ``origin``'s key manager (the first time) or empty its store for
        ``dest`` (then), and time the fill that follows."""
        t0 = time.monotonic()
        flag = paths.node_dir(self.prefix, origin) / PAUSE_FLAG
        before = ((self.gkm(origin).get("peers", {}).get(dest, {}).get("relay") or {})
                  .get("last_fill") or {}).get("ended_ago_s")
        if flag.exists():
            flag.unlink()
        else:
            self.drain(origin, dest)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            st = self.gkm(origin).get("peers", {}).get(dest, {})
            fill = (st.get("relay") or {}).get("last_fill")
            fresh = fill and (before is None or
                              fill["ended_ago_s"] < time.monotonic() - t0)
            if fresh and fill["seconds"]:
                wall = time.monotonic() - t0 - fill["ended_ago_s"]
                relay = st["relay"]
                return {"bytes": fill["bytes"], "seconds": fill["seconds"],
                        "wall_seconds": wall, "gbps": fill["bytes"] * 8 / fill["seconds"] / 1e9,
                        "retries": relay["retries"], "conflicts": relay["conflicts"],
                        "usable": st["enc"]["usable"], "dest_stored": self._stored(dest, origin)}
            time.sleep(0.05)
        st = self.gkm(origin).get("peers", {}).get(dest, {})
        raise BenchError(f"{origin}->{dest}: store not full after {timeout:.0f} s "
                         f"({(st.get('enc') or {}).get('usable', 0) >> 20} MiB usable); logs "
                         f"in {paths.log_dir(self.prefix)}")

    def drain(self, origin: str, dest: str) -> None:
        """Take every usable key of the pair at once, as an application would."""
        from control.gkm.client import GkmClient

        c = GkmClient(self.prefix, origin, timeout_s=60)
        try:
            enc = c.summary()["peers"][dest]["enc"]
            block = self.topo.gkm.block_size
            if enc["usable"] >= block:
                c.take_enc(dest, enc["usable"] // block, block)
        finally:
            c.close()

    def _stored(self, node: str, origin: str) -> int:
        with contextlib.suppress(KeyError, TypeError):
            return self.gkm(node)["peers"][origin]["dec"]["stored"]
        return 0


def measure(block: int, store: int, window: int, ring: str, paths_: tuple[str, ...],
            repeat: int, timeout: float, console: Console) -> list[dict]:
    """Per path the median of ``repeat`` fills (the first from a paused start, the
    others after the store was emptied at once)."""
    net = GkmNet(block, store, window, ring, console)
    out = []
    try:
        net.up()
        for path in paths_:
            origin = "B" if path == "direct" else "C"
            med = net.median_fill(origin, "A", repeat, timeout)
            med.update(path=path, block=block, window=window, store=store)
            out.append(med)
    finally:
        net.down()
    return out


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, store: int = 256 << 20,
        window: int = 16 << 20, baseline_sizes: tuple[int, ...] = (1 << 20,),
        repeat: int = 3, ring: str = "1GiB", timeout: float = 240.0,
        plot_path: Path | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    console.print(f"[bold]bench gkm[/bold]: A - B - C in namespaces; time to fill a "
                  f"{_size(store)} store, B->A direct and C->A via B; window "
                  f"{_size(window)}; median of {repeat} fills; {os.cpu_count()} cores")
    points: list[dict] = []
    for size in sizes:
        console.print(f"  global key size {_size(size)}: bringing up, filling rings ...")
        for r in measure(size, store, window, ring, ("direct", "relay"), repeat, timeout,
                         console):
            r["method"] = "proposed"
            points.append(r)
            console.print(f"    {r['path']:6}: {r['bytes'] >> 20} MiB in {r['seconds']:.2f} s"
                          f" = {r['gbps']:.2f} Gb/s (runs: "
                          f"{', '.join(f'{g:.2f}' for g in r['runs_gbps'])}; "
                          f"{r['retries']} retries)")
    for size in baseline_sizes:
        console.print(f"  baseline (one block in flight), {_size(size)} ...")
        for r in measure(size, store, size, ring, ("direct",), repeat, timeout, console):
            r["method"] = "stop-and-wait"
            points.append(r)
            console.print(f"    {r['path']:6}: {r['gbps']:.2f} Gb/s (runs: "
                          f"{', '.join(f'{g:.2f}' for g in r['runs_gbps'])})")
    ceilings = measure_ceilings(store, repeat, console)
    return summarize(points, sizes, store, window, plot_path, console, ceilings)


def measure_ceilings(store: int, repeat: int, console: Console) -> dict[str, dict]:
    """The bare store's, two bare stores' at once and the disk's synced write rates for
    ``store`` bytes of 1 MiB blocks, medians of ``repeat``, in the key stores'
    filesystem."""
    out = {}
    for name, fn, what in (("store", bare_store.store_write, "bare RocksDB store"),
                           ("two_stores", bare_store.store_write_pair,
                            "two bare stores at once (each byte at both ends)"),
                           ("disk", bare_store.disk_write, "disk, write + fdatasync")):
        out[name] = median_run([fn(store, 1 << 20) for _ in range(repeat)])
        console.print(f"  ceiling, {what}, {_size(store)} in 1 MiB blocks: "
                      f"{out[name]['gbps']:.2f} Gb/s (runs: "
                      f"{', '.join(f'{g:.2f}' for g in out[name]['runs_gbps'])})")
    return out


def _get(points: list[dict], method: str, path: str, block: int) -> dict | None:
    return next((p for p in points if p["method"] == method and p["path"] == path
                 and p["block"] == block), None)


def summarize(points: list[dict], sizes: tuple[int, ...], store: int, window: int,
              plot_path: Path | None, console: Console,
              ceilings: dict[str, dict] | None = None) -> dict:
    t = Table(title=f"global key manager: time to fill a {_size(store)} store "
                    "(cf. the paper's Section IV.D)")
    for col in ("global key size", "direct s", "direct Gb/s", "via relay s", "relay Gb/s",
                "stop-and-wait Gb/s"):
        t.add_column(col, justify="right")
    for size in sizes:
        d = _get(points, "proposed", "direct", size)
        r = _get(points, "proposed", "relay", size)
        b = _get(points, "stop-and-wait", "direct", size)
        t.add_row(_size(size), f"{d['seconds']:.2f}" if d else "-",
                  f"{d['gbps']:.2f}" if d else "-", f"{r['seconds']:.2f}" if r else "-",
                  f"{r['gbps']:.2f}" if r else "-", f"{b['gbps']:.3f}" if b else "-")
    console.print(t)
    top = _get(points, "proposed", "direct", 1 << 20)
    top_relay = _get(points, "proposed", "relay", 1 << 20)
    base = _get(points, "stop-and-wait", "direct", 1 << 20)
    d_gbps = top["gbps"] if top else 0.0
    ceilings = ceilings or {}
    c_store = ceilings["store"]["gbps"] if "store" in ceilings else None
    c_disk = ceilings["disk"]["gbps"] if "disk" in ceilings else None
    c_two = ceilings["two_stores"]["gbps"] if "two_stores" in ceilings else None
    result = {
        "bench": "gkm", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "paper": PAPER, "floor": TARGETS["gkm"], "store_bytes": store, "window_bytes": window,
        "state_dir": str(paths.RUN_ROOT),
        "direct_gbps_at_1MiB": d_gbps,
        "relay_gbps_at_1MiB": top_relay["gbps"] if top_relay else None,
        "baseline_gbps_at_1MiB": base["gbps"] if base else None,
        "ratio_vs_paper": d_gbps * 1000 / PAPER["mbps_at_1MB"],
        "ratio_vs_baseline": d_gbps / base["gbps"] if base and base["gbps"] else None,
        "ceiling_store_gbps": c_store, "ceiling_disk_gbps": c_disk,
        "ratio_vs_ceiling": vs(d_gbps if top else None, c_store),
        "ratio_relay_vs_ceiling": vs(top_relay["gbps"] if top_relay else None, c_store),
        "ratio_vs_disk": vs(d_gbps if top else None, c_disk),
        "ceiling_two_stores_gbps": c_two,
        "ratio_vs_two_stores": vs(d_gbps if top else None, c_two),
        "points": points, "ceilings": ceilings,
    }
    result["meets_floor"] = meets(result, "gkm")
    rows = [("global key manager, 1 MB keys, direct", "85 Mb/s", f"{d_gbps:.2f} Gb/s",
             f"{result['ratio_vs_paper']:.1f}")]
    if top_relay:
        rows.append(("same, via one relay", "-", f"{top_relay['gbps']:.2f} Gb/s",
                     f"{top_relay['gbps'] * 1000 / PAPER['mbps_at_1MB']:.1f}"))
    if base:
        rows.append(("baseline: stop and wait (one block in flight)", "-",
                     f"{base['gbps']:.3f} Gb/s", f"{base['gbps'] * 1000 / 85:.1f}"))
    console.print(paper_table(rows))
    if result["ratio_vs_baseline"]:
        console.print(f"pipelined / stop-and-wait measured in this run: "
                      f"{result['ratio_vs_baseline']:.1f}x")
    if c_store and top:  # the ceiling's figures are for 1 MiB keys, which this run may lack
        console.print(f"1 MiB keys, direct: {d_gbps:.2f} Gb/s filled, {c_store:.2f} Gb/s into a "
                      f"bare store, {c_disk or 0:.2f} Gb/s to the disk (same run)")
    if c_two and top:
        console.print(f"  for reference: {c_two:.2f} Gb/s into two bare stores at once, the "
                      f"bound while the origin stored each block's bytes too: "
                      f"{result['ratio_vs_two_stores']:.2f} of it")
    console.print(verdict_line(result, "gkm"))
    return finish(result, console, plot_path, lambda out: plot(points, sizes, out))


def plot(points: list[dict], sizes: tuple[int, ...], out: Path) -> Path:
    fig, ax = figure()
    for method, path, style, label in (("proposed", "direct", "-o", "direct"),
                                       ("proposed", "relay", "-s", "via one relay"),
                                       ("stop-and-wait", "direct", "x", "stop and wait")):
        pts = sorted((p["block"], p["gbps"] * 1000) for p in points
                     if p["method"] == method and p["path"] == path)
        if pts:
            ax.plot([b for b, _ in pts], [v for _, v in pts], style, label=label)
    ax.plot([1 << 20], [PAPER["mbps_at_1MB"]], "k*", ms=10, label="paper: 85 Mb/s at 1 MB")
    log_axes(ax, list(sizes), [_size(s) for s in sizes])
    return save(fig, ax, out, title="global key manager: fill rate against key size",
                xlabel="global key size", ylabel="store fill rate (Mb/s)")
