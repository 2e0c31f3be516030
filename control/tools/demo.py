"""`qkdctl demo`: the paper's three nodes, every module running, and a link cut.

1. Up: namespaces, veth underlay, a 1 Gb/s emulated QKD link between each pair, and every
   node's modules; local key reaches every ring, global key every pair's stores.
2. Keys: an SAE at one node asks its key API (ETSI GS QKD 014, HTTPS with mutual TLS) for
   keys shared with an SAE at another node, which fetches the same keys from its own node
   (and is refused a second time: one delivery per key).
3. Traffic: a paced TCP stream runs through the OTP tunnels between those two nodes.
4. Cut: the direct link's underlay goes down. Routes move to the third node; the stream
   goes on through it; the first SAE takes enough key to empty its store below the low
   watermark, so global key is restocked through the third node, and the second SAE
   fetches the same keys.
5. Restore: the link comes back and routes return to it.
6. The stream ends; both ends compare its length and SHA-256. Summary, teardown, and a
   check that nothing is left.

:class:`DemoReport` holds what the demo claims; its ``problems()`` is what the exit status
and the test suite check.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from control.core import paths
from control.core.config import Sae, Topology
from control.node.status import collect, render
from control.tools import emulation
from control.tools.demo_stream import PacedStream, StreamResult

STREAM_PORT = 5301
DONE_WAIT_S = 15.0  # a phase waits at most this long (or 3 phases) for what it shows


class _Stop(Exception):
    """A claim failed early: skip to teardown and the summary."""


# ---- what the demo claims -----------------------------------------------------------------

@dataclass
class Phase:
    name: str
    route: str          # the first link of the route src -> dst during the phase
    seconds: float
    stream_bytes: int
    relayed_bytes: int  # global key src -> dst acknowledged during the phase


@dataclass
class KeyCheck:
    """Keys one SAE took and the other fetched: counts and digests, never the key."""

    keys: int = 0
    nbytes: int = 0
    identical: bool = False
    refused_again: bool | None = None  # None: not tried


@dataclass
class DemoReport:
    src: str = ""
    dst: str = ""
    via: str = ""
    direct_link: str = ""
    detour_link: str = ""
    key_flow_ok: bool = False
    global_key_ok: bool = False
    keys_direct: KeyCheck = field(default_factory=KeyCheck)
    keys_detour: KeyCheck = field(default_factory=KeyCheck)
    restocked_during_cut: int = 0
    stream_on_detour: int = 0  # bytes received after the reroute, before the restore
    reroute_s: float | None = None
    restore_s: float | None = None
    phases: list[Phase] = field(default_factory=list)
    stream: StreamResult | None = None
    leftovers: list[str] = field(default_factory=list)
    error: str = ""

    def problems(self) -> list[str]:
        """Every claim that did not hold; empty when the demo showed what it says."""
        out = []
        if self.error:
            out.append(self.error)
        if not self.key_flow_ok:
            out.append("local key did not reach every ring")
        if not self.global_key_ok:
            out.append("some node pairs hold no global key")
        if out:  # the later claims were never tried
            return out + (["left behind: " + ", ".join(self.leftovers)] if self.leftovers
                          else [])
        for name, k in (("before the cut", self.keys_direct), ("during the cut",
                                                                self.keys_detour)):
            if not (k.keys and k.identical):
                out.append(f"keys {name}: the two SAEs did not get identical keys")
        if self.keys_direct.refused_again is not True:
            out.append("a second fetch of the same keys was not refused")
        if self.reroute_s is None:
            out.append(f"routes did not move to {self.detour_link} when {self.direct_link} "
                       "was cut")
        if self.restore_s is None:
            out.append(f"routes did not return to {self.direct_link}")
        if self.restocked_during_cut <= 0:
            out.append(f"no global key was relayed through {self.via} during the cut")
        cut = next((p for p in self.phases if p.name == "cut"), None)
        if cut is None or self.stream_on_detour <= 0:
            out.append(f"the stream carried nothing over {self.via} during the cut")
        elif cut.route != self.detour_link:
            out.append(f"the route during the cut was {cut.route}, not {self.detour_link}")
        if self.stream is None or not self.stream.intact:
            err = self.stream.error if self.stream else "not run"
            out.append(f"the TCP stream did not arrive intact ({err})")
        if self.leftovers:
            out.append("left behind: " + ", ".join(self.leftovers))
        return out


def num(x: float) -> str:
    """A figure with as many decimals as a small one needs (0.4, 3.1, 120)."""
    return f"{x:,.0f}" if abs(x) >= 10 else f"{x:.1f}" if abs(x) >= 0.1 else f"{x:.2f}"


# ---- the network at another key rate ------------------------------------------------------

SIZE_KEYS = {"defaults": ("block_size", "ring_capacity"),
             "dataplane": ("chunk_size",),
             "gkm": ("block_size", "low_watermark", "high_watermark", "window")}


def at_key_rate(path: Path, rate_mbps: float, out_dir: Path) -> Path:
    """A copy of the topology file ``path`` in ``out_dir`` with every link at
    ``rate_mbps`` and every size left to follow the rate (control.core.sizing)."""
    data = tomllib.loads(path.read_text())
    data.setdefault("defaults", {})["key_rate_mbps"] = rate_mbps
    for section, keys in SIZE_KEYS.items():
        for k in keys:
            data.get(section, {}).pop(k, None)
    for lk in data.get("links", []):
        for k in ("key_rate_mbps", "block_size", "ring_capacity"):
            lk.pop(k, None)
    out = out_dir / path.name
    out.write_text(f"# {path} with every link at {rate_mbps:g} Mb/s, sizes from the rate\n"
                   + tomli_w.dumps(data))
    return out


def stream_rate_for(rate_mbps: float) -> float:
    """The demo stream's default rate on links of ``rate_mbps``: a fifth of a link. The
    global key fill, paced at 90 % of its path's key, competes with it for the rest
    (docs/design.md, "The demo"): at 1 Gb/s the stores are full before the stream starts."""
    return max(0.1, rate_mbps / 5)


# ---- reading the network's state ------------------------------------------------------------

def _route(snap: dict, node: str, dest: str) -> str:
    r = (snap["nodes"][node].get("router") or {}).get("routes", {}).get(dest) or {}
    return r.get("via") or "-"


def _relay(snap: dict, origin: str, dest: str) -> dict:
    g = snap["nodes"][origin].get("gkm") or {}
    return (g.get("peers", {}).get(dest) or {}).get("relay") or {}


def _usable(snap: dict, origin: str, dest: str) -> int:
    g = snap["nodes"][origin].get("gkm") or {}
    enc = (g.get("peers", {}).get(dest) or {}).get("enc") or {}
    return enc.get("usable", 0)


def key_in_every_ring(snap: dict) -> bool:
    return all(st and st["agreement"]["synced"] and st["key"]["bytes_stored_ab"] > 0
               and st["key"]["bytes_stored_ba"] > 0
               for n in snap["nodes"].values() for st in n["links"].values())


def wait_for_key(topo: Topology, timeout: float) -> bool:
    """True once every link end has agreed and stored key in both directions."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if key_in_every_ring(collect(topo)):
            return True
        time.sleep(0.2)
    return False


