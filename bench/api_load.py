"""The application emulator for `qkdctl bench api`: SAEs pulling keys over HTTPS with
mutual TLS, in processes that entered the master's (or slave's) network namespace.

Each puller holds one keep-alive connection and asks for keys back to back until the KME
answers 503 (the store is empty) or it is told to stop; it checks every answer (status,
JSON, key count, base64 and key length) and counts keys and bytes. The *conventional*
puller opens a new connection (a full mutual-TLS handshake) for every request.

The client is ``api.client.Conn``, a minimal HTTP/1.1 client over ``ssl.SSLObject``: it
shares two cores with the service it measures, and http.client spends more on parsing
headers and on syscalls per TLS record than the service spends on a small answer.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass, field

import orjson
import pybase64

from api.client import Conn, client_context, run_in_netns

SAMPLE_EVERY = 16  # a digest of one key in 16 (by key ID), for the enc/dec comparison


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


def _check(body: bytes | bytearray, number: int, size_bytes: int, out: Pull, sample: bool) -> None:
    keys = orjson.loads(body)["keys"]
    if len(keys) != number:
        raise ValueError(f"{len(keys)} keys in an answer, {number} asked")
    for k in keys:
        key = pybase64.b64decode(k["key"], validate=True)
        if len(key) != size_bytes:
            raise ValueError(f"a key of {len(key)} B, {size_bytes} B asked")
        out.key_ids.append(k["key_ID"])
        if sample and zlib.crc32(k["key_ID"].encode()) % SAMPLE_EVERY == 0:
            out.digests[k["key_ID"]] = hashlib.sha256(key).hexdigest()


def pull_enc(pki: str, sae: str, host: str, port: int, slave: str, size_bits: int,
             number: int, start_at: float, deadline: float, keep_alive: bool) -> Pull:
    """enc_keys until 503 or ``deadline`` (wall clock)."""
    out = Pull()
    ctx = client_context(pki, sae)
    path = f"/api/v1/keys/{slave}/enc_keys?number={number}&size={size_bits}"
    conn = Conn(host, port, ctx) if keep_alive else None
    while time.time() < start_at:
        time.sleep(0.001)
    out.started = time.time()
    try:
        while time.time() < deadline:
            c = conn or Conn(host, port, ctx)
            status, body = c.get(path)
            if conn is None:
                c.close()
            out.requests += 1
            if status != 200:
                out.stop_status = status
                out.stop_message = orjson.loads(body).get("message", "")[:200]
                break
            _check(body, number, size_bits // 8, out, True)
            out.keys += number
            out.bytes += number * size_bits // 8
    except Exception as e:  # reported, the bench decides
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.ended = time.time()
    if conn is not None:
        conn.close()
    return out


def pull_dec(pki: str, sae: str, host: str, port: int, master: str, key_ids: list[str],
             size_bits: int, start_at: float) -> Pull:
    """dec_keys for each key ID, one per request, on one keep-alive connection."""
    out = Pull()
    conn = Conn(host, port, client_context(pki, sae))
    while time.time() < start_at:
        time.sleep(0.001)
    out.started = time.time()
    try:
        for kid in key_ids:
            status, body = conn.get(f"/api/v1/keys/{master}/dec_keys?key_ID={kid}")
            out.requests += 1
            if status != 200:
                out.stop_status = status
                out.stop_message = orjson.loads(body).get("message", "")[:200]
                break
            _check(body, 1, size_bits // 8, out, True)
            out.keys += 1
            out.bytes += size_bits // 8
    except Exception as e:
        out.error = f"{type(e).__name__}: {e}"[:300]
    out.ended = time.time()
    conn.close()
    return out


def run_in(ns: str, jobs: list[tuple], timeout: float) -> list[Pull]:
    """Each (function, args) in its own process inside namespace ``ns``."""
    return [r if isinstance(r, Pull) else Pull(error=str(r))
            for r in run_in_netns(ns, jobs, timeout)]
