"""`qkdctl bench chaos`: faults injected at random into the running triangle while SAEs
pull keys, for operators checking a deployment.

The triangle A, B, C at a real key rate (100 Mb/s per link), the key API at A and C (two
workers each). SAE-A takes keys at A for SAE-C without pause; SAE-C fetches each of them
at C. Meanwhile, one after another, ``injections`` faults, each of a kind drawn at random:
- ``kill -9`` of a module process at a random node: the key API's manager (``api``) or
  one of its workers (``api-worker``), the global key manager, a local key manager, a
  tunnel manager or one of its OTP workers, the router, the metrics endpoint;
- ``stall``: SIGSTOP of a random module process for 2-4 s, then SIGCONT;
- ``cut``: one link's underlay down for 2-4 s, then up.
After each, the bench waits until keys flow again end to end (a key obtained at A after
the fault, fetched at C) and records how long that took, from the kill, or from the end
of a stall or cut; then, after a pause of up to half a second, the next fault.

A ledger (:mod:`bench.ledger`) holds every key ID and its digest on both sides. A fetch
whose answer is lost (the connection died) is tried again; a 503 is tried again; a 400 is
final. At the end every key not yet fetched is asked for once more.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import multiprocessing as mp
import os
import queue
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console

from bench.harness import BenchError, Net
from bench.ledger import Ledger
from bench.topology import line, saes, template
from control.core import paths
from control.core.statefile import read_status
from control.tools import emulation

KINDS = ("api-worker", "api", "gkm", "lkm", "tunnel", "otp-worker", "router", "metrics",
         "stall", "cut")
FLOOR = {"injections": 1000, "max_recovery_s": 10.0}
RECOVERY_LIMIT_S = 60.0
KEYS_PER_TAKE = 4
IN_FLIGHT = 8  # takes whose keys the slave has not settled yet (fetched, or refused)
TEMPLATE = """
[network]
name = "bench-chaos"
prefix = "{prefix}"
[defaults]
key_rate_mbps = {rate}
[gkm]
pairs = [["A", "C"]]
[api]
workers = 2
""" + template(saes(("SAE-A", "A"), ("SAE-C", "C")), line("ABC", 210, closed=True))

_ctx = mp.get_context("fork")


# ---- the SAEs, each a process in its node's namespace ---------------------------------------

def _enter(ns: str) -> None:
    from pyroute2 import netns

    netns.setns(ns)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _digest(key_b64: str) -> str:
    return hashlib.sha256(base64.b64decode(key_b64)).hexdigest()


def _master(ns: str, pki: str, host: str, port: int, stop, credit, events) -> None:
    """SAE-A: enc_keys back to back, at most IN_FLIGHT takes ahead of the slave's
    fetches; every answer's keys (ID, digest) as an event."""
    import orjson

    from api.client import client_context, reuse_or_open

    _enter(ns)
    ctx, conn = client_context(pki, "SAE-A"), None
    body = orjson.dumps({"number": KEYS_PER_TAKE, "size": 256})
    while not stop.is_set():
        if not credit.acquire(timeout=0.2):
            continue
        try:
            conn = reuse_or_open(conn, host, port, ctx)
            status, data = conn.request("POST", "/api/v1/keys/SAE-C/enc_keys", body)
            now = time.monotonic()
            if status != 200:
                credit.release()
            if status == 200:
                events.put(("obtained", now, [(k["key_ID"], _digest(k["key"]))
                                              for k in orjson.loads(data)["keys"]]))
            else:
                events.put(("take_refused", now, status))
                time.sleep(0.1)
        except Exception as e:  # the KME restarted, the route moved: connect again
            credit.release()
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
            events.put(("take_error", time.monotonic(), f"{type(e).__name__}: {e}"[:120]))
            time.sleep(0.1)


