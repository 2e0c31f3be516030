"""The application emulator for `qkdctl bench api`: SAEs pulling keys over HTTPS with
mutual TLS, in processes that entered the master's (or slave's) network namespace.

Each puller holds one keep-alive connection and asks for keys back to back until the KME
answers 503 (the store is empty) or it is told to stop; it checks every answer (status,
JSON, key count, base64 and key length) and counts keys and bytes. The *conventional*
puller opens a new connection (a full mutual-TLS handshake) for every request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import multiprocessing as mp
import ssl
import time
from dataclasses import dataclass, field

import orjson
import pybase64

SAMPLE_EVERY = 64  # a digest of every 64th key, for the enc/dec comparison


@dataclass
class Pull:
    keys: int = 0
    bytes: int = 0
    requests: int = 0
    started: float = 0.0
    ended: float = 0.0
    stop_status: int = 0
    stop_message: str = ""
    key_ids: list[str] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    error: str = ""


def client_context(pki: str, sae: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.crt")
    ctx.load_cert_chain(f"{pki}/saes/{sae}.crt", f"{pki}/saes/{sae}.key")
    return ctx


def _check(body: bytes, number: int, size_bytes: int, out: Pull, sample: bool) -> None:
    keys = orjson.loads(body)["keys"]
    if len(keys) != number:
        raise ValueError(f"{len(keys)} keys in an answer, {number} asked")
    for k in keys:
        key = pybase64.b64decode(k["key"], validate=True)
        if len(key) != size_bytes:
            raise ValueError(f"a key of {len(key)} B, {size_bytes} B asked")
        out.key_ids.append(k["key_ID"])
        if sample and len(out.key_ids) % SAMPLE_EVERY == 0:
            out.digests[k["key_ID"]] = hashlib.sha256(key).hexdigest()


def pull_enc(pki: str, sae: str, host: str, port: int, slave: str, size_bits: int,
             number: int, start_at: float, deadline: float, keep_alive: bool) -> Pull:
    """enc_keys until 503 or ``deadline`` (wall clock)."""
    out = Pull()
    ctx = client_context(pki, sae)
    path = f"/api/v1/keys/{slave}/enc_keys?number={number}&size={size_bits}"
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
    if keep_alive:
        conn.connect()
    while time.time() < start_at:
        time.sleep(0.001)
    out.started = time.time()
    try:
        while time.time() < deadline:
            if not keep_alive:
                conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if not keep_alive:
                conn.close()
            out.requests += 1
            if r.status != 200:
                out.stop_status = r.status
                out.stop_message = json.loads(body).get("message", "")[:200]
                break
            _check(body, number, size_bits // 8, out, True)
            out.keys += number
            out.bytes += number * size_bits // 8
    except Exception as e:  # reported, the bench decides
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.ended = time.time()
    conn.close()
    return out


def pull_dec(pki: str, sae: str, host: str, port: int, master: str, key_ids: list[str],
             size_bits: int, start_at: float) -> Pull:
    """dec_keys for each key ID, one per request, on one keep-alive connection."""
    out = Pull()
    ctx = client_context(pki, sae)
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=60)
    conn.connect()
    while time.time() < start_at:
        time.sleep(0.001)
    out.started = time.time()
    try:
        for kid in key_ids:
            conn.request("GET", f"/api/v1/keys/{master}/dec_keys?key_ID={kid}")
            r = conn.getresponse()
            body = r.read()
            out.requests += 1
            if r.status != 200:
                out.stop_status = r.status
                out.stop_message = json.loads(body).get("message", "")[:200]
                break
            _check(body, 1, size_bits // 8, out, True)
            out.keys += 1
            out.bytes += size_bits // 8
    except Exception as e:
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.ended = time.time()
    conn.close()
    return out


def _child(ns: str, fn, args: tuple, conn) -> None:
    from pyroute2 import netns

    try:
        netns.setns(ns)
        conn.send(fn(*args))
    except BaseException as e:
        conn.send(Pull(error=f"{type(e).__name__}: {e}"[:300]))


def run_in(ns: str, jobs: list[tuple], timeout: float) -> list[Pull]:
    """Run each (function, args) in its own process inside namespace ``ns``."""
    ctx = mp.get_context("fork")
    procs = []
    for fn, args in jobs:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_child, args=(ns, fn, args, child), daemon=True)
        p.start()
        procs.append((p, parent))
    out = []
    end = time.monotonic() + timeout
    for p, parent in procs:
        if parent.poll(max(0.0, end - time.monotonic())):
            out.append(parent.recv())
        else:
            out.append(Pull(error="no result in time"))
        p.kill()
        p.join(2)
    return out
