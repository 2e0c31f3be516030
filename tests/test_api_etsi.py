"""ETSI GS QKD 014 (api/etsi.py, pure), both roles: the server's request parsing (every
form, every refusal, fuzzing); the client's requests parsed by the server's code; the
server's key container read by the client's code, and malformed containers refused whole.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.etsi import (
    BASE_PATH,
    ApiError,
    BadAnswer,
    Call,
    DecKeysRequest,
    EncKeysRequest,
    Limits,
    NotEnoughKey,
    Refused,
    check_path_sae,
    dec_keys_call,
    dec_keys_get,
    dec_keys_post,
    enc_keys_call,
    enc_keys_get,
    enc_keys_post,
    error_text,
    key_container,
    key_container_parts,
    parse_dec_keys,
    parse_enc_keys,
    parse_key_container,
    parse_status,
    status_call,
)

L = Limits(key_size=256, min_key_size=8, max_key_size=8192, max_key_per_request=16,
           max_sae_id_count=2)
# Fixed, so every pytest-xdist worker collects the same test ids.
K1, K2 = "8f1c2b3a-4d5e-4f60-8a7b-9c0d1e2f3a4b", "1a2b3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d"


def refused(fn, arg, message: str) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(arg, L)
    assert e.value.status == 400
    assert message in e.value.message, e.value.message
    return e.value


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def test_enc_keys_get_defaults_and_values():
    assert enc_keys_get({}, L) == EncKeysRequest(1, 256)
    assert enc_keys_get({"number": ["3"], "size": ["1024"]}, L) == EncKeysRequest(3, 1024)
    assert enc_keys_get({"size": ["8"]}, L).size_bytes == 1


@pytest.mark.parametrize("query, message", [
    ({"size": ["12"]}, "size shall be a multiple of 8"),
    ({"size": ["0"]}, "outside [8, 8192]"),
    ({"size": ["8200"]}, "outside [8, 8192]"),
    ({"number": ["0"]}, "at least 1"),
    ({"number": ["17"]}, "above max_key_per_request (16)"),
    ({"number": ["-1"]}, "non-negative integer"),
    ({"number": ["1.5"]}, "non-negative integer"),
    ({"number": [""]}, "non-negative integer"),
    ({"number": ["1", "2"]}, "given 2 times"),
    ({"nubmer": ["1"]}, "unknown query parameter 'nubmer'"),
    ({"key_ID": [K1]}, "unknown query parameter"),
])
def test_enc_keys_get_refusals(query, message):
    refused(enc_keys_get, query, message)


def test_enc_keys_post_fields():
    assert enc_keys_post(j({}), L) == EncKeysRequest(1, 256)
    r = enc_keys_post(j({"number": 2, "size": 512, "additional_slave_SAE_IDs": ["s2", "s3"],
                         "extension_optional": [{"x": 1}]}), L)
    assert r == EncKeysRequest(2, 512, ("s2", "s3"))


@pytest.mark.parametrize("body, message", [
    (b"", "body missing"),
    (None, "body missing"),
    (b"{", "malformed JSON"),
    (b"\xff\xfe", "malformed JSON"),
    (b"[1]", "must be a JSON object"),
    (j({"number": True}), "number must be an integer"),
    (j({"number": 1.0}), "number must be an integer"),
    (j({"size": "256"}), "size must be an integer"),
    (j({"size": 100}), "size shall be a multiple of 8"),
    (j({"number": 99}), "above max_key_per_request"),
    (j({"additional_slave_SAE_IDs": "s2"}), "must be an array of SAE IDs"),
    (j({"additional_slave_SAE_IDs": ["s2", 3]}), "must be an SAE ID"),
    (j({"additional_slave_SAE_IDs": ["a b"]}), "must be an SAE ID"),
    (j({"additional_slave_SAE_IDs": ["s1", "s2", "s3"]}), "max_SAE_ID_count is 2"),
    (j({"additional_slave_SAE_IDs": [5] * 200_000}), "200000 additional_slave_SAE_IDs"),
    (j({"additional_slave_SAE_IDs": ["s1", "s1"]}), "named twice"),
    (j({"extension_mandatory": [{"abc": 1}]}),
     "not all extension_mandatory parameters are supported"),
    (j({"extension_mandatory": {}}), "must be an array of objects"),
    (j({"extension_optional": [1]}), "must be an array of objects"),
    (j({"Number": 1}), "unknown field 'Number'"),
    (b"[" * 100000 + b"]" * 100000, "malformed JSON"),
    (b" " * ((1 << 20) + 1), "larger than"),
])
def test_enc_keys_post_refusals(body, message):
    refused(enc_keys_post, body, message)


def test_dec_keys_get_and_post():
    assert dec_keys_get({"key_ID": [K1]}, L) == DecKeysRequest((K1,))
    assert dec_keys_get({"key_ID": [K1.upper()]}, L) == DecKeysRequest((K1,))
    r = dec_keys_post(j({"key_IDs": [{"key_ID": K1}, {"key_ID": K2, "key_ID_extension": {}}],
                         "key_IDs_extension": {}}), L)
    assert r == DecKeysRequest((K1, K2))


@pytest.mark.parametrize("query, message", [
    ({}, "key_ID is required"),
    ({"key_ID": ["not-a-uuid"]}, "is not a UUID"),
    ({"key_ID": [K1.replace("-", "")]}, "canonical form"),
    ({"key_ID": ["{" + K1 + "}"]}, "canonical form"),
    ({"key_ID": [K1, K2]}, "given 2 times"),
    ({"key_ID": [K1], "number": ["1"]}, "unknown query parameter"),
])
def test_dec_keys_get_refusals(query, message):
    refused(dec_keys_get, query, message)


@pytest.mark.parametrize("body, message", [
    (j({}), "key_IDs must be a non-empty array"),
    (j({"key_IDs": []}), "key_IDs must be a non-empty array"),
    (j({"key_IDs": K1}), "key_IDs must be a non-empty array"),
    (j({"key_IDs": [K1]}), "an object with a key_ID"),
    (j({"key_IDs": [{"key_id": K1}]}), "an object with a key_ID"),
    (j({"key_IDs": [{"key_ID": K1, "x": 1}]}), "unknown field 'x'"),
    (j({"key_IDs": [{"key_ID": K1, "key_ID_extension": 3}]}), "must be an object"),
    (j({"key_IDs": [{"key_ID": K1}], "key_IDs_extension": []}), "must be an object"),
    (j({"key_IDs": [{"key_ID": 5}]}), "must be a UUID string"),
    (j({"key_IDs": [{"key_ID": K1}, {"key_ID": K1.upper()}]}), "named twice"),
    (j({"key_IDs": [{"key_ID": str(uuid.UUID(int=i, version=4))} for i in range(17)]}),
     "above max_key_per_request"),
])
def test_dec_keys_post_refusals(body, message):
    refused(dec_keys_post, body, message)


def test_path_sae_and_error_bodies():
    assert check_path_sae("SAE-1.b_2") == "SAE-1.b_2"
    with pytest.raises(ApiError) as e:
        check_path_sae("a/b")
    assert e.value.body() == {"message": e.value.message}
    with pytest.raises(ValueError, match="no status 404"):
        ApiError(404, "not found")


# ---- fuzzing: whatever arrives, either a valid request or a 400 --------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**10) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)
fields = st.sampled_from(["number", "size", "additional_slave_SAE_IDs",
                          "extension_mandatory", "extension_optional", "key_IDs",
                          "key_ID", "key_IDs_extension", "x"])
bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(fields, json_values | st.integers(0, 9000), max_size=5).map(j),
    st.lists(st.fixed_dictionaries({"key_ID": st.uuids().map(str) | st.text(max_size=40)}),
             max_size=20).map(lambda ks: j({"key_IDs": ks})),
)
queries = st.dictionaries(st.sampled_from(["number", "size", "key_ID", "x"]),
                          st.lists(st.text(max_size=40) | st.integers(0, 10**6).map(str),
                                   min_size=1, max_size=2), max_size=3)


@settings(max_examples=400)
@given(bodies)
def test_any_body_is_a_valid_request_or_a_400(body):
    for fn in (enc_keys_post, dec_keys_post):
        try:
            r = fn(body, L)
        except ApiError as e:
            assert e.status == 400 and e.message
            continue
        if isinstance(r, EncKeysRequest):
            assert 1 <= r.number <= 16 and r.size % 8 == 0 and 8 <= r.size <= 8192
        else:
            assert 1 <= len(r.key_ids) <= 16 and len(set(r.key_ids)) == len(r.key_ids)


@settings(max_examples=400)
@given(queries)
def test_any_query_is_a_valid_request_or_a_400(query):
    for fn in (enc_keys_get, dec_keys_get):
        try:
            fn(query, L)
        except ApiError as e:
            assert e.status == 400 and e.message


# ---- client requests, read by the server's code ------------------------------------------

def served(call: Call, what: str):
    """What the key API's handler for ``what`` makes of ``call``: the path's SAE ID and
    the typed request (None for status), as api.server routes and parses it."""
    u = urlsplit(call.path)
    head, sae, tail = u.path.rsplit("/", 2)
    assert head == BASE_PATH and tail == what
    sae = check_path_sae(unquote(sae))
    query = parse_qs(u.query, keep_blank_values=True, strict_parsing=True) if u.query else {}
    if what == "status":
        assert call.method == "GET" and call.body is None and not query
        return sae, None
    get, post = {"enc_keys": (enc_keys_get, enc_keys_post),
                 "dec_keys": (dec_keys_get, dec_keys_post)}[what]
    if call.method == "GET":
        assert call.body is None
        return sae, get(query, L)
    assert call.method == "POST" and not query
    return sae, post(call.body, L)


def test_each_request_kind_built_by_the_client_is_parsed_back_by_the_server():
    assert served(status_call("SAE-B"), "status") == ("SAE-B", None)
    for post in (True, False):
        assert served(enc_keys_call("s.1", 3, 512, post=post), "enc_keys") == \
            ("s.1", EncKeysRequest(3, 512))
        assert served(enc_keys_call("s.1", post=post), "enc_keys") == \
            ("s.1", EncKeysRequest(1, 256))  # the KME's defaults
        assert served(dec_keys_call("m_2", (K1.upper(),), post=post), "dec_keys") == \
            ("m_2", DecKeysRequest((K1,)))
    assert served(enc_keys_call("s1", 2, 8, ("s2", "s3")), "enc_keys") == \
        ("s1", EncKeysRequest(2, 8, ("s2", "s3")))
    assert served(dec_keys_call("m", (K1, K2)), "dec_keys") == ("m", DecKeysRequest((K1, K2)))


@settings(max_examples=200)
@given(st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True), st.integers(1, 16),
       st.integers(1, 1024).map(lambda b: b * 8),
       st.lists(st.uuids().map(str), min_size=1, max_size=16, unique=True), st.booleans())
def test_any_valid_request_survives_the_round_trip(sae, number, size, ids, post):
    if size <= L.max_key_size:
        assert served(enc_keys_call(sae, number, size, post=post), "enc_keys") == \
            (sae, EncKeysRequest(number, size))
    assert served(dec_keys_call(sae, ids), "dec_keys") == (sae, DecKeysRequest(tuple(ids)))
    assert served(status_call(sae), "status") == (sae, None)


def test_requests_the_standard_cannot_carry_are_not_built():
    with pytest.raises(ValueError, match="POST body only"):
        enc_keys_call("s1", 1, 8, ("s2",), post=False)
    with pytest.raises(ValueError, match="one key_ID"):
        dec_keys_call("m", (K1, K2), post=False)
    # A path separator in an SAE ID stays inside its path segment (and is refused there).
    with pytest.raises(ApiError, match="must be an SAE ID"):
        served(status_call("a/b"), "status")


# ---- key containers: written by the server, read by the client ----------------------------

def _keys(n: int, size: int = 32) -> list[tuple[str, bytes]]:
    return [(str(uuid.uuid4()), os.urandom(size)) for _ in range(n)]


def _container(keys: list[tuple[str, bytes]]) -> bytes:
    """A container written independently of api.etsi's encoder."""
    return json.dumps({"keys": [{"key_ID": k, "key": base64.b64encode(v).decode()}
                                for k, v in keys]}).encode()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.sampled_from([1, 32, 1000, 12 << 10, 40_000]))
