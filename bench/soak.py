"""`qkdctl bench soak`: the triangle under steady use for minutes or hours, watched for
what grows.

The triangle A, B, C at a real QKD key rate (100 Mb/s by default, every size derived from
it), global key kept for every pair, the key API at each node. For ``minutes``:
- a TCP stream from A to C through the OTP tunnels at a fifth of a link's rate;
- SAE-A takes keys from A's KME every second (``pull_bytes`` of 4 KiB keys) and SAE-C
  fetches each of them from C's KME, compared byte for byte, so A's store for C drains
  and is restocked over and over;
- every ``sample_s``: each process of the network (found by its namespace and command
  line) is read for its private memory (RssAnon: what a leak grows; shared rings are
  mapped, not leaked), all its memory (VmRSS) and its open descriptors; the key stores'
  files for their disk use.

Growth is measured from the end of the warm-up (the rings and stores fill first) to the
end, each end the median of three samples, over the processes alive at both ends (a
process that was restarted is an error, not growth). ``errors`` counts failed or
mismatched key exchanges, processes that died, and a stream that stopped or was not
delivered intact.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bench.harness import BenchError, Net, wait_until
from bench.scale import gkm_peer
from bench.topology import line, saes, template
from control.core import paths
from control.core.config import Sae
from control.core.statefile import read_status
from control.tools import emulation
from control.tools.demo import Saes
from control.tools.demo_stream import PacedStream

FLOOR = {"rss_growth_pct": 5.0, "fd_growth": 4, "errors": 0}
STREAM_PORT = 5299
TEMPLATE = """
[network]
name = "bench-soak"
prefix = "{prefix}"
[defaults]
key_rate_mbps = {rate}
[gkm]
low_watermark = "{low}"
high_watermark = "{high}"
""" + template(saes(("SAE-A", "A"), ("SAE-C", "C")), line("ABC", 209, closed=True))


@dataclass
class Sample:
    t: float                      # seconds since the start
    anon: dict[int, int]          # process identity -> private memory (bytes)
    rss: dict[int, int]           # ... -> all its memory (bytes)
    fds: dict[int, int]           # ... -> open descriptors
    names: dict[int, str] = field(default_factory=dict)
    disk: int = 0                 # key stores' disk use (bytes)


def _proc_memory(pid: int) -> tuple[int, int] | None:
    """(RssAnon, VmRSS) of ``pid`` in bytes; None if it is gone."""
    anon = rss = None
    try:
        for line_ in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line_.startswith("RssAnon:"):
                anon = int(line_.split()[1]) * 1024
            elif line_.startswith("VmRSS:"):
                rss = int(line_.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return (anon, rss) if anon is not None and rss is not None else None


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _proc_name(pid: int, modules: dict[int, str]) -> str:
    """A short name: the node module (from the supervisors' state files), a child of one
    (OTP and key API workers), the node supervisor or an emulator."""
    if pid in modules:
        return modules[pid]
    if _ppid(pid) in modules:
        return f"{modules[_ppid(pid)]} child"
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for role in (b"emulator", b"node"):
        if role in words:
            return role.decode()
    return "?"


def disk_use(root: Path) -> int:
    """Bytes of disk the files under ``root`` take (allocated blocks)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def growth(samples: list[Sample], warmup_s: float) -> dict:
    """What grew from the end of the warm-up to the end (pure). Each end is the median
    of up to three samples; only processes alive in every sample of both ends count."""
    after = [s for s in samples if s.t >= warmup_s]
    if len(after) < 2:
        raise ValueError("no samples after the warm-up: run longer than the warm-up")
    k = min(3, len(after) // 2)
    first, last = after[:k], after[-k:]
    alive = set.intersection(*(set(s.anon) for s in first + last))

    def med(group: list[Sample], attr: str) -> float:
        return statistics.median(sum(getattr(s, attr)[i] for i in alive) for s in group)

    anon0, anon1 = med(first, "anon"), med(last, "anon")
    rss0, rss1 = med(first, "rss"), med(last, "rss")
    per = {}
    for i in alive:
        a0 = statistics.median(s.anon[i] for s in first)
        a1 = statistics.median(s.anon[i] for s in last)
        per[i] = a1 - a0
    top = sorted(per.items(), key=lambda kv: -kv[1])[:3]
    names = after[-1].names
    return {
        "processes": len(alive),
        "rss_anon_bytes_start": int(anon0), "rss_anon_bytes_end": int(anon1),
        "rss_growth_pct": round(100 * (anon1 - anon0) / anon0, 2) if anon0 else 0.0,
        "rss_total_growth_pct": round(100 * (rss1 - rss0) / rss0, 2) if rss0 else 0.0,
        "fd_start": int(med(first, "fds")), "fd_end": int(med(last, "fds")),
        "fd_growth": int(med(last, "fds") - med(first, "fds")),
        "top_growth": [{"process": names.get(i, "?"), "bytes": int(b)} for i, b in top],
    }


class SoakNet(Net):
    TEMPLATE = TEMPLATE
    TAG = "bs"

    def processes(self) -> list[int]:
        return emulation._pids_of_network(self.prefix, str(self.cfg))

    def sample(self, t: float) -> Sample:
        from control.core.procs import process_identity

        s = Sample(t=t, anon={}, rss={}, fds={})
        modules = {}
        for node in self.topo.nodes:
            st = read_status(paths.node_dir(self.prefix, node) / "state.json") or {}
            modules.update({m["pid"]: f"{node} {m['name']}" for m in st.get("modules", [])
                            if isinstance(m.get("pid"), int)})
        for pid in self.processes():
            ident = process_identity(pid)
            mem = _proc_memory(pid)
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
            if not ident or mem is None:
                continue
            s.anon[ident], s.rss[ident] = mem
            s.fds[ident] = fds
            s.names[ident] = _proc_name(pid, modules)
        s.disk = sum(disk_use(paths.state_dir(self.prefix, n)) for n in self.topo.nodes)
        return s

    def wait_stocked(self, origin: str, dest: str, nbytes: int, timeout: float) -> None:
        """Until ``origin``'s store for ``dest`` holds ``nbytes`` of usable key."""
        wait_until(lambda: (gkm_peer(self.prefix, origin, dest).get("enc", {})
                            .get("usable") or 0) >= nbytes, timeout,
                   f"{origin}'s store for {dest} to be stocked; logs in "
                   f"{paths.log_dir(self.prefix)}")

    def stores_high(self) -> int:
        """Global key the stores may hold at most: each ordered pair's high watermark,
        at its origin (ENC) and its destination (DEC)."""
        return 2 * len(self.topo.gkm.pairs) * self.topo.gkm.high_watermark


def run(minutes: float = 60.0, rate: float = 100.0, sample_s: float = 10.0,
        pull_bytes: int = 256 << 10, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if minutes <= 0 or sample_s <= 0:
        raise BenchError("--minutes and --sample must be positive")
    seconds = minutes * 60
    warmup = min(max(60.0, 0.2 * seconds), 0.5 * seconds)
    high = max(8 << 20, int(rate * 1e6 / 8 * 4))  # four seconds of a link: restocks often
    net = SoakNet(console, rate=rate, low=f"{high // 2 >> 20}MiB",
                  high=f"{high >> 20}MiB")
    errors: dict[str, int] = {"exchanges": 0, "mismatched": 0, "processes_died": 0,
                              "stream": 0}
    samples: list[Sample] = []
    exchanged = keys = 0
    stream = None
    try:
        console.print(f"soak: triangle at {rate:g} Mb/s for {minutes:g} min "
                      f"(warm-up {warmup:.0f} s), sampling every {sample_s:g} s")
        net.up()
        saes = Saes(net.topo, Sae(id="SAE-A", node="A"), Sae(id="SAE-C", node="C"))
        if not saes.wait_ready(120):
            raise BenchError(f"the key API did not answer within 120 s; logs in "
                             f"{paths.log_dir(net.prefix)}")
        net.wait_stocked("A", "C", net.topo.gkm.low_watermark, 120)
        stream = PacedStream(net.ns("A"), net.addr("A"), net.ns("C"), net.addr("C"),
                             STREAM_PORT, rate * 1e6 / 5)
        t0 = time.monotonic()
        next_sample = t0
        last_received, last_progress = 0, t0
        while (now := time.monotonic()) - t0 < seconds:
            if now >= next_sample:
                samples.append(net.sample(now - t0))
                next_sample += sample_s
                s = samples[-1]
                if len(samples) > 1:
                    errors["processes_died"] += len(set(samples[-2].anon) - set(s.anon))
                got = stream.received.value
                if got > last_received:
                    last_received, last_progress = got, now
                elif now - last_progress > 30:
                    errors["stream"] += 1
                    last_progress = now
                console.print(
                    f"  {(now - t0) / 60:5.1f} min  {len(s.anon)} processes  "
                    f"private {sum(s.anon.values()) / 2**20:7.1f} MiB  "
                    f"fds {sum(s.fds.values())}  stores {s.disk / 2**20:6.1f} MiB  "
                    f"keys {keys}  stream {got / 1e6:8.1f} MB  "
                    f"errors {sum(errors.values())}", highlight=False)
            try:
                check = saes.exchange(pull_bytes, 4096)
                exchanged += 1
                keys += check.keys
                if not (check.identical and check.refused_again):
                    errors["mismatched"] += 1
            except RuntimeError as e:
                errors["exchanges"] += 1
                if errors["exchanges"] <= 5:
                    console.print(f"  [yellow]key exchange failed:[/yellow] {escape(str(e))}",
                                  highlight=False)
            time.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        res = stream.finish()
        stream = None
        if not res.intact:
            errors["stream"] += 1
        final = net.sample(time.monotonic() - t0)
        samples.append(final)
        logs = paths.log_dir(net.prefix)
    finally:
        if stream is not None:
            stream.kill()
        net.down()
    g = growth(samples, warmup)
    disk_max = max(s.disk for s in samples)
    bound = 2 * net.stores_high()
    out = {
        "bench": "soak", "minutes": minutes, "key_rate_mbps": rate, "sample_s": sample_s,
        "warmup_s": warmup, "samples": len(samples), "exchanges": exchanged, "keys": keys,
        "stream_mb": round(res.received / 1e6, 1),
        **g,
        "store_disk_bytes_max": disk_max, "store_disk_bytes_end": samples[-1].disk,
        "store_disk_bound_bytes": bound, "stores_high_bytes": net.stores_high(),
        "errors": sum(errors.values()), "errors_by_kind": errors,
        "series": [{"t": round(s.t), "anon": sum(s.anon.values()),
                    "rss": sum(s.rss.values()), "fds": sum(s.fds.values()),
                    "disk": s.disk} for s in samples],
        "floor": FLOOR, "logs": str(logs),
    }
    out["meets_floor"] = (out["rss_growth_pct"] < FLOOR["rss_growth_pct"]
                          and out["fd_growth"] <= FLOOR["fd_growth"]
                          and out["errors"] == FLOOR["errors"] and disk_max <= bound)
    return out


def report(r: dict, console: Console) -> None:
    console.print(
        f"soak {r['minutes']:g} min at {r['key_rate_mbps']:g} Mb/s: {r['keys']} keys in "
        f"{r['exchanges']} exchanges, stream {r['stream_mb']} MB\n"
        f"  private memory {r['rss_anon_bytes_start'] / 2**20:.1f} -> "
        f"{r['rss_anon_bytes_end'] / 2**20:.1f} MiB over {r['processes']} processes: "
        f"{r['rss_growth_pct']:+.2f} % (floor < {FLOOR['rss_growth_pct']:g} %); all "
        f"memory {r['rss_total_growth_pct']:+.2f} %\n"
        f"  descriptors {r['fd_start']} -> {r['fd_end']} ({r['fd_growth']:+d}; floor "
        f"<= {FLOOR['fd_growth']})\n"
        f"  key stores on disk: at most {r['store_disk_bytes_max'] / 2**20:.1f} MiB, "
        f"{r['store_disk_bytes_end'] / 2**20:.1f} MiB at the end (watermarks allow "
        f"{r['stores_high_bytes'] / 2**20:.0f} MiB of key; bound "
        f"{r['store_disk_bound_bytes'] / 2**20:.0f} MiB)\n"
        f"  errors {r['errors']} {r['errors_by_kind']}\n"
        f"  {'[green]meets[/green]' if r['meets_floor'] else '[red]misses[/red]'} the floor",
        highlight=False)