# ---- the key API, from inside the SAEs' namespaces ----------------------------------------

def _kme(pki: str, sae: str, host: str, port: int):
    from api.client import KmeClient, client_context

    return KmeClient(f"https://{host}:{port}", client_context(pki, sae))


def _take_keys(pki: str, sae: str, host: str, port: int, slave: str, nbytes: int,
               key_bytes: int) -> dict:
    """enc_keys until ``nbytes`` are taken: the key IDs and the keys' digest."""
    c = _kme(pki, sae, host, port)
    ids, h, taken = [], hashlib.sha256(), 0
    try:
        while taken < nbytes:
            n = max(1, min(8, -(-(nbytes - taken) // key_bytes)))
            for kid, key in c.enc_keys(slave, n, key_bytes * 8):
                ids.append(kid)
                h.update(key)
                taken += len(key)
    finally:
        c.close()
    return {"ids": ids, "sha256": h.hexdigest(), "bytes": taken}


def _fetch_keys(pki: str, sae: str, host: str, port: int, master: str,
                ids: list[str], key_bytes: int) -> dict:
    """dec_keys for ``ids`` in order: their digest; then one ID again (must be refused)."""
    from api import etsi

    c = _kme(pki, sae, host, port)
    h, got = hashlib.sha256(), 0
    try:
        for i in range(0, len(ids), 8):
            for key in c.dec_keys(master, tuple(ids[i:i + 8]), key_bytes * 8):
                h.update(key)
                got += 1
        again, _ = c.call(etsi.dec_keys_call(master, ids[:1], post=False))
    finally:
        c.close()
    return {"keys": got, "sha256": h.hexdigest(), "again": again}


def _status(pki: str, sae: str, host: str, port: int, slave: str) -> int:
    from api import etsi

    c = _kme(pki, sae, host, port)
    try:
        return c.call(etsi.status_call(slave))[0]
    finally:
        c.close()


class Saes:
    """Calls the key API as two SAEs, each from its own node's namespace."""

    def __init__(self, topo: Topology, master: Sae, slave: Sae):
        self.topo, self.master, self.slave = topo, master, slave
        self.pki, self.port = str(topo.api.pki), topo.ports.api

    def _in(self, sae: Sae, fn, *args, timeout: float = 60.0):
        from api.client import run_in_netns

        host = str(self.topo.node(sae.node).address)
        r = run_in_netns(paths.netns_name(self.topo.prefix, sae.node),
                         [(fn, (self.pki, sae.id, host, self.port, *args))], timeout)[0]
        if isinstance(r, str):
            raise RuntimeError(f"{sae.id}: {r}")
        return r

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._in(self.master, _status, self.slave.id, timeout=10) == 200:
                    return True
            except RuntimeError:
                pass
            time.sleep(0.5)
        return False

    def exchange(self, nbytes: int, key_bytes: int) -> KeyCheck:
        took = self._in(self.master, _take_keys, self.slave.id, nbytes, key_bytes)
        got = self._in(self.slave, _fetch_keys, self.master.id, took["ids"], key_bytes)
        return KeyCheck(keys=len(took["ids"]), nbytes=took["bytes"],
                        identical=got["keys"] == len(took["ids"])
                        and got["sha256"] == took["sha256"],
                        refused_again=got["again"] == 400)


# ---- the demo -------------------------------------------------------------------------------

class Watch:
    """Live view of the stream, the route and the global key relay between two nodes."""

    def __init__(self, topo: Topology, console: Console, src: str, dst: str):
        self.topo, self.console, self.src, self.dst = topo, console, src, dst
        self.stream: PacedStream | None = None
        self._mark = (time.monotonic(), 0)
        self.rate_mbps = 0.0

    def snap(self) -> dict:
        return collect(self.topo)

    def received(self) -> int:
        return self.stream.received.value if self.stream else 0

    def _view(self, phase: str, snap: dict) -> Table:
        now, got = time.monotonic(), self.received()
        t0, b0 = self._mark
        if now - t0 >= 0.5:
            self.rate_mbps = (got - b0) * 8 / (now - t0) / 1e6
            self._mark = (now, got)
        relay = _relay(snap, self.src, self.dst)
        t = Table(box=None, pad_edge=False, show_header=True)
        for col in ("phase", f"route {self.src}->{self.dst}", "TCP stream",
                    f"global key {self.src}->{self.dst}", "stored"):
            t.add_column(col)
        t.add_row(phase, _route(snap, self.src, self.dst),
                  f"{num(self.rate_mbps)} Mb/s, {num(got / 1e6)} MB",
                  f"{num(relay.get('acked_bytes', 0) / (1 << 20))} MiB relayed, "
                  f"{num(relay.get('rate_bps', 0) / 1e6)} Mb/s",
                  f"{num(_usable(snap, self.src, self.dst) / (1 << 20))} MiB")
        return t

    def until(self, phase: str, seconds: float, done=None) -> tuple[bool, dict]:
        """Show the live view until ``done(snap)`` holds (True) or ``seconds`` pass."""
        end = time.monotonic() + seconds
        snap = self.snap()
        with Live(self._view(phase, snap), console=self.console, refresh_per_second=4,
                  transient=True) as live:
            while True:
                if done is not None and done(snap):
                    return True, snap
                if time.monotonic() >= end:
                    return done is None, snap
                time.sleep(0.25)
                snap = self.snap()
                live.update(self._view(phase, snap))


def _pick_saes(topo: Topology) -> tuple[Sae, Sae]:
    for m in topo.saes:
        for s in topo.saes:
            if m.node != s.node and topo.link_between(m.node, s.node) is not None:
                return m, s
    raise ValueError("the demo needs two SAEs on nodes joined by a direct link "
                     "(examples/triangle.toml has SAE-A at A and SAE-C at C)")


def run_demo(topo: Topology, console: Console, phase_s: float = 8.0,
             rate_mbps: float = 200.0) -> tuple[int, DemoReport]:
    """Run the whole demo; its exit status (0 when every claim held) and what it saw."""
    rep = DemoReport()
    master, slave = _pick_saes(topo)
    src, dst = master.node, slave.node
    direct = topo.link_between(src, dst)
    assert direct is not None
    via = next((n for n in topo.nodes if n not in (src, dst)
                and topo.link_between(src, n) and topo.link_between(n, dst)), None)
    if via is None:
        raise ValueError(f"the demo needs a third node linked to both {src} and {dst}")
    detour = topo.link_between(src, via)
    assert detour is not None
    rep.src, rep.dst, rep.via = src, dst, via
    rep.direct_link, rep.detour_link = direct.name, detour.name
    console.print(f"[bold]qkdnet demo[/bold]: network {topo.name!r}, {len(topo.nodes)} nodes "
                  f"in namespaces, {len(topo.links)} emulated QKD links")
    running = [k for k, alive in emulation.net_status(topo.prefix)["processes"].items()
               if alive]
    if running:  # someone's network, up and running: not the demo's to take down
        raise ValueError(f"network {topo.prefix!r} is running ({', '.join(running)}): take "
                         f"it down first ('qkdctl net down --prefix {topo.prefix}') or give "
                         f"the demo another topology")
    emulation.net_down(topo.prefix)  # a previous run that crashed leaves nothing behind
    stream: PacedStream | None = None
    t_start = time.monotonic()
    try:
        emulation.net_up(topo)
        console.print("1. namespaces, veth underlay, link emulators and nodes started")
        watch = Watch(topo, console, src, dst)
        rep.key_flow_ok, _ = watch.until("local key", 30, key_in_every_ring)
        if not rep.key_flow_ok:
            console.print(render(collect(topo)))
            raise _Stop
        pairs = topo.gkm.pairs
        rep.global_key_ok, snap = watch.until(
            "global key", 40, lambda s: all(_usable(s, o, d) > 0 for o, d in pairs))
        console.print(render(snap))
        if not rep.global_key_ok:
            raise _Stop
        console.print(f"   local key in every ring; global key in all {len(pairs)} ordered "
                      "pairs of nodes")

        saes = Saes(topo, master, slave)
        if not saes.wait_ready(30):
            rep.error = f"key API at {src} not answering"
            raise _Stop
        rep.keys_direct = saes.exchange(64, 32)
        k = rep.keys_direct
        console.print(f"2. key API (ETSI GS QKD 014, mutual TLS): {master.id} at {src} took "
                      f"{k.keys} keys of 256 bits for {slave.id}; {slave.id} fetched them at "
                      f"{dst}: {'identical' if k.identical else '[red]DIFFERENT[/red]'}; "
                      f"fetching again: {'refused' if k.refused_again else '[red]served[/red]'}")

        na, nd = paths.netns_name(topo.prefix, src), paths.netns_name(topo.prefix, dst)
        stream = PacedStream(na, str(topo.node(src).address), nd, str(topo.node(dst).address),
                             STREAM_PORT, rate_mbps * 1e6)
        watch.stream = stream
        console.print(f"3. TCP stream {src} -> {dst} through the OTP tunnels, paced at "
                      f"{num(rate_mbps)} Mb/s")
        snap = _phase(rep, watch, "direct", _mark(watch), phase_s)

        low = topo.gkm.low_watermark
        ifname = emulation.underlay_ifname(direct.index)
        cut_mark = _mark(watch, snap)
        t0, relayed0 = cut_mark[0], cut_mark[2]
        _set_link(na, ifname, up=False)
        console.print(f"4. cut: link {direct.name} ({ifname} at {src}) is down")
        ok, snap = watch.until("rerouting", 15, lambda s: _route(s, src, dst) == detour.name
                               and _route(s, dst, src) != direct.name)
        rep.reroute_s = time.monotonic() - t0 if ok else None
        on_detour = watch.received()  # from here on, the stream can only go through via
        if ok:
            console.print(f"   routes moved to {via} after {rep.reroute_s:.1f} s")
        take = max(_usable(snap, src, dst) - low + topo.gkm.block_size, topo.gkm.block_size)
        key_bytes = min(topo.api.max_key_size // 8, topo.gkm.block_size)
        rep.keys_detour = saes.exchange(take, key_bytes)
        k = rep.keys_detour
        console.print(f"   {master.id} took {num(k.nbytes / (1 << 20))} MiB of key ({k.keys} "
                      f"keys), below the low watermark; {slave.id} fetched them: "
                      f"{'identical' if k.identical else '[red]DIFFERENT[/red]'}; "
                      f"the store refills through {via}")
        # The phase lasts until what was taken is restocked through via (or the store is
        # back at the low watermark: on slow links a store may still be filling at the
        # cut) and the stream has resumed through via (TCP's retransmission backoff may
        # take a few seconds).
        taken = rep.keys_detour.nbytes

        def restocked(s: dict) -> bool:
            relayed = _relay(s, src, dst).get("acked_bytes", 0) - relayed0
            return relayed > 0 and (_usable(s, src, dst) >= low or relayed >= taken) \
                and watch.received() > on_detour

        snap = _phase(rep, watch, "cut", cut_mark, phase_s, restocked)
        rep.restocked_during_cut = rep.phases[-1].relayed_bytes
        rep.stream_on_detour = watch.received() - on_detour if ok else 0

        back_mark = _mark(watch, snap)
        t0 = back_mark[0]
        _set_link(na, ifname, up=True)
        console.print(f"5. restore: link {direct.name} is up again")
        ok, _ = watch.until("restoring", 20, lambda s: _route(s, src, dst) == direct.name
                            and _route(s, dst, src) == direct.name)
        rep.restore_s = time.monotonic() - t0 if ok else None
        if ok:
            console.print(f"   routes back on {direct.name} after {rep.restore_s:.1f} s")
        _phase(rep, watch, "restored", back_mark, phase_s / 2)
        rep.stream = stream.finish()
        stream = None
        s = rep.stream
        console.print(f"6. stream ended: {num(s.sent / 1e6)} MB sent, {num(s.received / 1e6)} "
                      f"MB received, " + ("identical (length and SHA-256)" if s.intact
                                          else f"[red]NOT intact[/red] {s.error}"))
    except _Stop:
        pass
    except Exception as e:  # noqa: BLE001 - reported in the summary, teardown still runs
        rep.error = f"{type(e).__name__}: {e}"
    finally:
        if stream is not None:
            stream.kill()
        removed = emulation.net_down(topo.prefix)
        rep.leftovers = emulation.leftovers(topo.prefix)
        console.print(f"teardown: removed {len(removed)} objects"
                      + ("; nothing left behind" if not rep.leftovers else
                         f"; [red]left: {', '.join(rep.leftovers)}[/red]"))
    return _end(rep, console, t_start)


def _mark(watch: Watch, snap: dict | None = None) -> tuple[float, int, int]:
    """Where a phase starts: time, stream bytes received, global key relayed (from
    ``snap``, a snapshot just taken, or a new one)."""
    snap = snap if snap is not None else watch.snap()
    return (time.monotonic(), watch.received(),
            _relay(snap, watch.src, watch.dst).get("acked_bytes", 0))


def _phase(rep: DemoReport, watch: Watch, name: str, since: tuple[float, int, int],
           seconds: float, done=None) -> dict:
    """Run one phase (begun at mark ``since``) at least ``seconds``, and until ``done``;
    the network's snapshot at its end."""
    _, snap = watch.until(name, max(0.0, since[0] + seconds - time.monotonic()))
    if done is not None:
        _, snap = watch.until(name, max(3 * seconds, DONE_WAIT_S), done)
    t0, b0, r0 = since
    rep.phases.append(Phase(
        name=name, route=_route(snap, watch.src, watch.dst), seconds=time.monotonic() - t0,
        stream_bytes=watch.received() - b0,
        relayed_bytes=_relay(snap, watch.src, watch.dst).get("acked_bytes", 0) - r0))
    return snap


def _set_link(ns: str, ifname: str, up: bool) -> None:
    import subprocess

    subprocess.run(["ip", "-n", ns, "link", "set", ifname, "up" if up else "down"],
                   check=True, capture_output=True)


def summary_table(rep: DemoReport) -> Table:
    t = Table(title="demo summary", title_justify="left")
    for col in ("phase", f"route {rep.src}->{rep.dst}", "seconds", "TCP stream",
                "global key relayed"):
        t.add_column(col, justify="right" if col != "phase" else "left")
    for p in rep.phases:
        t.add_row(p.name, p.route, f"{p.seconds:.1f}",
                  f"{num(p.stream_bytes * 8 / max(p.seconds, 1e-9) / 1e6)} Mb/s",
                  f"{num(p.relayed_bytes / (1 << 20))} MiB")
    return t


def _end(rep: DemoReport, console: Console, t_start: float) -> tuple[int, DemoReport]:
    if rep.phases:
        console.print(summary_table(rep))
    problems = rep.problems()
    took = time.monotonic() - t_start
    if problems:
        for p in problems:
            console.print(f"[red]FAILED[/red] {escape(p)}")
        return 1, rep
    console.print(f"[green]demo passed[/green] in {took:.0f} s: keys identical at both SAEs "
                  f"before and during the cut, the stream intact through the cut "
                  f"(rerouted in {rep.reroute_s:.1f} s, back in {rep.restore_s:.1f} s), "
                  f"{num(rep.restocked_during_cut / (1 << 20))} MiB of global key relayed "
                  f"through {rep.via}")
    return 0, rep


def report_json(rep: DemoReport) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(rep), default=str)

