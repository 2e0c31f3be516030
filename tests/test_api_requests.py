"""ETSI GS QKD 014 request validation (pure): every form, every refusal, and fuzzing."""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.requests import (
    ApiError,
    DecKeysRequest,
    EncKeysRequest,
    Limits,
    check_path_sae,
    dec_keys_get,
    dec_keys_post,
    enc_keys_get,
    enc_keys_post,
)

L = Limits(key_size=256, min_key_size=8, max_key_size=8192, max_key_per_request=16,
           max_sae_id_count=2)
K1, K2 = str(uuid.uuid4()), str(uuid.uuid4())


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
    (j({"key_IDs": [{"key_ID": str(uuid.uuid4())} for _ in range(17)]}),
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
