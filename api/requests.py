"""ETSI GS QKD 014 V1.1.1 request validation, without I/O (module 4 groundwork).

The Sanic handlers hand this module what arrived (the query string's parameters or the
body's bytes) and get back a typed request, or an ``ApiError`` with the status code and
the message the standard names. Every request is refused whole on the first problem; no
exception other than ``ApiError`` leaves this module, whatever the input.

Choices the standard leaves open, stated here:
- Unknown query parameters and unknown JSON fields are refused (400): a misspelt
  ``nubmer`` silently becoming the default would hand out the wrong keys.
- ``extension_mandatory`` with any entry is refused ("not all extension_mandatory
  parameters are supported"): this KME supports none. ``extension_optional`` entries are
  accepted and ignored, which is what optional means.
- Integers must be JSON integers (not booleans, floats or strings) in a body, and plain
  decimal digits in a query string.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MAX_BODY = 1 << 20   # bytes of JSON a request may carry
SAE_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
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


# ---- pieces ---------------------------------------------------------------------------

def check_sae_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not SAE_ID_RE.fullmatch(value):
        raise bad(f"{what} must be an SAE ID (1-64 letters, digits, '_', '.', '-')")
    return value


def check_key_id(value: object) -> str:
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


# ---- the four request forms -----------------------------------------------------------

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
    ids = tuple(check_sae_id(x, "each of additional_slave_SAE_IDs") for x in extra)
    if len(ids) > limits.max_sae_id_count:
        raise bad(f"{len(ids)} additional_slave_SAE_IDs, max_SAE_ID_count is "
                  f"{limits.max_sae_id_count}")
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