def test_a_key_container_round_trips_from_server_to_client(number, size):
    keys = _keys(number, size)
    ids, raw = [k for k, _ in keys], [v for _, v in keys]
    parts = key_container_parts(ids, [memoryview(v) for v in raw])
    body = b"".join(parts)
    assert body == key_container(ids, raw)
    assert parse_key_container(body, number, size) == keys
    assert parse_enc_keys(200, body, number, size) == keys
    order = ids[::-1]
    assert parse_dec_keys(200, body, order, size) == raw[::-1]
    # A key of the wrong size or a count other than asked: the whole answer is refused.
    with pytest.raises(BadAnswer, match="bits, asked for"):
        parse_key_container(body, number, size + 1)
    with pytest.raises(BadAnswer, match="asked for"):
        parse_key_container(body, number + 1, size)


def test_the_key_container_is_standard_json():
    keys = _keys(2, 5)
    doc = json.loads(key_container([k for k, _ in keys], [v for _, v in keys]))
    assert doc == json.loads(_container(keys))


def test_enc_keys_answer_taken_whole_or_not_at_all():
    keys = _keys(3)
    assert parse_enc_keys(200, _container(keys), 3, 32) == keys
    with pytest.raises(NotEnoughKey, match="not enough"):
        parse_enc_keys(503, b'{"message": "not enough key material"}', 3, 32)
    with pytest.raises(Refused, match="HTTP 401: who are you") as e:
        parse_enc_keys(401, b'{"message": "who are you"}', 3, 32)
    assert e.value.status == 401
    with pytest.raises(Refused, match="no ETSI error message"):
        parse_enc_keys(400, b"<html>", 3, 32)
    # Extension fields are accepted and ignored; a key_ID keeps its letter case.
    upper = [(keys[0][0].upper(), keys[0][1])]
    doc = json.loads(_container(upper))
    doc["key_container_extension"] = {"x": 1}
    doc["keys"][0]["key_extension"] = {"y": 2}
    assert parse_enc_keys(200, json.dumps(doc).encode(), 1, 32) == upper


