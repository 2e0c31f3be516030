"""`qkdctl bench fuzz`: the running key API under ``requests`` fuzzed requests.

Two nodes, A - B, with the real node processes; A's store for B filled and every key
manager and emulator paused, so the store changes only by what the KME hands out. Client
processes in A's namespace send the cases of :mod:`bench.fuzz_cases` over TLS (as the
master SAE, as another SAE, or with no certificate), whole, slowly in small pieces, or
cut off before the end, and read each answer. Afterwards:
- every answer's status is one of 200, 400, 401 and 503 (the standard's four), and a
  request cut off is answered by nothing;
- no node process was restarted and the key API's workers are the same processes;
- A's store for B took exactly the keys the 200 answers carried (it drops by those and
  by block rests too small for a request, which carving skips), and B holds a
  reservation for exactly those keys (nothing taken for a refused or cut request);
- the KME still serves a plain request.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import ssl
import time
from collections import Counter

from rich.console import Console

from api.client import run_in_netns
from bench.api import ApiNet
from bench.fuzz_cases import Case, draw
from bench.harness import BenchError
from control.core import paths
from control.core.statefile import read_status
from control.gkm.client import GkmClient

ALLOWED = {200, 400, 401, 503}
ANSWER_TIMEOUT_S = 60.0
MAX_EXAMPLES = 5


def _context(pki: str, who: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    if who != "none":
        sae = "SAE-A" if who == "master" else "SAE-B"
        ctx.load_cert_chain(f"{pki}/saes/{sae}.crt", f"{pki}/saes/{sae}.key")
    return ctx


def _read_answer(tls: ssl.SSLSocket, head_only: bool) -> tuple[int, bytes, bool]:
    """(status, body, server keeps the connection); status 0: closed without an answer."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = tls.recv(65536)
            if not chunk:
                return 0, b"", False
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if not 100 <= status < 200:
            break
        buf = rest  # an interim answer (100 Continue): the final one follows
    fields = {k.strip().lower(): v.strip() for k, v in
              (line.split(":", 1) for line in lines[1:] if ":" in line)}
    length = 0 if head_only else int(fields.get("content-length", "0"))
    while len(rest) < length:
        chunk = tls.recv(max(65536, length - len(rest)))
        if not chunk:
            break
        rest += chunk
    return status, rest[:length], fields.get("connection", "").lower() != "close"


def _send(tls: ssl.SSLSocket, case: Case, rng: random.Random) -> None:
    raw = case.raw
    if case.send == "whole":
        tls.sendall(raw)
    elif case.send == "slow":
        at = 0
        for _ in range(40):
            if at >= len(raw):
                break
            n = rng.randint(1, 50)
            tls.sendall(raw[at:at + n])
            at += n
            time.sleep(rng.uniform(0.0005, 0.004))
        tls.sendall(raw[at:])
    else:  # cut: a part of the request, then the connection closes
        tls.sendall(raw[:rng.randint(0, max(0, len(raw) - 1))])


