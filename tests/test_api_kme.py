"""The key API's answers without I/O (api.kme): who calls, where keys live, Status, the
key container, and store refusals as the standard's status codes."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.etsi import ApiError, EncKeysRequest, Limits, key_container, key_container_parts
from api.kme import Kme, store_refusal
from bench.topology import line, network, render, saes
from control.core.config import parse_topology

TOPO = render(
    network("k", "kme", gkm={"high_watermark": "64MiB"},
            api={"key_size": 512, "max_key_per_request": 100, "max_sae_id_count": 3}),
    line("ABC", 1, source=None),
    saes(("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B"), ("c1", "C")))


@pytest.fixture
def kme() -> Kme:
    return Kme.from_topology(parse_topology(TOPO), "A")


def _status(e: pytest.ExceptionInfo) -> int:
    return e.value.status


def test_limits_come_from_the_topology(kme):
    assert kme.limits == Limits(key_size=512, min_key_size=8, max_key_size=8 << 20,
                                max_key_per_request=100, max_sae_id_count=3)


def test_the_caller_is_a_known_sae_attached_to_this_node(kme):
    assert kme.caller("a1") == "a1"
    for cn, words in ((None, "client certificate is required"),
                      ("A", "not an SAE of this network"),     # a node's certificate
                      ("zz", "not an SAE of this network"),
                      ("b1", "attached to node B")):
        with pytest.raises(ApiError, match=words) as e:
            kme.caller(cn)
        assert _status(e) == 401
        assert cn not in kme.own_saes  # (counted in no SAE's connections: api.server)
    assert "a1" in kme.own_saes


def test_keys_live_with_the_slaves_node(kme):
    assert kme.slave_node("b1") == "B"
    assert kme.slave_node("b1", ["b2"]) == "B"
    assert kme.slave_node("c1") == "C"
    assert kme.master_node("c1") == "C"
    for args, words in ((("nobody",), "not known"), (("a2",), "attached to this node too"),
                        (("b1", ["c1"]), "attached to node C, not to B"),
                        (("b1", ["b2", "b1"]), "named in additional_slave_SAE_IDs too"),
                        (("b1", ["zz"]), "additional slave SAE 'zz' is not known")):
        with pytest.raises(ApiError, match=words) as e:
            kme.slave_node(*args)
        assert _status(e) == 400


def test_status_counts_keys_of_the_default_size(kme):
    s = kme.status("a1", "b1", kme.slave_node("b1"), usable_bytes=1000)
    assert s == {"source_KME_ID": "A", "target_KME_ID": "B", "master_SAE_ID": "a1",
                 "slave_SAE_ID": "b1", "key_size": 512, "stored_key_count": 1000 // 64,
                 "max_key_count": (64 << 20) // 64, "max_key_per_request": 100,
                 "max_key_size": 8 << 20, "min_key_size": 8, "max_SAE_ID_count": 1}


def test_max_sae_id_count_is_what_a_request_can_have_served(kme):
    """Additional slaves must share the slave's node: b1 can name b2 only, c1 no one,
    whatever the configured count (3 here)."""
    assert kme.status("a1", "b2", "B", 0)["max_SAE_ID_count"] == 1
    assert kme.status("a1", "c1", "C", 0)["max_SAE_ID_count"] == 0
    topo = parse_topology(TOPO + render(saes(*((f"b{i}", "B") for i in range(3, 9)))))
    assert Kme.from_topology(topo, "A").status("a1", "b1", "B", 0)["max_SAE_ID_count"] == 3


def test_one_answer_carries_at_most_64_MiB_of_key(kme):
    kme.check_enc(EncKeysRequest(64, 8 << 20))
    with pytest.raises(ApiError, match="above the 64 MiB") as e:
        kme.check_enc(EncKeysRequest(65, 8 << 20))
    assert _status(e) == 400


@given(st.lists(st.binary(max_size=40_000), min_size=1, max_size=5))
def test_the_key_container_is_json_with_every_key_in_base64(keys):
    ids = [f"00000000-0000-8000-8000-{i:012d}" for i in range(len(keys))]
    body = key_container(ids, [memoryview(k) for k in keys])
    doc = json.loads(body)
    assert [k["key_ID"] for k in doc["keys"]] == ids
    assert [base64.b64decode(k["key"], validate=True) for k in doc["keys"]] == keys
    parts = key_container_parts(ids, keys)
    assert b"".join(parts) == body
    # Large keys' base64 travels as its own piece; small pieces are joined.
    assert len(parts) == 1 + sum(len(k) >= 12 << 10 for k in keys)


def test_store_refusals_become_the_four_codes():
    assert store_refusal("short", "x", on_dec=False).status == 503
    assert "nothing was taken" in store_refusal("short", "x", on_dec=False).message
    assert store_refusal("unknown", "x", on_dec=True).message == \
        "one or more keys specified are not found on KME"
    assert store_refusal("unknown", "x", on_dec=True).status == 400
    assert store_refusal("unknown", "x", on_dec=False).status == 503
    assert store_refusal("forbidden", "x", on_dec=True).status == 401
    assert store_refusal("bad", "x", on_dec=True).status == 400
    for kind in ("busy", "unreachable", "anything else"):
        assert store_refusal(kind, "x", on_dec=False).status == 503