def _slave(ns: str, pki: str, host: str, port: int, todo, events) -> None:
    """SAE-C: dec_keys for each batch of key IDs it is given; each outcome an event."""
    import orjson

    from api.client import client_context, reuse_or_open

    _enter(ns)
    ctx, conn = client_context(pki, "SAE-C"), None
    while True:
        ids = todo.get()
        if ids is None:
            return
        body = orjson.dumps({"key_IDs": [{"key_ID": k} for k in ids]})
        try:
            conn = reuse_or_open(conn, host, port, ctx)
            status, data = conn.request("POST", "/api/v1/keys/SAE-A/dec_keys", body)
        except Exception as e:
            with contextlib.suppress(Exception):
                conn.close()
            conn = None
            events.put(("lost", time.monotonic(), ids, f"{type(e).__name__}: {e}"[:120]))
            continue
        now = time.monotonic()
        if status == 200:
            events.put(("delivered", now, [(k["key_ID"], _digest(k["key"]))
                                           for k in orjson.loads(data)["keys"]]))
        else:
            message = orjson.loads(data).get("message", "") if data else ""
            events.put(("fetch_refused", now, ids, status, str(message)[:160]))


# ---- bookkeeping in the bench process ---------------------------------------------------------

@dataclass
class Flow:
    """What the events say, kept by one thread of the bench."""
    ledger: Ledger = field(default_factory=Ledger)
    obtained_at: dict[str, float] = field(default_factory=dict)
    flows: list[tuple[float, float]] = field(default_factory=list)  # (obtained, fetched)
    errors: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def flowing_since(self, t0: float) -> float | None:
        """When a key obtained at or after ``t0`` was first fetched (None: not yet)."""
        with self.lock:
            times = [f for o, f in self.flows if o >= t0]
        return min(times) if times else None


def _consume(events, todo, credit, flow: Flow, done: threading.Event) -> None:
    retry: list[tuple[float, list[str]]] = []
    while not (done.is_set() and events.empty()):
        now = time.monotonic()
        for _, ids in [r for r in retry if r[0] <= now]:
            todo.put(ids)
        retry = [r for r in retry if r[0] > now]
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            continue
        kind, t = ev[0], ev[1]
        with flow.lock:
            if kind == "obtained":
                flow.ledger.obtain(ev[2])
                for kid, _ in ev[2]:
                    flow.obtained_at[kid] = t
                todo.put([kid for kid, _ in ev[2]])
            elif kind == "delivered":
                credit.release()
                flow.ledger.deliver(ev[2])
                for kid, _ in ev[2]:
                    flow.flows.append((flow.obtained_at.get(kid, 0.0), t))
            elif kind == "lost":
                flow.ledger.answer_lost(ev[2])
                flow.errors["fetch_lost"] = flow.errors.get("fetch_lost", 0) + 1
                retry.append((t + 0.5, ev[2]))
            elif kind == "fetch_refused":
                status, message = ev[3], ev[4]
                key = f"{status} {message.split(':')[0][:60]}"
                flow.refusals[key] = flow.refusals.get(key, 0) + 1
                if status == 503:  # busy, not confirmed yet, the path moving: again
                    retry.append((t + 0.5, ev[2]))
                else:
                    credit.release()
            else:
                flow.errors[kind] = flow.errors.get(kind, 0) + 1


# ---- the network and its faults -----------------------------------------------------------------

