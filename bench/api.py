"""`qkdctl bench api`: the key API (module 4), the paper's method: an application
emulator pulls keys as fast as it can until the store is empty, for several key sizes.

Two nodes, A - B, with the real node processes: A's key API (Sanic, HTTPS, mutual TLS)
serves master SAE-A, whose slave SAE-B is at B. For each key size A's global key manager
fills its store for B to a set amount and is paused; the emulators are paused too (so
the measurement is the API's cost, not QKD emulation's). Then:

- *conventional* (the baseline): one client, a new HTTPS connection with a full
  mutual-TLS handshake per request, one key per request, for a few seconds;
- *ours*: ``clients`` processes, each with one keep-alive connection, one key per
  request, until the KME answers 503 (the store is empty): keys/s and Mb/s over that
  time, every answer checked (JSON, base64, length);
- *dec_keys*: SAE-B pulls every key just handed out from B's KME, by key ID, one per
  request, on keep-alive connections; sampled keys are compared byte for byte.

Every enc_keys answer here includes the reservation round trip to B (invariant 5): the
key goes out only after B has stored who may fetch it.

Ceiling in the same run (``bench.bare_api``): the same ``clients`` pull for
``ceiling_s`` seconds from a bare Sanic HTTPS endpoint with mutual TLS (same TLS context,
same workers, same address) that answers a constant key container of the same size.
The targets compare requests/s (one key each) at 256-bit keys and bytes/s at 1 MiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import bare_api
from bench.api_load import Pull, pull_dec, pull_enc, run_in
from bench.ceiling import TARGETS, meets, verdict_line, vs
from bench.harness import BenchError, Net
from bench.plotting import figure, finish, log_axes, paper_table, save
from bench.runs import median_run
from bench.topology import line, template
from control.core import paths
from control.gkm.client import GkmClient
from control.gkm.manager import PAUSE_FLAG

PAPER = {"mbps_at_1MB": 971.0}
DEFAULT_SIZES = (256, 8 << 10, 8 << 16, 8 << 20)  # bits: 256 bit, 1 KiB, 64 KiB, 1 MiB
BLOCK = 1 << 20
TEMPLATE = """
[network]
name = "bench-api"
prefix = "{prefix}"
[defaults]
key_rate_mbps = 0
block_size = "1MiB"
ring_capacity = "{ring}"
[gkm]
block_size = "1MiB"
low_watermark = {low}
high_watermark = {high}
window = "16MiB"
pairs = [["A", "B"]]
[api]
workers = {workers}
max_connections_per_address = 0  # every client process calls from the same address
[[saes]]
id = "SAE-A"
node = "A"
[[saes]]
id = "SAE-B"
node = "B"
""" + template(line("AB", 206))


def size_name(bits: int) -> str:
    n = bits // 8
    if n >= 1 << 20:
        return f"{n >> 20} MiB"
    if n >= 1 << 10:
        return f"{n >> 10} KiB"
    return f"{bits} bit"


class ApiNet(Net):
    TEMPLATE = TEMPLATE
    TAG = "ba"

    def __init__(self, store_max: int, workers: int, ring: str, console: Console):
        super().__init__(console, ring=ring, low=store_max - BLOCK, high=store_max,
                         workers=workers)
        self.bare_port = self.topo.ports.api + 1  # the ceiling's endpoint, beside the KME

    def up(self) -> None:
        super().up(paused_gkm=self.topo.nodes)  # every key manager starts paused
        self.wait_api()

    def wait_api(self, timeout: float = 60.0) -> None:
        from api.client import Conn, client_context

        def probe(pki: str, host: str, port: int) -> Pull:
            c = Conn(host, port, client_context(pki, "SAE-A"))
            try:
                return Pull(stop_status=c.get("/api/v1/keys/SAE-B/status")[0])
            finally:
                c.close()

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = run_in(self.ns("A"), [(probe, (str(self.topo.api.pki), self.addr("A"),
                                               self.topo.ports.api))], 10)[0]
            if r.stop_status == 200:
                return
            time.sleep(0.5)
        raise BenchError(f"the key API at A did not answer within {timeout:.0f} s; logs in "
                         f"{paths.log_dir(self.prefix)}")

    def enc(self) -> dict:
        c = GkmClient(self.prefix, "A", timeout_s=60)
        try:
            return c.summary()["peers"]["B"]["enc"]
        finally:
            c.close()

    def served_ahead(self) -> int:
        """Keys A's key manager has served from keys reserved ahead of demand for B."""
        c = GkmClient(self.prefix, "A", timeout_s=60)
        try:
            return c.summary()["peers"]["B"].get("ahead", {}).get("served_keys", 0)
        finally:
            c.close()

    def served_from_hands(self) -> int:
        """Keys A's key API workers have handed out from their hands (keys taken ahead)."""
        try:
            doc = json.loads((paths.node_dir(self.prefix, "A") / "api.json").read_text())
        except (OSError, ValueError):
            return 0
        return (doc.get("hands") or {}).get("served_keys", 0)

    def stock(self, target: int, timeout: float = 180.0) -> int:
        """Fill A's store for B to exactly ``target`` bytes (a whole number of blocks):
        release A's key manager (and the emulators: the OTP tunnel carries the fill),
        pause both once there is enough, take any excess."""
        flag = paths.node_dir(self.prefix, "A") / PAUSE_FLAG
        if self.enc()["usable"] < target:
            deadline = time.monotonic() + timeout
            self.pause_key(False)
            flag.unlink(missing_ok=True)
            try:
                while self.enc()["usable"] < target:
                    if time.monotonic() > deadline:
                        raise BenchError(f"A's store for B not at {target >> 20} MiB after "
                                         f"{timeout:.0f} s; logs in "
                                         f"{paths.log_dir(self.prefix)}")
                    time.sleep(0.1)
            finally:
                flag.touch()
            time.sleep(1.0)  # the key manager looks at the flag every 0.5 s
            while self.enc()["pending"]:
                time.sleep(0.1)
            self.pause_key(True)
        self.settle()
        excess = self.enc()["usable"] - target
        if excess >= BLOCK:
            c = GkmClient(self.prefix, "A", timeout_s=60)
            try:
                c.take_enc("B", excess // BLOCK, BLOCK)
            finally:
                c.close()
        return self.enc()["usable"]

    def settle(self, timeout: float = 120.0) -> None:
        """Wait for RocksDB's flushes and compactions at both nodes (from the fill, or
        the last size's deletes) to end, so that they do not run during the pull."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = []
            for node in ("A", "B"):
                c = GkmClient(self.prefix, node, timeout_s=60)
                try:
                    db = c.summary()["db"]
                finally:
                    c.close()
                if db["running_compactions"] or db["running_flushes"] or \
                        db["pending_compaction_bytes"]:
                    busy.append(node)
            if not busy:
                return
            time.sleep(0.5)
        self.console.print(f"    (RocksDB still busy after {timeout:.0f} s; measuring anyway)")


def _rate(pulls: list[Pull]) -> tuple[int, int, float]:
    keys = sum(p.keys for p in pulls)
    nbytes = sum(p.bytes for p in pulls)
    t = max(p.ended for p in pulls) - min(p.started for p in pulls)
    return keys, nbytes, max(t, 1e-9)


def _errors(pulls: list[Pull], what: str) -> None:
    bad = [p.error for p in pulls if p.error]
    if bad:
        raise BenchError(f"{what}: {len(bad)} client(s) failed: {bad[0]}")


def pull_bare(net: ApiNet, bits: int, clients: int, seconds: float) -> tuple[int, int, float]:
    """keys, bytes and time of ``clients`` keep-alive pulls of the bare endpoint."""
    t0 = time.time() + 1.0
    pulls = run_in(net.ns("A"), [(pull_enc, (str(net.topo.api.pki), "SAE-A", net.addr("A"),
                                             net.bare_port, "SAE-B", bits, 1, t0,
                                             t0 + seconds, True))] * clients, seconds + 60)
    _errors(pulls, "bare endpoint pull")
    stopped = [p.stop_status for p in pulls if p.stop_status]
    if stopped:
        raise BenchError(f"the bare endpoint answered {stopped[0]}")
    return _rate(pulls)


def measure(net: ApiNet, bits: int, store: int, clients: int, baseline_s: float,
            console: Console, ceiling_s: float = 3.0) -> dict:
    pki, port = str(net.topo.api.pki), net.topo.ports.api
    stored = net.stock(store)
    # The baseline: a new mutual-TLS connection per request.
    t0 = time.time() + 0.5
    base = run_in(net.ns("A"), [(pull_enc, (pki, "SAE-A", net.addr("A"), port, "SAE-B", bits,
                                            1, t0, t0 + baseline_s, False))],
                  baseline_s + 60)
    _errors(base, "conventional pull")
    b_keys, b_bytes, b_t = _rate(base)
    stored_after_base = net.enc()["usable"]
    # Ours: keep-alive connections, pulled until the store is empty.
    ahead_before, hands_before = net.served_ahead(), net.served_from_hands()
    t0 = time.time() + 1.0
    pulls = run_in(net.ns("A"), [(pull_enc, (pki, "SAE-A", net.addr("A"), port, "SAE-B",
                                             bits, 1, t0, t0 + 600, True))] * clients, 660)
    _errors(pulls, "enc_keys pull")
    keys, nbytes, t = _rate(pulls)
    if not keys:  # every client refused at once: a figure of 0 would hide why
        raise BenchError(f"no key was handed out: the KME answered {pulls[0].stop_status} "
                         f"({pulls[0].stop_message}); logs in {paths.log_dir(net.prefix)}")
    not_503 = [p.stop_status for p in pulls if p.stop_status != 503]
    if not_503:
        raise BenchError(f"a client stopped on status {not_503[0]}, not 503 (store empty)")
    left = net.enc()["usable"]
    ahead = net.served_ahead() - ahead_before
    time.sleep(0.6)  # the API's manager publishes its workers' counts twice a second
    from_hands = net.served_from_hands() - hands_before
    ids = [k for p in pulls for k in p.key_ids]
    if len(set(ids)) != len(ids):
        raise BenchError("the same key ID was handed out twice")
    digests = {k: v for p in pulls for k, v in p.digests.items()}
    # dec_keys at B for every key handed out.
    share = [ids[i::clients] for i in range(clients)]
    t0 = time.time() + 1.0
    decs = run_in(net.ns("B"), [(pull_dec, (pki, "SAE-B", net.addr("B"), port, "SAE-A",
                                            part, bits, t0)) for part in share], 660)
    _errors(decs, "dec_keys pull")
    d_keys, d_bytes, d_t = _rate(decs)
    stopped = [p for p in decs if p.stop_status]
    if stopped:
        raise BenchError(f"dec_keys answered {stopped[0].stop_status}: "
                         f"{stopped[0].stop_message}")
    d_digests = {k: v for p in decs for k, v in p.digests.items()}
    mismatch = [k for k in digests.keys() & d_digests.keys() if digests[k] != d_digests[k]]
    if mismatch:
        raise BenchError(f"key {mismatch[0]}: the slave's bytes differ from the master's")
    c_keys, c_bytes, c_t = pull_bare(net, bits, clients, ceiling_s)
    point = {
        "bits": bits, "size": size_name(bits), "clients": clients, "stored_bytes": stored,
        "stored_after_baseline": stored_after_base, "left_bytes": left,
        "keys": keys, "seconds": t, "keys_per_s": keys / t, "gbps": nbytes * 8 / t / 1e9,
        "requests": sum(p.requests for p in pulls), "served_ahead_keys": ahead,
        "served_from_hands_keys": from_hands,
        "dec_keys": d_keys, "dec_seconds": d_t, "dec_keys_per_s": d_keys / d_t,
        "dec_gbps": d_bytes * 8 / d_t / 1e9,
        "compared_keys": len(digests.keys() & d_digests.keys()),
        "baseline_keys": b_keys, "baseline_seconds": b_t, "baseline_keys_per_s": b_keys / b_t,
        "baseline_gbps": b_bytes * 8 / b_t / 1e9,
        "ceiling_keys": c_keys, "ceiling_seconds": c_t, "ceiling_keys_per_s": c_keys / c_t,
        "ceiling_gbps": c_bytes * 8 / c_t / 1e9,
    }
    point["ratio_vs_baseline"] = point["keys_per_s"] / max(point["baseline_keys_per_s"], 1e-9)
    point["ratio_vs_ceiling"] = vs(point["keys_per_s"], point["ceiling_keys_per_s"])
    console.print(f"    {size_name(bits):>8}: {keys} keys in {t:.2f} s = "
                  f"{point['keys_per_s']:,.0f} keys/s, {point['gbps']:.2f} Gb/s "
                  f"({ahead} reserved ahead); dec_keys "
                  f"{point['dec_keys_per_s']:,.0f} keys/s; conventional "
                  f"{point['baseline_keys_per_s']:,.0f} keys/s "
                  f"(x{point['ratio_vs_baseline']:.1f}); bare endpoint "
                  f"{point['ceiling_keys_per_s']:,.0f} keys/s (ours x"
                  f"{point['ratio_vs_ceiling']:.2f}); {point['compared_keys']} keys compared "
                  f"with the slave's")
    return point


def run(sizes: tuple[int, ...] = DEFAULT_SIZES, keys: int = 32768,
        store_max: int = 2 << 30, clients: int = 32, workers: int = 1,
        baseline_s: float = 3.0, ring: str = "1GiB", repeat: int = 3,
        ceiling_s: float = 3.0, plot_path: Path | None = None,
        console: Console | None = None) -> dict:
    console = console or Console()
    for bits in sizes:
        if bits % 8 or not 8 <= bits <= 8 * BLOCK:
            raise BenchError(f"key size {bits} bits: must be a multiple of 8, at most "
                             f"{8 * BLOCK}")
    console.print(f"[bold]bench api[/bold]: A - B in namespaces, A's key API with {workers} "
                  f"Sanic worker(s), {clients} client process(es) with keep-alive HTTPS "
                  f"(mutual TLS), one key per request, pulling until the store is empty, "
                  f"median of {repeat} pull(s) per size; {os.cpu_count()} cores shared by all")
    net = ApiNet(store_max, workers, ring, console)
    points = []
    try:
        console.print("  bringing up ...")
        net.up()
        net.pause_key(True)
        with bare_api.endpoint(net.ns("A"), net.topo.api.pki, "A", net.addr("A"),
                               net.bare_port, workers, paths.log_dir(net.prefix) / "bare-api.log"):
            for bits in sizes:
                size = bits // 8
                store = min(store_max, max(BLOCK, -(-keys * size // BLOCK) * BLOCK))
                points.append(median_run([measure(net, bits, store, clients, baseline_s,
                                                  console, ceiling_s)
                                          for _ in range(repeat)], "keys_per_s"))
    finally:
        with contextlib.suppress(Exception):
            net.down()
    result = summarize(points, sizes, clients, workers, plot_path, console)
    result["repeat"] = repeat
    return result


def _at(points: list[dict], bits: int) -> dict | None:
    return next((p for p in points if p["bits"] == bits), None)


def summarize(points: list[dict], sizes: tuple[int, ...], clients: int, workers: int,
              plot_path: Path | None, console: Console) -> dict:
    t = Table(title="key API: pull until the store is empty (cf. the paper's Section IV.E)")
    for col in ("key size", "keys", "enc keys/s", "enc Gb/s", "dec keys/s", "dec Gb/s",
                "conventional keys/s", "ours / conventional", "bare endpoint keys/s",
                "ours / bare"):
        t.add_column(col, justify="right")
    for p in points:
        r = p.get("ratio_vs_ceiling")
        t.add_row(p["size"], f"{p['keys']:,}", f"{p['keys_per_s']:,.0f}", f"{p['gbps']:.3f}",
                  f"{p['dec_keys_per_s']:,.0f}", f"{p['dec_gbps']:.3f}",
                  f"{p['baseline_keys_per_s']:,.0f}", f"{p['ratio_vs_baseline']:.1f}",
                  f"{p['ceiling_keys_per_s']:,.0f}" if "ceiling_keys_per_s" in p else "-",
                  f"{r:.2f}" if r is not None else "-")
    console.print(t)
    top, small = _at(points, 8 << 20), _at(points, 256)
    gbps = top["gbps"] if top else None
    kps = small["keys_per_s"] if small else None
    result = {
        "bench": "api", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "paper": PAPER, "floor": TARGETS["api"], "clients": clients, "workers": workers,
        "gbps_at_1MiB": gbps, "keys_per_s_at_256bit": kps,
        "baseline_gbps_at_1MiB": top["baseline_gbps"] if top else None,
        "ratio_vs_paper": gbps * 1000 / PAPER["mbps_at_1MB"] if gbps else None,
        "ratio_vs_baseline_at_1MiB": top["ratio_vs_baseline"] if top else None,
        "ceiling_requests_per_s_at_256bit": small.get("ceiling_keys_per_s") if small else None,
        "ceiling_gbps_at_1MiB": top.get("ceiling_gbps") if top else None,
        "points": points,
    }
    result["ratio_256bit_vs_ceiling"] = vs(kps, result["ceiling_requests_per_s_at_256bit"])
    result["ratio_1MiB_vs_ceiling"] = vs(gbps, result["ceiling_gbps_at_1MiB"])
    result["meets_floor"] = meets(result, "api")
    rows = []
    if top:
        rows.append(("key API, 1 MB keys, enc_keys", "971 Mb/s", f"{gbps:.2f} Gb/s",
                     f"{result['ratio_vs_paper']:.1f}"))
        rows.append(("same, dec_keys", "-", f"{top['dec_gbps']:.2f} Gb/s",
                     f"{top['dec_gbps'] * 1000 / PAPER['mbps_at_1MB']:.1f}"))
        rows.append(("baseline: new TLS connection per request", "-",
                     f"{top['baseline_gbps']:.2f} Gb/s",
                     f"{top['baseline_gbps'] * 1000 / PAPER['mbps_at_1MB']:.1f}"))
    console.print(paper_table(rows))
    if small and result["ceiling_requests_per_s_at_256bit"]:
        console.print(f"256-bit keys: {kps:,.0f} keys/s, the bare endpoint "
                      f"{result['ceiling_requests_per_s_at_256bit']:,.0f} requests/s")
    if top and result["ceiling_gbps_at_1MiB"]:
        console.print(f"1 MiB keys: {gbps:.2f} Gb/s, the bare endpoint "
                      f"{result['ceiling_gbps_at_1MiB']:.2f} Gb/s")
    console.print(verdict_line(result, "api"))
    return finish(result, console, plot_path, lambda out: plot(points, sizes, out))


def plot(points: list[dict], sizes: tuple[int, ...], out: Path) -> Path:
    fig, ax = figure()
    for field, style, label in (("gbps", "-o", "enc_keys, keep-alive"),
                                ("dec_gbps", "-s", "dec_keys, keep-alive"),
                                ("baseline_gbps", "x--", "conventional: new connection "
                                                          "per request"),
                                ("ceiling_gbps", "^:", "bare Sanic endpoint (ceiling)")):
        pts = sorted((p["bits"], p[field] * 1000) for p in points if field in p)
        ax.plot([b for b, _ in pts], [v for _, v in pts], style, label=label)
    ax.plot([8 << 20], [PAPER["mbps_at_1MB"]], "k*", ms=10, label="paper: 971 Mb/s at 1 MB")
    log_axes(ax, list(sizes), [size_name(s) for s in sizes])
    return save(fig, ax, out, title="key API: throughput against key size",
                xlabel="key size", ylabel="Mb/s")


def as_json(result: dict) -> str:
    return json.dumps(result, default=str)
