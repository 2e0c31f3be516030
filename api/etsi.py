"""ETSI GS QKD 014 V1.1.1 for both roles, without I/O: what a KME reads and writes, and
what an SAE writes and reads.

Server side (the key API, ``api.server``): the handlers hand this module what arrived (the
query string's parameters or the body's bytes) and get back a typed request, or an
``ApiError`` with the status code and the message the standard names; the key container
they send is built here. Every request is refused whole on the first problem; no
exception other than ``ApiError`` leaves the request parsers, whatever the input.

Client side (``api.client``, and the link key source that is an SAE of its QKD device):
each call as a ``Call`` (method, path, body), and each answer read back: a status other
than 200 becomes ``NotEnoughKey`` or ``Refused``, a key container is taken whole or
refused whole (``BadAnswer``): exactly the keys asked for, each a UUID key_ID and base64
of the size asked, no key_ID twice.

Choices the standard leaves open, stated here:
- Unknown query parameters and unknown JSON fields are refused (400): a misspelt
  ``nubmer`` silently becoming the default would hand out the wrong keys.
- ``extension_mandatory`` with any entry is refused ("not all extension_mandatory
  parameters are supported"): this KME supports none. ``extension_optional`` entries are
  accepted and ignored, which is what optional means.
- Integers must be JSON integers (not booleans, floats or strings) in a body, and plain
  decimal digits in a query string.
- A key container's extension fields (``key_container_extension``, ``key_extension``)
  are accepted and ignored by the client; a key_ID keeps the letter case the KME gave it
  (it is named back to a KME exactly as received).
"""

from __future__ import annotations

import binascii
import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import pybase64

from control.core.config import SAE_ID_RE

BASE_PATH = "/api/v1/keys"  # every call's path starts here, after the KME URL's own path
MAX_BODY = 1 << 20   # bytes of JSON a request may carry
KEY_ID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                       r"[0-9a-fA-F]{12}")  # a UUID in its canonical text form, any case
MAX_ERROR_TEXT = 200  # characters of a KME's error message a client keeps
_DIGITS = re.compile(r"[0-9]{1,9}")


class ApiError(Exception):
    """An answer other than 200: the status code and the Error body's message."""

    def __init__(self, status: int, message: str, details: list[dict] | None = None):
        if status not in (400, 401, 503):
            raise ValueError(f"ETSI GS QKD 014 has no status {status}")
        self.status = status
        self.message = message
        self.details = details or []
        super().__init__(message)

    def body(self) -> dict:
        out: dict = {"message": self.message}
        if self.details:
            out["details"] = self.details
        return out


def bad(message: str, **detail: object) -> ApiError:
    """A 400 with ``message`` (and one details entry when ``detail`` is given)."""
    return ApiError(400, message, [detail] if detail else None)


@dataclass(frozen=True)
class Limits:
    """What this KME offers, as Status reports it (sizes in bits)."""

    key_size: int = 256
    min_key_size: int = 8
    max_key_size: int = 8 << 20
    max_key_per_request: int = 1024
    max_sae_id_count: int = 8


@dataclass(frozen=True)
class EncKeysRequest:
    number: int
    size: int  # bits, a multiple of 8
    additional_slave_sae_ids: tuple[str, ...] = ()

    @property
    def size_bytes(self) -> int:
        return self.size // 8


@dataclass(frozen=True)
class DecKeysRequest:
    key_ids: tuple[str, ...]  # canonical lower-case UUID strings


# ==== server side: requests in =========================================================

# ---- pieces ---------------------------------------------------------------------------

def check_sae_id(value: object, what: str) -> str:
    """``value`` if it is an SAE ID; a 400 naming ``what`` otherwise."""
    if not isinstance(value, str) or not SAE_ID_RE.fullmatch(value):
        raise bad(f"{what} must be an SAE ID (1-64 letters, digits, '_', '.', '-')")
    return value


def check_key_id(value: object) -> str:
    """A key_ID in a request, as its canonical lower-case UUID; a 400 otherwise."""
    if not isinstance(value, str):
        raise bad("key_ID must be a UUID string")
    try:
        u = uuid.UUID(value)
    except ValueError:
        raise bad(f"key_ID {value[:64]!r} is not a UUID") from None
    if str(u) != value.lower():
        raise bad(f"key_ID {value[:64]!r} is not a UUID in its canonical form")
    return str(u)