class ChaosNet(Net):
    TEMPLATE = TEMPLATE
    TAG = "bx"

    def modules(self, node: str) -> dict[str, int]:
        st = read_status(paths.node_dir(self.prefix, node) / "state.json") or {}
        return {m["name"]: m["pid"] for m in st.get("modules", [])
                if m.get("alive") and isinstance(m.get("pid"), int)}

    def children(self, node: str, status_file: str, key: str) -> list[int]:
        st = read_status(paths.node_dir(self.prefix, node) / status_file) or {}
        return [w["pid"] for w in st.get(key, []) if isinstance(w, dict)
                and w.get("alive") and isinstance(w.get("pid"), int)]

    def target(self, kind: str, rng: random.Random) -> tuple[str, int] | None:
        """(what, pid) for a kill or a stall of ``kind``; None if none runs just now."""
        nodes = list(self.topo.nodes)
        if kind in ("api", "api-worker"):
            nodes = [s.node for s in self.topo.saes]
        node = rng.choice(nodes)
        mods = self.modules(node)
        links = [lk.name for lk in self.topo.links_of(node)]
        if kind == "api-worker":
            pids = self.children(node, "api.json", "slots")
            return (f"{node} api worker", rng.choice(pids)) if pids else None
        if kind == "otp-worker":
            link = rng.choice(links)
            pids = self.children(node, f"tun-{link}.json", "workers")
            return (f"{node} OTP worker of {link}", rng.choice(pids)) if pids else None
        if kind in ("lkm", "tunnel"):
            name = f"{kind}:{rng.choice(links)}"
        elif kind == "stall":
            name = rng.choice(sorted(mods)) if mods else ""
        else:
            name = kind
        return (f"{node} {name}", mods[name]) if name in mods else None

    def set_underlay(self, link: str, up: bool) -> None:
        """Link ``link``'s underlay interface at its first end down or up (ip(8): pyroute2's
        namespace helper now and then found no interface here)."""
        lk = self.topo.link(link)
        cmd = ["ip", "-n", self.ns(lk.a), "link", "set", emulation.underlay_ifname(lk.index),
               "up" if up else "down"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode:
            raise BenchError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def cut(self, link: str, seconds: float) -> None:
        """Link ``link``'s underlay down for ``seconds``, then up."""
        self.set_underlay(link, False)
        try:
            time.sleep(seconds)
        finally:
            self.set_underlay(link, True)


def _inject(net: ChaosNet, kind: str, rng: random.Random) -> tuple[str, float] | None:
    """One fault; (what, when it ended) or None if its target was not running."""
    if kind == "cut":
        link = rng.choice(net.topo.links).name
        net.cut(link, rng.uniform(2.0, 4.0))
        return f"cut {link}", time.monotonic()
    target = net.target(kind, rng)
    if target is None:
        return None
    what, pid = target
    try:
        if kind == "stall":
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(rng.uniform(2.0, 4.0))
            finally:
                os.kill(pid, signal.SIGCONT)
            return f"stall {what}", time.monotonic()
        os.kill(pid, signal.SIGKILL)
        return f"kill -9 {what}", time.monotonic()
    except ProcessLookupError:
        return None


def run(injections: int = 1000, rate: float = 100.0, seed: int = 1,
        console: Console | None = None, kinds: tuple[str, ...] = KINDS) -> dict:
    console = console or Console(stderr=True)
    if injections < 1:
        raise BenchError("--injections must be at least 1")
    rng = random.Random(seed)
    net = ChaosNet(console, rate=rate)
    flow = Flow()
    events, todo = _ctx.Queue(), _ctx.Queue()
    stop, done, credit = _ctx.Event(), threading.Event(), _ctx.Semaphore(IN_FLIGHT)
    procs: list = []
    counts: dict[str, int] = {}
    recoveries: list[float] = []
    slow: list[str] = []
    consumer = threading.Thread(target=_consume, args=(events, todo, credit, flow, done),
                                daemon=True)
    try:
        console.print(f"chaos: {injections} faults into the triangle at {rate:g} Mb/s "
                      f"(seed {seed}) while SAE-A takes keys at A and SAE-C fetches them at C")
        net.up()
        pki, port = str(net.topo.api.pki), net.topo.ports.api
        procs = [_ctx.Process(target=_master, daemon=True,
                              args=(net.ns("A"), pki, net.addr("A"), port, stop, credit,
                                    events)),
                 _ctx.Process(target=_slave, daemon=True,
                              args=(net.ns("C"), pki, net.addr("C"), port, todo, events))]
        for p in procs:
            p.start()
        consumer.start()
        t_start = time.monotonic()
        while flow.flowing_since(t_start) is None:
            if time.monotonic() > t_start + 180:
                raise BenchError(f"no key flowed end to end within 180 s; logs in "
                                 f"{paths.log_dir(net.prefix)}")
            time.sleep(0.2)
        console.print(f"  keys flowing after {time.monotonic() - t_start:.1f} s")
        i = 0
        while i < injections:
            kind = rng.choice(kinds)
            t0 = time.monotonic()
            fault = _inject(net, kind, rng)
            if fault is None:
                time.sleep(0.2)
                continue
            what, ended = fault
            counts[kind] = counts.get(kind, 0) + 1
            i += 1
            start = t0 if what.startswith("kill") else ended
            while (back := flow.flowing_since(ended)) is None:
                if time.monotonic() - ended > RECOVERY_LIMIT_S:
                    break
                time.sleep(0.05)
            took = (back - start) if back is not None else float("inf")
            recoveries.append(took)
            if took > FLOOR["max_recovery_s"]:
                slow.append(f"{what}: {took:.1f} s")
            if i % 10 == 0 or took > FLOOR["max_recovery_s"]:
                with flow.lock:
                    rep = flow.ledger.report()
                console.print(f"  {i:5d}/{injections}  {what:<32} keys flowing again in "
                              f"{took:5.1f} s  (obtained {rep['keys_obtained']}, fetched "
                              f"{rep['keys_delivered']}, orphans so far "
                              f"{rep['orphans']})", highlight=False)
            time.sleep(rng.uniform(0.0, 0.5))
        stop.set()
        # The last keys: every one not fetched yet is asked for once more.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with flow.lock:
                missing = flow.ledger.undelivered()
            if not missing:
                break
            time.sleep(1.0)
        with flow.lock:
            missing = flow.ledger.undelivered()
        for at in range(0, len(missing), 32):
            todo.put(missing[at:at + 32])
        time.sleep(3.0)
        logs = paths.log_dir(net.prefix)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            todo.put(None)
        done.set()
        if consumer.is_alive():
            consumer.join(10)
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
                p.join(2)
        net.down()
    with flow.lock:
        rep = flow.ledger.report()
    finite = sorted(r for r in recoveries if r != float("inf"))
    out = {
        "bench": "chaos", "injections": sum(counts.values()), "by_kind": counts,
        "kinds_drawn": list(kinds),
        "seed": seed, "key_rate_mbps": rate, **rep,
        "max_recovery_s": round(max(recoveries), 2) if recoveries else None,
        "median_recovery_s": round(finite[len(finite) // 2], 2) if finite else None,
        "not_recovered": sum(1 for r in recoveries if r == float("inf")),
        "slow_recoveries": slow[:20],
        "fetch_refusals": flow.refusals, "errors": flow.errors,
        "floor": FLOOR, "logs": str(logs),
    }
    if out["max_recovery_s"] == float("inf"):
        out["max_recovery_s"] = None
    out["meets_floor"] = (out["injections"] >= FLOOR["injections"] and set(kinds) == set(KINDS)
                          and rep["mismatched"] == rep["duplicated"] == rep["reused"]
                          == rep["orphans"] == 0 and not out["not_recovered"]
                          and (out["max_recovery_s"] or 0) <= FLOOR["max_recovery_s"])
    return out


def report(r: dict, console: Console) -> None:
    console.print(
        f"chaos: {r['injections']} faults {r['by_kind']}\n"
        f"  keys obtained {r['keys_obtained']:,}, fetched {r['keys_delivered']:,}; "
        f"mismatched {r['mismatched']}, duplicated {r['duplicated']}, reused {r['reused']}, "
        f"orphans {r['orphans']} (of which answers lost with their connection: "
        f"{r['lost_answers']})\n"
        f"  keys flowing again after each fault: median {r['median_recovery_s']} s, at most "
        f"{r['max_recovery_s']} s; not within {RECOVERY_LIMIT_S:.0f} s: {r['not_recovered']}\n"
        f"  fetches refused: {r['fetch_refusals'] or 'none'}; errors: {r['errors'] or 'none'}\n"
        f"  {'[green]meets[/green]' if r['meets_floor'] else '[red]misses[/red]'} the floor "
        f"(>= {FLOOR['injections']} faults, nothing mismatched, duplicated, reused or "
        f"orphaned, keys flowing within {FLOOR['max_recovery_s']:g} s of each)",
        highlight=False)
    for s in r["slow_recoveries"]:
        console.print(f"  slow: {s}", highlight=False)
