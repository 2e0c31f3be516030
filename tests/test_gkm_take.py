"""The local take protocol (control/gkm/take.py): every request a client builds reads back
as the manager parses it, malformed or rule-breaking requests are refused with their
messages, and answers round-trip (a refusal as StoreError with its kind)."""

from __future__ import annotations

import json

import pytest

from control.gkm import take
from control.gkm.carving import KeySlice
from control.gkm.errors import KINDS, StoreError
from dataplane.limits import MAX_GLOBAL_BLOCK, MAX_RELAY_BLOCKS

A, B = 1, 2
HERE = take.Here("A", A, {"B": B}, ended={(7, 8)})
NOW = 100.0


def key_id(seq: int = 0, origin: int = A, destination: int = B) -> str:
    return str(KeySlice(origin, destination, seq, 0, 32).key_id)


def parse(req: take.Request | bytes | dict, now: float = NOW) -> take.Parsed:
    body = req.body if isinstance(req, take.Request) else \
        req if isinstance(req, bytes) else json.dumps(req).encode()
    return take.parse_request(body, now, HERE)


def refused(req, kind: str = "bad", now: float = NOW) -> str:
    with pytest.raises(StoreError) as e:
        parse(req, now)
    assert e.value.kind == kind
    return str(e.value)


def test_every_request_reads_back_as_built():
    ids = [key_id(0), key_id(1)]
    assert parse(take.take_enc("B", 3, 32, 150.0)) == take.TakeEnc("B", 3, 32, 150.0)
    assert parse(take.take_enc("B", 3, 32, 150.0, ["s1", "s2"], "m")) == \
        take.TakeEnc("B", 3, 32, 150.0, ("s1", "s2"), "m")
    assert parse(take.take_dec("B", ids, "s1", None, 150.0)) == \
        take.TakeDec("B", ids, "s1", None, None, 150.0)
    assert parse(take.take_dec("B", ids, "s1", "m", 150.0, holder=(5, 6))) == \
        take.TakeDec("B", ids, "s1", "m", (5, 6), 150.0)
    assert parse(take.reserve("B", ids, "s1")) == take.Reserve("B", ids, "s1")
    for written in (True, False):
        assert parse(take.answered("B", ids, "s1", (5, 6), written)) == \
            take.Answered("B", ids, "s1", (5, 6), written)
    got = parse(take.cancel("B", ids))
    assert isinstance(got, take.Cancel) and got.peer == "B"
    assert [str(s.key_id) for s in got.slices] == ids
    assert parse(take.stock("B")) == take.Stock("B")
    assert parse(take.summary()) == take.Summary()
    assert parse(take.digests("dec", "B")) == take.Digests("dec", "B")


