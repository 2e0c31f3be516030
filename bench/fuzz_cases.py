"""Requests for fuzzing the key API over the wire, drawn from a seeded generator (pure).

Each case is the raw bytes of one HTTP/1.1 request (methods, paths, queries, headers and
bodies, valid and not), how to send them (all at once, slowly in small pieces, or cut off
before the end) and with which identity (the master SAE's certificate, another SAE's, or
none). The generator leans towards requests that are almost right (a valid endpoint with
one thing wrong), since those reach the deepest code; a few are valid and take key, so the
run can check that the store drops by exactly what was handed out.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

BASE = "/api/v1/keys"
SEND = ("whole", "whole", "whole", "whole", "whole", "whole", "whole", "whole", "slow",
        "cut")
WHO = ("master",) * 18 + ("none", "other")
METHODS = ("GET",) * 8 + ("POST",) * 8 + ("PUT", "DELETE", "HEAD", "OPTIONS", "PATCH",
                                           "TRACE", "G ET", "get", "\u00c9T", "X" * 300)
ENDPOINTS = ("status", "enc_keys", "dec_keys")


@dataclass(frozen=True)
class Case:
    raw: bytes
    send: str        # "whole", "slow" or "cut" (the connection closed before the end)
    who: str         # "master", "other" (another SAE's certificate) or "none"
    method: str
    endpoint: str    # what it aims at ("" if nothing known)
    valid: bool      # a well-formed request the KME should serve (200 or 503)


def _junk(rng: random.Random, n: int) -> str:
    alphabet = "aZ09-_.~%/?&=#;:@!$'()*+,[]{}<>\\^`| \t\u00e9\u4e2d\x00\x7f"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _number(rng: random.Random) -> object:
    return rng.choice([1, 2, 8, 0, -1, 2**31, 2**64, 1.5, "1", "x", None, True, [1], {},
                       rng.randint(-10, 100), "1e3", "０"])


def _size(rng: random.Random) -> object:
    return rng.choice([256, 512, 8, 0, -256, 255, 257, 8 << 20, (8 << 20) + 8, 2**40, "256",
                       1.0, None, False, [256], rng.choice([64, 128, 1024, 8192])])


def _query(rng: random.Random, endpoint: str, slave: str) -> tuple[str, bool]:
    if endpoint == "status" or rng.random() < 0.15:
        if rng.random() < 0.8:
            return "", True
        return "?" + _junk(rng, rng.randint(1, 40)), False
    if endpoint == "enc_keys":
        if rng.random() < 0.3:
            return f"?number={rng.randint(1, 4)}&size={rng.choice([256, 512, 1024])}", True
        parts = [f"number={_number(rng)}", f"size={_size(rng)}",
                 f"additional_slave_SAE_IDs={rng.choice([slave, 'nobody', '', _junk(rng, 5)])}",
                 _junk(rng, rng.randint(0, 12)), "number=1&number=2"]
        rng.shuffle(parts)
        return "?" + "&".join(parts[:rng.randint(1, len(parts))]), False
    ids = [rng.choice(["00000000-0000-0000-0000-000000000000", _junk(rng, 36),
                       "%00", "a" * rng.randint(30, 3000)]) for _ in range(rng.randint(1, 3))]
    return "?" + "&".join(f"key_ID={i}" for i in ids), False


def _body(rng: random.Random, endpoint: str, slave: str) -> tuple[bytes, bool]:
    r = rng.random()
    if endpoint == "enc_keys" and r < 0.3:
        doc = {"number": rng.randint(1, 4), "size": rng.choice([256, 512])}
        return json.dumps(doc).encode(), True
    if r < 0.55:
        doc: object = {"number": _number(rng), "size": _size(rng),
                       "additional_slave_SAE_IDs": rng.choice([[slave], ["x"] * 40, "s", [1],
                                                               []]),
                       "key_IDs": rng.choice([[{"key_ID": _junk(rng, 36)}], [], "x", [1],
                                              [{"key_ID": None}], [{}]]),
                       "extension_mandatory": rng.choice([[{"x": 1}], None, "x"])}
        keys = list(doc)
        rng.shuffle(keys)
        doc = {k: doc[k] for k in keys[:rng.randint(0, len(keys))]}
        return json.dumps(doc).encode(), False
    if r < 0.75:
        return rng.choice([b"{", b"[]", b"null", b"1", b'"x"', b"{\"number\": 1,}",
                           b"\xff\xfe", b"{" * 5000 + b"}" * 5000, b"[" * 100_000,
                           json.dumps({"number": 10**400}).encode(),
                           b'{"number": NaN}', b'{"size": 1e999}']), False
    if r < 0.85:
        return b"x" * rng.choice([10, 70_000, (1 << 20) + 1]), False
    return _junk(rng, rng.randint(0, 200)).encode("utf-8", "surrogatepass"), False


def draw(rng: random.Random, slave: str = "SAE-B", host: str = "kme") -> Case:
    """One case; the same ``rng`` state gives the same case."""
    method = rng.choice(METHODS)
    endpoint = rng.choice(ENDPOINTS)
    sae = slave if rng.random() < 0.8 else rng.choice(
        ["", "SAE-A", "nobody", _junk(rng, 8), "a" * 300, "..", "%2e%2e"])
    r = rng.random()
    if r < 0.8:
        path = f"{BASE}/{sae}/{endpoint}"
    elif r < 0.9:
        path = rng.choice([f"{BASE}/{sae}", f"{BASE}/{sae}/{endpoint}/", "/", "/api/v1",
                           f"{BASE}//{endpoint}", f"/API/V1/KEYS/{sae}/{endpoint}",
                           f"{BASE}/{sae}/../{sae}/{endpoint}", "*"])
        endpoint = ""
    else:
        path = "/" + _junk(rng, rng.randint(1, 200)).replace(" ", "%20")
        endpoint = ""
    query, q_ok = _query(rng, endpoint, slave)
    body, b_ok = b"", True
    headers = [f"Host: {host}"]
    if method in ("POST", "PUT", "PATCH") or rng.random() < 0.05:
        body, b_ok = _body(rng, endpoint, slave)
        ctype = rng.choice(["application/json"] * 6 + ["text/plain", "application/json; "
                            "charset=utf-8", "", "multipart/form-data; boundary=x"])
        if ctype:
            headers.append(f"Content-Type: {ctype}")
        length = rng.random()
        if length < 0.85:
            headers.append(f"Content-Length: {len(body)}")
        elif length < 0.9 and body:
            headers.append(f"Content-Length: {max(0, len(body) - rng.randint(1, 5))}")
        elif length < 0.95:
            headers.append("Transfer-Encoding: chunked")
            body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body \
                else b"0\r\n\r\n"
        else:
            headers.append(f"Content-Length: {rng.choice(['-1', 'x', '1' * 30, ''])}")
    for _ in range(rng.choice([0] * 8 + [1, 3])):
        headers.append(rng.choice([f"X-{_junk(rng, 5)}: {_junk(rng, 20)}",
                                   "X-Long: " + "a" * rng.choice([100, 10_000, 200_000]),
                                   "Connection: close", "Expect: 100-continue",
                                   "Accept: */*", _junk(rng, 30)]))
    line = f"{method} {path}{query} HTTP/{rng.choice(['1.1'] * 20 + ['1.0', '2', 'x'])}"
    raw = (line + "\r\n" + "\r\n".join(headers) + "\r\n\r\n").encode(
        "utf-8", "surrogatepass") + body
    valid = (method == "GET" and endpoint != "" and q_ok and sae == slave
             and "HTTP/1.1" in line and len(headers) == 1) or \
            (method == "POST" and endpoint == "enc_keys" and b_ok and q_ok and sae == slave
             and headers[1:] == ["Content-Type: application/json",
                                 f"Content-Length: {len(body)}"] and "HTTP/1.1" in line)
    send = rng.choice(SEND)
    return Case(raw=raw, send=send, who=rng.choice(WHO), method=method, endpoint=endpoint,
                valid=valid and send != "cut")