def fuzz_client(pki: str, host: str, port: int, seed: int, count: int) -> dict:
    """Runs inside A's namespace: ``count`` cases drawn from ``seed``; what came back."""
    rng = random.Random(seed)
    statuses: Counter = Counter()
    out = {"statuses": statuses, "keys": 0, "key_bytes": 0, "bound": 0, "cut": 0,
           "cut_by_kme": 0, "closed": 0,
           "closed_sending": 0, "bad_answers": 0, "examples": []}
    ctxs = {w: _context(pki, w) for w in ("master", "other", "none")}
    conn: dict[str, ssl.SSLSocket] = {}

    def connect(who: str) -> ssl.SSLSocket:
        raw = socket.create_connection((host, port), timeout=ANSWER_TIMEOUT_S)
        return ctxs[who].wrap_socket(raw, server_hostname=host)

    for _ in range(count):
        case = draw(rng)
        tls = conn_reused = conn.pop(case.who, None)
        still_sending = False  # the KME closed while this request was still on its way
        stage = "connecting"
        try:
            if tls is None or case.send == "cut":
                if tls is not None:
                    tls.close()
                tls = connect(case.who)
            stage = "sending" if tls is not conn_reused else "sending on a reused connection"
            try:
                _send(tls, case, rng)
            except (OSError, ssl.SSLError):
                if case.send == "cut":  # refused and closed by the KME before its end:
                    out["cut"] += 1  # a cut request all the same (no answer was awaited)
                    out["cut_by_kme"] += 1
                    tls.close()
                    continue
                # The KME may answer before the request ends (a line, header or body
                # over its limits) and close: its answer is still there to read, unless
                # the close met bytes still arriving and the reset discarded it.
                still_sending = True
            if case.send == "cut":
                out["cut"] += 1
                tls.close()
                continue
            stage = "reading" if tls is not conn_reused else "reading on a reused connection"
            status, body, keep = _read_answer(tls, case.method == "HEAD")
        except (OSError, ssl.SSLError, ValueError, IndexError) as e:
            if tls is not None:
                tls.close()
            out["closed"] += 1
            out["closed_sending"] += still_sending or case.send == "slow"
            if len(out["examples"]) < MAX_EXAMPLES:
                out["examples"].append(f"{type(e).__name__} {stage} ({case.send}): "
                                       f"{str(e)[:80]} after {case.raw[:60]!r}")
            continue
        if status == 0:
            out["closed"] += 1
            out["closed_sending"] += still_sending or case.send == "slow"
            tls.close()
            if len(out["examples"]) < MAX_EXAMPLES:
                out["examples"].append(f"closed without an answer: {case.raw[:100]!r}")
            continue
        statuses[status] += 1
        if status not in ALLOWED and len(out["examples"]) < MAX_EXAMPLES:
            out["examples"].append(f"{status} for {case.raw[:80]!r}")
        if status == 200 and case.method != "HEAD":
            try:
                doc = json.loads(body)
                sizes = [len(base64.b64decode(k["key"], validate=True))
                         for k in doc.get("keys", [])]
                out["keys"] += len(sizes)
                out["key_bytes"] += sum(sizes)
                out["bound"] += max(sizes, default=0)
            except (ValueError, KeyError, TypeError):
                out["bad_answers"] += 1
        if keep and case.valid and status in (200, 503):
            conn[case.who] = tls  # a clean exchange: the connection is reused
        else:
            tls.close()
    for tls in conn.values():
        tls.close()
    out["statuses"] = dict(statuses)
    return out


def _no_reserving_ahead(template: str) -> str:
    """bench api's network with no keys reserved ahead of demand: the run's accounting
    (every key taken is one an answer handed out, and B reserved exactly those) needs a
    store with no other consumer."""
    pairs = 'pairs = [["A", "B"]]\n'
    if pairs not in template:
        raise AssertionError("bench api's template no longer names its pairs as expected")
    return template.replace(pairs, pairs + "reserve_ahead_s = 0\n", 1)


class FuzzNet(ApiNet):
    TAG = "bz"
    TEMPLATE = _no_reserving_ahead(ApiNet.TEMPLATE)

    def restarts(self) -> dict[str, int]:
        out = {}
        for node in self.topo.nodes:
            st = read_status(paths.node_dir(self.prefix, node) / "state.json") or {}
            for m in st.get("modules", []):
                out[f"{node} {m['name']}"] = (m.get("restarts", 0), m.get("pid"))
        return out

    def api_workers(self) -> set[int]:
        st = read_status(paths.node_dir(self.prefix, "A") / "api.json") or {}
        return {w["pid"] for w in st.get("slots", []) if isinstance(w, dict)
                and isinstance(w.get("pid"), int)}

    def reserved_at_b(self) -> int:
        c = GkmClient(self.prefix, "B", timeout_s=60)
        try:
            return c.summary()["peers"]["A"]["dec"]["reserved_keys"]
        finally:
            c.close()


