"""What every bench shares: its emulated network, brought up under a prefix of its own and
taken down even when the bench fails (keeping the network's logs then), key flow paused and
resumed, the rings filled and read, iperf3 through the tunnels or over the bare underlay,
and waiting for a condition.

A bench subclasses ``Net`` with its own TOML ``TEMPLATE`` (a str.format template, nodes
and links from ``bench.topology``) and prefix ``TAG``, and calls ``down`` in a
``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from bench import bare_underlay, iperf
from control.core import paths
from control.core.config import Topology, parse_topology
from control.core.statefile import read_status
from control.gkm.manager import PAUSE_FLAG
from control.tools import emulation
from dataplane.ring import KeyRing, RingError
from dataplane.stats import LinkStats

KEPT_LOGS = Path("/var/tmp/qkdnet-bench-logs")  # a failed bench's network logs, kept
T = TypeVar("T")


class BenchError(Exception):
    """A bench could not measure what it set out to; the message says why."""


class KeyDry(BenchError):
    """A run spent all the key its rings held (key is paused during runs)."""


@dataclass(frozen=True)
class RingLevel:
    """How full a key ring is: ``available`` to its users (unclaimed in an ENC ring,
    unreleased in a DEC ring) and ``room_used`` (written and not yet freed: the writer
    can add only the rest), both shares of its capacity."""

    name: str
    is_enc: bool
    available: float
    room_used: float


class Net:
    """One bench network: brings it up, feeds and pauses key, runs iperf3 points.

    Subclasses set their own ``TEMPLATE`` and prefix ``TAG``; ``fields`` fill the template.
    """

    TEMPLATE = ""
    TAG = "bn"

    def __init__(self, console: Console, **fields: object):
        self.prefix = self.TAG + uuid.uuid4().hex[:6]
        self.console = console
        self.cfg = paths.RUN_ROOT / f"bench-{self.prefix}.toml"
        self.cfg.parent.mkdir(parents=True, exist_ok=True)
        self.cfg.write_text(self.TEMPLATE.format(prefix=self.prefix, **fields))
        self.topo: Topology = parse_topology(self.cfg.read_text(), self.cfg)
        self.emulators: list[int] = []
        self.paused = False
        self.started = 0.0

    def ns(self, node: str) -> str:
        return paths.netns_name(self.prefix, node)

    def addr(self, node: str) -> str:
        return str(self.topo.node(node).address)

    def up(self, paused_gkm: Iterable[str] = (), ready: bool = True) -> None:
        """Create the network and start its processes, the global key managers of
        ``paused_gkm`` paused (``PAUSE_FLAG``) from the start; ``started`` is when the
        processes were started. With ``ready``, wait until every node has a route to
        every other (``_ready``)."""
        man = emulation.net_up(self.topo, start=False)
        for node in paused_gkm:
            d = paths.node_dir(self.prefix, node)
            d.mkdir(parents=True, exist_ok=True)
            (d / PAUSE_FLAG).touch()
        self.started = time.monotonic()
        emulation.start_processes(self.topo, man)
        self.emulators = [p for k, p in man.pids.items() if k.startswith("emulator:")]
        if ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise BenchError(f"network not ready within {timeout:.0f} s; logs in "
                                 f"{paths.log_dir(self.prefix)}")
            time.sleep(0.3)

    def routes(self, node: str) -> dict:
        """``node``'s routes as its router last published them ({} before it has)."""
        r = read_status(paths.node_dir(self.prefix, node) / "router.json")
        return (r or {}).get("routes", {})

    def _ready(self) -> bool:
        return all(len(self.routes(n)) == len(self.topo.nodes) - 1 for n in self.topo.nodes)

    def pause_key(self, paused: bool) -> None:
        for pid in self.emulators:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)
        self.paused = paused

    def fill(self, min_fill: float = 0.9, timeout: float = 40.0) -> float:
        """Let key flow until every ring is at least ``min_fill`` full; returns the
        lowest share of a ring's capacity still available to its users.

        Full means the writer has filled the room it has: key used but not yet freed
        counts (a worker's kept range may hold an ENC ring's release point back by up to
        its pin limit, half the ring, and the peer's DEC ring follows that release), so
        a ring whose release point is pinned is as full as it gets well below
        ``min_fill`` of key available, and waiting for more only ran out the timeout."""
        self.pause_key(False)
        deadline = time.monotonic() + timeout
        low = 0.0
        while time.monotonic() < deadline:
            rings = self.ring_levels()
            low = min((r.available for r in rings), default=0.0)
            if rings and min(r.room_used for r in rings) >= min_fill:
                break
            time.sleep(0.2)
        self.pause_key(True)
        return low

    def dry_rings(self, below: float = 0.01) -> list[str]:
        """ENC rings with less than ``below`` of their capacity left unclaimed."""
        return [r.name for r in self.ring_levels() if r.is_enc and r.available < below]

    def ring_levels(self) -> list[RingLevel]:
        """Every key ring of the network, as shares of its capacity."""
        out = []
        for name in paths.ring_names_of_network(self.prefix):
            if name.endswith("-stats"):
                continue
            with contextlib.suppress(RingError):
                r = KeyRing.attach(name)
                c = r.cursors()
                avail = c.write_pos - (c.claim_pos if r.is_enc else c.release_pos)
                out.append(RingLevel(name, r.is_enc, avail / c.capacity,
                                     (c.write_pos - r.free_pos) / c.capacity))
                r.close()
        return out

    def set_mtu(self, mtu: int) -> None:
        from pyroute2 import IPRoute

        for node in self.topo.nodes:
            with IPRoute(netns=self.ns(node)) as ip:
                for link in ip.get_links():
                    name = link.get_attr("IFLA_IFNAME")
                    if name.startswith("otp"):
                        ip.link("set", index=link["index"], mtu=mtu)

    def counters(self) -> dict[tuple[str, str], dict[str, int]]:
        out = {}
        for lk in self.topo.links:
            for node in (lk.a, lk.b):
                st = LinkStats(paths.stats_name(self.prefix, node, lk.name))
                out[(node, lk.name)] = st.totals()
                st.close()
        return out

    def iperf(self, src: str, dst: str, seconds: float, streams: int = 1, procs: int = 1,
              nbytes: int | None = None) -> dict:
        """One iperf3 run between the node addresses (through the tunnels); ``procs`` and
        ``nbytes`` as in ``bench.iperf.once``."""
        return self._iperf(self.ns(src), self.addr(src), self.ns(dst), self.addr(dst),
                           seconds, streams, procs, nbytes)

    def iperf_bare(self, nodes: tuple[str, ...], seconds: float, streams: int = 1,
                   mtu: int | None = None, procs: int = 1) -> dict:
        """One iperf3 run over the bare underlay along ``nodes``, no tunnel (the ceiling):
        between underlay addresses, through the middle nodes' forwarding; with a path MTU
        of ``mtu`` if given."""
        netns = {n: self.ns(n) for n in self.topo.nodes}
        with bare_underlay.path(self.topo, netns, nodes, mtu) as (src, dst):
            return self._iperf(self.ns(nodes[0]), src, self.ns(nodes[-1]), dst, seconds,
                               streams, procs)

    def _iperf(self, src_ns: str, src: str, dst_ns: str, dst: str, seconds: float,
               streams: int, procs: int = 1, nbytes: int | None = None) -> dict:
        def hung(attempt: int) -> None:
            dry = self.dry_rings()
            if dry:  # key is paused during a run: a run that spends it all cannot go on
                raise KeyDry(
                    f"iperf3 {src}->{dst} hung with no key left in {', '.join(dry)}: the "
                    f"run spent all the key its rings held (key is paused during runs); "
                    f"give a larger ring or a shorter run")
            self.console.print(f"  iperf3 {src}->{dst} hung (attempt {attempt + 1} of 3)")

        try:
            return iperf.run(src_ns, src, dst_ns, dst, seconds, streams, on_hang=hung,
                             procs=procs, nbytes=nbytes)
        except iperf.IperfError as e:
            raise BenchError(f"{e}; logs in {paths.log_dir(self.prefix)}") from None

    def down(self) -> None:
        """Take the network down; when an exception is on its way out (the bench
        failed), first copy the network's logs to KEPT_LOGS, since down removes them."""
        if sys.exc_info()[0] is not None:
            kept = KEPT_LOGS / self.prefix
            with contextlib.suppress(OSError):
                shutil.copytree(paths.log_dir(self.prefix), kept, dirs_exist_ok=True)
                self.console.print(f"  the network's logs are kept in {kept}")
        with contextlib.suppress(Exception):
            self.pause_key(False)
        emulation.net_down(self.prefix)
        self.cfg.unlink(missing_ok=True)


def wait_until(cond: Callable[[], T], timeout: float, what: str | Callable[[], str],
               step: float = 0.2, error: type[Exception] = BenchError) -> T:
    """``cond()``'s first truthy value, polled every ``step`` s; after ``timeout`` s,
    ``error`` naming ``what`` (a callable: asked then, to say what it saw)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise error(f"timed out after {timeout:g} s waiting for "
                f"{what() if callable(what) else what}")