k0 = _keys(1)[0]
MALFORMED = {
    "truncated": (_container([k0])[:-5], "not JSON"),
    "not JSON": (b"\xff{", "not JSON"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    "too few": (_container([]), "0 keys, asked for 1"),
    "too many": (_container([k0, *_keys(1)]), "2 keys, asked for 1"),
    "short key": (_container([(k0[0], k0[1][:31])]), "248 bits, asked for 256"),
    "long key": (_container([(k0[0], k0[1] + b"x")]), "264 bits, asked for 256"),
    "not a uuid": (_container([("nope", k0[1])]), "'nope' is not a UUID"),
    "uuid not canonical": (_container([(k0[0].replace("-", ""), k0[1])]), "not a UUID"),
    "key_ID missing": (json.dumps({"keys": [{"key": "AAAA"}]}).encode(), "not a UUID"),
    "key_ID a number": (json.dumps({"keys": [{"key_ID": 5, "key": "AAAA"}]}).encode(),
                        "not a UUID"),
    "key missing": (json.dumps({"keys": [{"key_ID": k0[0]}]}).encode(), "no 'key' string"),
    "key not a string": (json.dumps({"keys": [{"key_ID": k0[0], "key": 7}]}).encode(),
                         "no 'key' string"),
    "bad base64": (_container([k0]).replace(b'"key": "', b'"key": "!', 1), "not base64"),
    "base64 padding": (_container([k0]).replace(b'=",', b'",').replace(b'="', b'"'),
                       "not base64"),
    "non-ASCII key": (json.dumps({"keys": [{"key_ID": k0[0], "key": "é" * 4}]}).encode(),
                      "not base64"),
    "no keys": (b'{"key_container_extension": {}}', "no 'keys' array"),
    "keys not an array": (b'{"keys": {}}', "no 'keys' array"),
    "not an object": (b"[1, 2, 3]", "no 'keys' array"),
    "entry not an object": (b'{"keys": [1]}', "not an object"),
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_key_container_is_refused_whole_with_what_is_wrong(what):
    body, words = MALFORMED[what]
    with pytest.raises(BadAnswer, match=words):
        parse_key_container(body, 1, 32)


def test_a_key_id_twice_in_one_container_is_refused():
    twice = _container([k0, (k0[0], os.urandom(32))])
    with pytest.raises(BadAnswer, match="the same key_ID twice"):
        parse_key_container(twice, 2, 32)


def test_dec_keys_answer_in_the_order_asked():
    keys = _keys(4)
    ids = tuple(k for k, _ in keys)
    shuffled = [keys[2], keys[0], keys[3], keys[1]]
    assert parse_dec_keys(200, _container(shuffled), ids, 32) == [v for _, v in keys]
    for body in (_container(keys[:3]), _container(keys[:3] + _keys(1)),
                 _container(keys[:3] + keys[:1])):
        with pytest.raises(BadAnswer):
            parse_dec_keys(200, body, ids, 32)
    with pytest.raises(Refused, match="not found"):
        parse_dec_keys(400, b'{"message": "one or more keys specified are not found on KME"}',
                       ids, 32)


def test_status_answers_and_error_texts():
    assert parse_status(200, b'{"key_size": 256}') == {"key_size": 256}
    with pytest.raises(BadAnswer, match="not a JSON object"):
        parse_status(200, b"[]")
    with pytest.raises(BadAnswer, match="not JSON"):
        parse_status(200, b"{")
    with pytest.raises(NotEnoughKey):
        parse_status(503, b"{}")
    # The KME's own words, printable and shortened: they end up in logs.
    assert error_text(json.dumps({"message": "a\nb" + "x" * 500}).encode()) == \
        "a?b" + "x" * 197
    assert error_text(b'{"message": 5}') == "(no ETSI error message)"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.integers() | st.text(max_size=40) | st.booleans(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["keys", "key_ID", "key", "x"]), c, max_size=3),
    max_leaves=10).map(lambda d: json.dumps(d).encode()))
def test_a_fuzzed_answer_is_refused_or_exactly_what_was_asked(body):
    try:
        keys = parse_enc_keys(200, body, 2, 4)
    except BadAnswer:
        return
    assert len(keys) == 2 and all(len(v) == 4 for _, v in keys)