def _number_size(number: int | None, size: int | None, limits: Limits) -> tuple[int, int]:
    number = 1 if number is None else number
    size = limits.key_size if size is None else size
    if number < 1:
        raise bad("number must be at least 1")
    if number > limits.max_key_per_request:
        raise bad(f"number {number} is above max_key_per_request "
                  f"({limits.max_key_per_request})")
    if size % 8:
        raise bad("size shall be a multiple of 8")
    if not limits.min_key_size <= size <= limits.max_key_size:
        raise bad(f"size {size} is outside [{limits.min_key_size}, {limits.max_key_size}] "
                  f"(min_key_size, max_key_size)")
    return number, size


def _query_one(query: Mapping[str, Sequence[str]], allowed: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name, values in query.items():
        if name not in allowed:
            raise bad(f"unknown query parameter {name[:64]!r} (allowed: "
                      f"{', '.join(allowed)})")
        if len(values) != 1:
            raise bad(f"query parameter {name} given {len(values)} times")
        out[name] = values[0]
    return out


def _query_int(params: dict[str, str], name: str) -> int | None:
    if name not in params:
        return None
    v = params[name]
    if not _DIGITS.fullmatch(v):
        raise bad(f"{name} must be a non-negative integer, got {v[:32]!r}")
    return int(v)


def _json_object(body: bytes | None) -> dict:
    if body is None or len(body) == 0:
        raise bad("request body missing: a JSON object is expected")
    if len(body) > MAX_BODY:
        raise bad(f"request body larger than {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(f"malformed JSON: {str(e)[:120]}") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object")
    return data


def _json_int(data: dict, name: str) -> int | None:
    if name not in data:
        return None
    v = data[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer")
    return v


def _objects(data: dict, name: str) -> list[dict]:
    v = data.get(name, [])
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise bad(f"{name} must be an array of objects")
    return v


def _unknown_fields(data: dict, allowed: tuple[str, ...]) -> None:
    extra = [k for k in data if k not in allowed]
    if extra:
        raise bad(f"unknown field {str(extra[0])[:64]!r} (allowed: {', '.join(allowed)})")


# ---- the four request forms and the path's SAE ID ---------------------------------------

def enc_keys_get(query: Mapping[str, Sequence[str]], limits: Limits) -> EncKeysRequest:
    params = _query_one(query, ("number", "size"))
    number, size = _number_size(_query_int(params, "number"), _query_int(params, "size"),
                                limits)
    return EncKeysRequest(number, size)


ENC_FIELDS = ("number", "size", "additional_slave_SAE_IDs", "extension_mandatory",
              "extension_optional")


def enc_keys_post(body: bytes | None, limits: Limits) -> EncKeysRequest:
    data = _json_object(body)
    _unknown_fields(data, ENC_FIELDS)
    number, size = _number_size(_json_int(data, "number"), _json_int(data, "size"), limits)
    extra = data.get("additional_slave_SAE_IDs", [])
    if not isinstance(extra, list):
        raise bad("additional_slave_SAE_IDs must be an array of SAE IDs")
    if len(extra) > limits.max_sae_id_count:  # counted first: a body of 200,000 names
        raise bad(f"{len(extra)} additional_slave_SAE_IDs, max_SAE_ID_count is "  # is not
                  f"{limits.max_sae_id_count}")  # worth checking one by one
    ids = tuple(check_sae_id(x, "each of additional_slave_SAE_IDs") for x in extra)
    if len(set(ids)) != len(ids):
        raise bad("an SAE ID is named twice in additional_slave_SAE_IDs")
    if _objects(data, "extension_mandatory"):
        raise bad("not all extension_mandatory parameters are supported")
    _objects(data, "extension_optional")  # accepted, ignored
    return EncKeysRequest(number, size, ids)


def dec_keys_get(query: Mapping[str, Sequence[str]], limits: Limits) -> DecKeysRequest:
    params = _query_one(query, ("key_ID",))
    if "key_ID" not in params:
        raise bad("key_ID is required")
    return DecKeysRequest((check_key_id(params["key_ID"]),))


def dec_keys_post(body: bytes | None, limits: Limits) -> DecKeysRequest:
    data = _json_object(body)
    _unknown_fields(data, ("key_IDs", "key_IDs_extension"))
    entries = data.get("key_IDs")
    if not isinstance(entries, list) or not entries:
        raise bad("key_IDs must be a non-empty array of {\"key_ID\": UUID}")
    if len(entries) > limits.max_key_per_request:
        raise bad(f"{len(entries)} key IDs, above max_key_per_request "
                  f"({limits.max_key_per_request})")
    if "key_IDs_extension" in data and not isinstance(data["key_IDs_extension"], dict):
        raise bad("key_IDs_extension must be an object")
    ids = []
    for e in entries:
        if not isinstance(e, dict) or "key_ID" not in e:
            raise bad("each entry of key_IDs must be an object with a key_ID")
        _unknown_fields(e, ("key_ID", "key_ID_extension"))
        if "key_ID_extension" in e and not isinstance(e["key_ID_extension"], dict):
            raise bad("key_ID_extension must be an object")
        ids.append(check_key_id(e["key_ID"]))
    if len(set(ids)) != len(ids):
        raise bad("a key_ID is named twice")
    return DecKeysRequest(tuple(ids))


def check_path_sae(value: str) -> str:
    """The SAE ID in the URL path ({slave_SAE_ID} or {master_SAE_ID})."""
    return check_sae_id(value, "the SAE ID in the path")


# ==== server side: key container out ==================================================

SMALL_PART = 16 << 10  # pieces of an answer below this are joined before sending


def key_container_parts(key_ids: list[str], keys: Iterable[bytes | memoryview]
                        ) -> list[bytes]:
    """The Key container as JSON, in pieces to send one after the other (large keys'
    base64 is not copied again to join it), built directly: a 1 MiB key is 1.4 MB of
    base64 (pybase64: SIMD, ~20x the standard library here), and json.dumps would scan it
    again for characters to escape (base64 has none; key IDs are UUIDs)."""
    out: list[bytes] = []
    small = [b'{"keys":[']
    for i, (kid, key) in enumerate(zip(key_ids, keys, strict=True)):
        small += (b'{"key_ID":"' if not i else b',{"key_ID":"', kid.encode(), b'","key":"')
        b64 = pybase64.b64encode(key)
        if len(b64) >= SMALL_PART:
            out += (b"".join(small), b64)
            small = []
        else:
            small.append(b64)
        small.append(b'"}')
    small.append(b"]}")
    out.append(b"".join(small))
    return out


def key_container(key_ids: list[str], keys: Iterable[bytes | memoryview]) -> bytes:
    """The Key container as one JSON byte string."""
    return b"".join(key_container_parts(key_ids, keys))


# ==== client side: requests out ========================================================

@dataclass(frozen=True)
class Call:
    """One request to a KME: ``path`` is below the KME URL's own path; ``body`` is JSON
    (None: no body)."""

    method: str
    path: str
    body: bytes | None = None


def _sae_path(sae: str, what: str) -> str:
    return f"{BASE_PATH}/{quote(sae, safe='')}/{what}"


def status_call(slave: str) -> Call:
    """Get status: what the KME holds and allows for keys shared with ``slave``."""
    return Call("GET", _sae_path(slave, "status"))


def enc_keys_call(slave: str, number: int | None = None, size: int | None = None,
                  additional_slave_sae_ids: Sequence[str] = (), *, post: bool = True
                  ) -> Call:
    """Get key: ``number`` keys of ``size`` bits shared with ``slave`` (None: the KME's
    default). POST carries a JSON body; GET a query string, which cannot name
    additional slaves."""
    if post:
        doc: dict = {k: v for k, v in (("number", number), ("size", size)) if v is not None}
        if additional_slave_sae_ids:
            doc["additional_slave_SAE_IDs"] = list(additional_slave_sae_ids)
        return Call("POST", _sae_path(slave, "enc_keys"), json.dumps(doc).encode())
    if additional_slave_sae_ids:
        raise ValueError("additional_slave_SAE_IDs travel in a POST body only")
    query = urlencode([(k, v) for k, v in (("number", number), ("size", size))
                       if v is not None])
    return Call("GET", _sae_path(slave, "enc_keys") + (f"?{query}" if query else ""))


def dec_keys_call(master: str, key_ids: Sequence[str], *, post: bool = True) -> Call:
    """Get key with key IDs: the keys ``master`` obtained under ``key_ids``. GET names
    exactly one key ID."""
    if post:
        body = json.dumps({"key_IDs": [{"key_ID": k} for k in key_ids]}).encode()
        return Call("POST", _sae_path(master, "dec_keys"), body)
    if len(key_ids) != 1:
        raise ValueError(f"a GET names one key_ID, not {len(key_ids)}")
    return Call("GET", _sae_path(master, "dec_keys") + "?" + urlencode({"key_ID": key_ids[0]}))


# ==== client side: answers in ==========================================================

class NotEnoughKey(Exception):
    """503: the KME has no key for us now; ask again later."""


class Refused(Exception):
    """400, 401 or another status: the KME will not do what we asked."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class BadAnswer(Exception):
    """A 200 whose body is not what the standard and our request say; its keys unused."""


def error_text(body: bytes) -> str:
    """The ``message`` of an ETSI Error body, shortened, printable; else a placeholder."""
    try:
        msg = json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return "(no ETSI error message)"
    if not isinstance(msg, str):
        return "(no ETSI error message)"
    return "".join(c if c.isprintable() else "?" for c in msg[:MAX_ERROR_TEXT])


def check_answer(status: int, body: bytes) -> None:
    """Nothing for a 200; NotEnoughKey for a 503; Refused for any other status."""
    if status == 200:
        return
    if status == 503:
        raise NotEnoughKey(error_text(body))
    raise Refused(status, error_text(body))


def parse_status(status: int, body: bytes) -> dict:
    """A Status answer's JSON object (NotEnoughKey, Refused or BadAnswer otherwise)."""
    check_answer(status, body)
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise BadAnswer(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadAnswer("the Status answer is not a JSON object")
    return doc


def _key(entry: object, key_bytes: int) -> tuple[str, bytes]:
    if not isinstance(entry, dict):
        raise BadAnswer("a key entry is not an object")
    kid = entry.get("key_ID")
    if not isinstance(kid, str) or not KEY_ID_RE.fullmatch(kid):
        raise BadAnswer(f"bad key entry: key_ID {str(kid)[:40]!r} is not a UUID")
    raw = entry.get("key")
    if not isinstance(raw, str):
        raise BadAnswer(f"bad key entry: key {kid} has no 'key' string")
    try:
        key = pybase64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error) as e:
        raise BadAnswer(f"bad key entry: key {kid} is not base64 ({e})") from None
    if len(key) != key_bytes:
        raise BadAnswer(f"key {kid} has {len(key) * 8} bits, asked for {key_bytes * 8}")
    return kid, key


def parse_key_container(body: bytes, number: int, key_bytes: int
                        ) -> list[tuple[str, bytes]]:
    """The (key_ID, key) pairs of a Key container, in its order: exactly ``number`` keys
    of ``key_bytes`` each under distinct UUIDs; BadAnswer for anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise BadAnswer(f"not JSON: {str(e)[:120]}") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise BadAnswer("no 'keys' array in the key container")
    if len(keys) != number:
        raise BadAnswer(f"{len(keys)} keys, asked for {number}")
    out = [_key(e, key_bytes) for e in keys]
    if len({k for k, _ in out}) != len(out):
        raise BadAnswer("the same key_ID twice in one answer")
    return out


def parse_enc_keys(status: int, body: bytes, number: int, key_bytes: int
                   ) -> list[tuple[str, bytes]]:
    """The (key_ID, key) pairs of a Get key answer: exactly ``number`` keys of
    ``key_bytes`` each, distinct UUIDs; raises NotEnoughKey, Refused or BadAnswer."""
    check_answer(status, body)
    return parse_key_container(body, number, key_bytes)


def parse_dec_keys(status: int, body: bytes, key_ids: Sequence[str], key_bytes: int
                   ) -> list[bytes]:
    """The keys of a Get key with key IDs answer, in the order of ``key_ids``, which it
    must hold exactly (any order, each once); raises NotEnoughKey, Refused or BadAnswer."""
    check_answer(status, body)
    got = dict(parse_key_container(body, len(key_ids), key_bytes))
    if set(got) != set(key_ids) or len(got) != len(key_ids):
        raise BadAnswer("the keys answered are not the keys asked for")
    return [got[k] for k in key_ids]