def run(requests: int = 100_000, clients: int = 8, seed: int = 1,
        console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    if requests < clients:
        raise BenchError("--requests must be at least --clients")
    net = FuzzNet(store_max=64 << 20, workers=2, ring="64MiB", console=console)
    try:
        console.print(f"fuzz: {requests:,} requests from {clients} clients at A's KME")
        net.up()
        net.stock(32 << 20)
        enc0, reserved0 = net.enc(), net.reserved_at_b()
        modules0, workers0 = net.restarts(), net.api_workers()
        per = [requests // clients + (i < requests % clients) for i in range(clients)]
        t0 = time.monotonic()
        results = run_in_netns(net.ns("A"), [(fuzz_client, (str(net.topo.api.pki), net.addr("A"),
                                                      net.topo.ports.api, seed * 1000 + i, n))
                                       for i, n in enumerate(per)],
                         timeout=max(600.0, requests / 20))
        took = time.monotonic() - t0
        failed = [r for r in results if not isinstance(r, dict)]
        if failed:
            raise BenchError(f"a fuzzing client failed: {failed[0]}")
        statuses: Counter = Counter()
        for r in results:
            statuses.update({int(k): v for k, v in r["statuses"].items()})
        keys = sum(r["keys"] for r in results)
        key_bytes = sum(r["key_bytes"] for r in results)
        time.sleep(1.0)  # B's summary reflects the last reservations
        enc1, reserved1 = net.enc(), net.reserved_at_b()
        modules1, workers1 = net.restarts(), net.api_workers()
        net.wait_api(30)  # still serving
        logs = paths.log_dir(net.prefix)
    finally:
        net.down()
    out = {
        "bench": "fuzz", "requests": requests, "clients": clients, "seed": seed,
        "seconds": round(took, 1), "requests_per_s": round(requests / took),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "unexpected_statuses": {str(k): v for k, v in statuses.items() if k not in ALLOWED},
        "answered": sum(statuses.values()), "cut": sum(r["cut"] for r in results),
        # ... of them, cut requests the KME had already refused and closed before the
        # client's part of them was all sent (a line or header over its limits, say)
        "cut_closed_by_kme": sum(r["cut_by_kme"] for r in results),
        "closed_without_answer": sum(r["closed"] for r in results),
        # ... of them, requests the KME refused early, before they had all arrived (sent
        # slowly, or the send failed): its close met bytes still coming, and TCP's reset
        # discarded the answer it had sent.
        "closed_while_sending": sum(r["closed_sending"] for r in results),
        "bad_answers": sum(r["bad_answers"] for r in results),
        "keys_handed_out": keys, "key_bytes_handed_out": key_bytes,
        "store_drop_bytes": enc0["usable"] - enc1["usable"],
        "taken_keys": enc1["taken_keys"] - enc0["taken_keys"],
        "taken_bytes": enc1["taken_bytes"] - enc0["taken_bytes"],
        "reserved_at_b_added": reserved1 - reserved0,
        "restarted": sorted(k for k in modules1 if modules1[k] != modules0.get(k)),
        "api_workers_same": workers0 == workers1 and bool(workers0),
        "examples": [e for r in results for e in r["examples"]][:2 * MAX_EXAMPLES],
        "logs": str(logs),
    }
    # Keys never span blocks: a block's rest too small for a request is skipped (at most
    # one rest per answer that took key, each smaller than that answer's keys).
    out["carving_skipped_bytes"] = out["store_drop_bytes"] - key_bytes
    out["carving_bound_bytes"] = sum(r["bound"] for r in results)
    out["meets"] = (not out["unexpected_statuses"] and not out["restarted"]
                    and out["api_workers_same"] and out["bad_answers"] == 0
                    and out["taken_keys"] == keys and out["taken_bytes"] == key_bytes
                    and out["reserved_at_b_added"] == keys
                    and 0 <= out["store_drop_bytes"] - key_bytes < out["carving_bound_bytes"])
    return out


def report(r: dict, console: Console) -> None:
    console.print(
        f"fuzz: {r['requests']:,} requests in {r['seconds']} s ({r['requests_per_s']}/s): "
        f"answers {r['statuses']}, {r['cut']:,} cut off by the client "
        f"({r['cut_closed_by_kme']:,} of them refused and closed by the KME first), "
        f"{r['closed_without_answer']:,} closed by the KME without an answer\n"
        f"  unexpected statuses: {r['unexpected_statuses'] or 'none'}; restarted: "
        f"{r['restarted'] or 'nothing'}; key API workers the same: {r['api_workers_same']}\n"
        f"  handed out {r['keys_handed_out']:,} keys ({r['key_bytes_handed_out']:,} B); "
        f"A's store took {r['taken_keys']:,} keys ({r['taken_bytes']:,} B) and dropped "
        f"{r['store_drop_bytes']:,} B (block rests skipped by carving: "
        f"{r['carving_skipped_bytes']:,} B); B reserved {r['reserved_at_b_added']:,} keys\n"
        f"  {'[green]meets[/green]' if r['meets'] else '[red]fails[/red]'}", highlight=False)
    for e in r["examples"]:
        console.print(f"  example: {e}", highlight=False, markup=False)