def _compact(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def test_requests_are_compact_json_and_name_their_op_and_peer():
    """The frames as the manager has always read them (the same fields, in the same
    order), written without spaces."""
    r = take.take_enc("B", 3, 32, 1.5, ["s1"], "m")
    assert (r.op, r.peer) == ("take_enc", "B")
    assert r.body == _compact({"op": "take_enc", "peer": "B", "number": 3, "size": 32,
                               "slaves": ["s1"], "master": "m", "deadline": 1.5})
    assert take.take_dec("B", ["k"], "s", "m", 1.5, (5, 6)).body == _compact(
        {"op": "take_dec", "peer": "B", "key_ids": ["k"], "sae": "s", "master": "m",
         "holder": [5, 6], "deadline": 1.5})
    assert take.take_dec("B", ["k"], "s", None, 1.5).body == _compact(
        {"op": "take_dec", "peer": "B", "key_ids": ["k"], "sae": "s", "master": None,
         "deadline": 1.5})
    assert take.answered("B", ["k"], "s", (5, 6), False).body == _compact(
        {"op": "answered", "peer": "B", "key_ids": ["k"], "sae": "s", "holder": [5, 6],
         "written": False})
    assert take.cancel("B", ["k"]).body == b'{"op":"cancel","peer":"B","key_ids":["k"]}'
    assert take.summary().body == b'{"op":"summary"}' and take.summary().peer == ""
    assert take.digests("enc", "B").body == b'{"op":"digests","kind":"enc","peer":"B"}'
    # A deadline keeps every digit of its time.monotonic() value.
    t = 123456.78901234567
    assert json.loads(take.take_enc("B", 1, 1, t).body)["deadline"] == t


@pytest.mark.parametrize(("req", "message"), [
    (b"[" * 100_000, "malformed request (JSONDecodeError)"),
    (b"\xff", "malformed request (JSONDecodeError)"),
    (b'{"op": "take_enc", "peer": "B", "number": NaN, "size": 32}',
     "malformed request (JSONDecodeError)"),
    (b"{", "malformed request (JSONDecodeError)"),
    (b"{}", "malformed request (KeyError)"),
    (b"[1]", "malformed request (TypeError)"),
    ({"op": "nothing"}, "unknown operation 'nothing'"),
    ({"op": "take_enc", "peer": "B", "number": 1.5, "size": 32},
     f"number must be an integer from 1 to {take.MAX_TAKE_KEYS}"),
    ({"op": "take_enc", "peer": "B", "number": True, "size": 32},
     f"number must be an integer from 1 to {take.MAX_TAKE_KEYS}"),
    ({"op": "take_enc", "peer": "B", "number": take.MAX_TAKE_KEYS + 1, "size": 32},
     f"number must be an integer from 1 to {take.MAX_TAKE_KEYS}"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": MAX_GLOBAL_BLOCK},
     f"size must be an integer from 1 to {MAX_GLOBAL_BLOCK - 1}"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 0},
     f"size must be an integer from 1 to {MAX_GLOBAL_BLOCK - 1}"),
    ({"op": "take_enc", "number": 1, "size": 32}, "malformed request (KeyError)"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "slaves": []},
     "slaves must be a list of SAE IDs"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "slaves": ["a\nb"]},
     "slaves must be a list of SAE IDs"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "slaves": [""]},
     "slaves must be a list of SAE IDs"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "slaves": ["s"],
      "master": 5}, "master must be an SAE ID"),
    # Bytes the store's records use as markers ("\x00" served, "\x01" unconfirmed) never
    # reach it in a name, from whichever process on the node.
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "slaves": ["\x00s"]},
     "slaves must be a list of SAE IDs"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "slaves": ["s"],
      "master": "\x01x"}, "master must be an SAE ID"),
    ({"op": "take_dec", "peer": "B", "key_ids": [], "sae": "a\nb"}, "sae must be an SAE ID"),
    ({"op": "take_dec", "peer": "B", "key_ids": [], "sae": "s", "master": "\x00"},
     "master must be an SAE ID"),
    ({"op": "reserve", "peer": "B", "key_ids": [], "sae": ""}, "sae must be an SAE ID"),
    ({"op": "answered", "peer": "B", "key_ids": ["k"], "sae": 5, "holder": [1, 2]},
     "sae must be an SAE ID"),
    ({"op": "take_enc", "peer": "B", "number": 1, "size": 32, "deadline": "soon"},
     "deadline must be a time.monotonic() value"),
    ({"op": "take_dec", "peer": "B", "key_ids": [], "sae": "s", "deadline": True},
     "deadline must be a time.monotonic() value"),
    ({"op": "take_dec", "peer": "B", "key_ids": [], "sae": "s", "holder": [1]},
     "holder is [process identity, request number], both > 0"),
    ({"op": "take_dec", "peer": "B", "key_ids": [], "sae": "s", "holder": [0, 1]},
     "holder is [process identity, request number], both > 0"),
    ({"op": "take_dec", "peer": "B", "key_ids": 5, "sae": "s"},
     "malformed request (TypeError)"),
    ({"op": "answered", "peer": "B", "key_ids": ["k"], "sae": "s"},
     "answered names key IDs and their holder"),
    ({"op": "answered", "peer": "B", "key_ids": [], "sae": "s", "holder": [1, 2]},
     "answered names key IDs and their holder"),
    ({"op": "cancel", "peer": "C", "key_ids": ["k"]},
     f"cancel names a peer and 1 to {MAX_RELAY_BLOCKS} key IDs"),
    ({"op": "cancel", "peer": "B", "key_ids": ["k"] * (MAX_RELAY_BLOCKS + 1)},
     f"cancel names a peer and 1 to {MAX_RELAY_BLOCKS} key IDs"),
    ({"op": "cancel", "peer": "B", "key_ids": [key_id(0, origin=B, destination=A)]},
     "cancel: a key ID of another pair than A -> B"),
    ({"op": "reserve", "peer": "B", "sae": "s"}, "malformed request (KeyError)"),
])
def test_bad_requests_are_refused_with_their_messages(req, message):
    assert refused(req) == message


def test_a_cancel_of_a_key_id_that_is_no_key_id_says_why():
    assert refused({"op": "cancel", "peer": "B", "key_ids": ["nonsense"]}).startswith(
        "cancel: ")


def test_a_take_read_after_its_deadline_takes_nothing():
    for req in (take.take_enc("B", 1, 32, NOW), take.take_dec("B", ["k"], "s", None, NOW)):
        with pytest.raises(take.LateRequest) as e:
            parse(req)
        assert e.value.kind == "busy" and str(e.value) == (
            "the request reached the key manager after its taker had stopped waiting; "
            "nothing was taken")
        assert parse(req, now=NOW - 0.001)  # just in time
    # Lateness is checked before anything else the take says.
    assert refused({"op": "take_enc", "deadline": 1.0}, "busy").startswith("the request")


def test_a_dec_take_whose_taker_gave_up_is_refused():
    req = take.take_dec("B", ["k"], "s", None, 150.0, holder=(7, 8))
    assert refused(req, "busy") == ("the request's taker has stopped waiting for it; "
                                    "nothing was taken")
    assert parse(take.take_dec("B", ["k"], "s", None, 150.0, holder=(7, 9)))


def test_answers_round_trip_and_refusals_raise_their_kind():
    frames = take.encode_answer({"key_ids": ["k1"], "rseq": 3}, b"keys")
    assert frames[1] == b"keys"
    assert take.decode_answer(frames[0]) == {"ok": True, "key_ids": ["k1"], "rseq": 3}
    assert take.encode_answer({"settled": True}) == [b'{"ok":true,"settled":true}']
    assert take.taken_key_ids(frames[0]) == ["k1"]
    for e in (StoreError("short", "not enough key"), take.LateRequest(),
              take.malformed(KeyError("op"))):
        (head,) = take.refusal(e)
        with pytest.raises(StoreError) as got:
            take.decode_answer(head)
        assert (got.value.kind, str(got.value)) == (e.kind, str(e))
        assert type(got.value) is KINDS[e.kind]  # its kind's class again, off the wire
        assert take.taken_key_ids(head) == []
    with pytest.raises(StoreError) as got:  # a kind this code does not know: kept as said
        take.decode_answer(b'{"ok": false, "kind": "new", "error": "x"}')
    assert type(got.value) is StoreError and got.value.kind == "new"
    with pytest.raises(StoreError) as got:  # a head that says nothing: refused, "bad"
        take.decode_answer(b'{"ok": false}')
    assert (got.value.kind, str(got.value)) == ("bad", "refused")
    assert take.taken_key_ids(b"\xff{") == []


def test_split_keys_cuts_consecutive_keys_without_copying():
    data = memoryview(bytes(range(10)))
    keys = take.split_keys([3, 0, 7], data)
    assert [bytes(k) for k in keys] == [bytes(range(3)), b"", bytes(range(3, 10))]
    assert all(isinstance(k, memoryview) for k in keys)

