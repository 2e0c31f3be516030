"""The local take protocol between a node's processes and its global key manager, as one
codec without I/O: what a client sends, how the manager reads and checks it, and how an
answer is written and read back.

A request is one JSON frame ``{"op": ..., ...}``; an answer is a JSON head
``{"ok": true, ...}`` plus, for takes, one frame with the keys' bytes concatenated in
order, or ``{"ok": false, "kind": ..., "error": ...}``. JSON through orjson: a key API
request is read and written several times on its way, and the json module's share of
that was larger than the key store's. The transport (a REQ socket in
``control.gkm.client``, a DEALER with request id frames in ``api.gkm_link``, the
manager's ROUTER) only moves these frames.

Takes carry ``deadline`` (``time.monotonic()``, CLOCK_MONOTONIC: one clock for every
process of the host): the manager takes nothing for a request it reads later. A dec take
may name its ``holder`` (the key API worker's process identity and its number for the
request), whose word on the answer (``answered``) settles the handing. A request the
manager cannot read or that breaks a rule is refused whole with kind "bad".
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from control.core.config import SAE_ID_RE
from control.gkm.carving import CarveError, KeySlice, decode
from control.gkm.errors import BadRequest, BusyError, StoreError, refused
from dataplane.limits import MAX_GLOBAL_BLOCK, MAX_RELAY_BLOCKS

MAX_TAKE_KEYS = 1 << 20       # keys one local request may take
TAKES = ("take_enc", "take_dec")  # the ops that carry a deadline

Holder = tuple[int, int]


# ---- requests, as clients build them --------------------------------------------------

@dataclass(frozen=True)
class Request:
    """A request ready to send: its op, the peer node it concerns ("" if none) and the
    JSON frame."""

    op: str
    peer: str
    body: bytes


def _request(op: str, about: str = "", **args: Any) -> Request:
    return Request(op, about, orjson.dumps({"op": op, **args}))


def take_enc(peer: str, number: int, size: int, deadline: float,
             slaves: list[str] | None = None, master: str = "") -> Request:
    """Cut ``number`` keys of ``size`` bytes for ``peer``; with ``slaves``, reserved at
    ``peer`` for those SAEs (taken by ``master``) before the answer comes."""
    if slaves is None:
        return _request("take_enc", peer, peer=peer, number=number, size=size,
                        deadline=deadline)
    return _request("take_enc", peer, peer=peer, number=number, size=size, slaves=slaves,
                    master=master, deadline=deadline)


def take_dec(peer: str, key_ids: list[str], sae: str, master: str | None, deadline: float,
             holder: Holder | None = None) -> Request:
    """Fetch keys from ``peer`` reserved here for ``sae``; with ``holder``, handed until
    the holder says what became of the answer (:func:`answered`)."""
    if holder is None:
        return _request("take_dec", peer, peer=peer, key_ids=key_ids, sae=sae,
                        master=master, deadline=deadline)
    return _request("take_dec", peer, peer=peer, key_ids=key_ids, sae=sae, master=master,
                    holder=list(holder), deadline=deadline)


def reserve(peer: str, key_ids: list[str], sae: str) -> Request:
    """Let ``sae`` fetch these keys from ``peer`` once (by hand: tools and tests)."""
    return _request("reserve", peer, peer=peer, key_ids=key_ids, sae=sae)


def answered(peer: str, key_ids: list[str], sae: str, holder: Holder,
             written: bool) -> Request:
    """The holder's word on the answer of a dec take: delivered whole, or lost."""
    return _request("answered", peer, peer=peer, key_ids=key_ids, sae=sae,
                    holder=list(holder), written=written)


def cancel(peer: str, key_ids: list[str]) -> Request:
    """Give back keys taken for ``peer`` whose taker gave up (cancelled there too)."""
    return _request("cancel", peer, peer=peer, key_ids=key_ids)


def stock(peer: str) -> Request:
    return _request("stock", peer, peer=peer)


def summary() -> Request:
    return _request("summary")


def digests(kind: str, peer: str) -> Request:
    return _request("digests", peer, kind=kind, peer=peer)


# ---- requests, as the manager reads them ----------------------------------------------

@dataclass(frozen=True)
class TakeEnc:
    peer: str
    number: int
    size: int
    deadline: float | None
    slaves: tuple[str, ...] | None = None  # None: keys for this node's own use
    master: str = ""


@dataclass(frozen=True)
class TakeDec:
    peer: str
    key_ids: list[str]
    sae: str
    master: str | None
    holder: Holder | None
    deadline: float | None


@dataclass(frozen=True)
class Reserve:
    peer: str
    key_ids: list[str]
    sae: str


@dataclass(frozen=True)
class Answered:
    peer: str
    key_ids: list[str]
    sae: str
    holder: Holder
    written: bool


@dataclass(frozen=True)
class Cancel:
    peer: str
    slices: list[KeySlice]


@dataclass(frozen=True)
class Stock:
    peer: str


@dataclass(frozen=True)
class Summary:
    pass


@dataclass(frozen=True)
class Digests:
    kind: str
    peer: str


Parsed = TakeEnc | TakeDec | Reserve | Answered | Cancel | Stock | Summary | Digests


@dataclass(frozen=True)
class Here:
    """What the manager checks requests against: this node, the nodes it originates key
    for (name -> node id), and the holders whose takes ended (their taker gave up)."""

    node: str
    node_id: int
    destinations: Mapping[str, int]
    ended: Container[Holder] = field(default_factory=frozenset)


class LateRequest(BusyError):
    """A take read after its taker had stopped waiting: nothing may be taken for it."""

    def __init__(self) -> None:
        super().__init__("the request reached the key manager after its taker had "
                         "stopped waiting; nothing was taken")


def bounded_int(req: dict, name: str, limit: int) -> int:
    v = req.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
        raise BadRequest(f"{name} must be an integer from 1 to {limit}")
    return v


def holder_of(req: dict) -> Holder | None:
    """A take_dec's holder (None: an older client, whose takes are final at once)."""
    h = req.get("holder")
    if h is None:
        return None
    if not (isinstance(h, list) and len(h) == 2
            and all(isinstance(x, int) and 0 < x < 1 << 63 for x in h)):
        raise BadRequest("holder is [process identity, request number], both > 0")
    return h[0], h[1]


def deadline_of(req: dict) -> float | None:
    """When the taker stops waiting for the answer, if it said."""
    v = req.get("deadline")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 1e12:
        raise BadRequest("deadline must be a time.monotonic() value")
    return float(v)


def malformed(e: BaseException) -> StoreError:
    """The refusal of a request that could not be read or served for want of a field."""
    return BadRequest(f"malformed request ({type(e).__name__})")


def parse_request(body: bytes, now: float, here: Here) -> Parsed:
    """Read and check one request, in the order the rules are applied; StoreError with
    its kind if refused (:class:`LateRequest` if its deadline is past at ``now``)."""
    try:
        return _parse(orjson.loads(body), now, here)
    except StoreError:
        raise
    except Exception as e:  # a bad request must never stop the key manager
        raise malformed(e) from None


def _is_sae_id(x: object) -> bool:
    """An SAE ID as the key API admits them: the store's records use bytes outside it as
    separators and markers (served, unconfirmed), so a name with them must never reach
    the store, whoever on the node sends it."""
    return isinstance(x, str) and SAE_ID_RE.fullmatch(x) is not None


def _parse(req: dict, now: float, here: Here) -> Parsed:
    op = req["op"]
    deadline = None
    if op in TAKES:
        deadline = deadline_of(req)
        if deadline is not None and now >= deadline:
            raise LateRequest()
    if op == "take_enc":
        number = bounded_int(req, "number", MAX_TAKE_KEYS)
        size = bounded_int(req, "size", MAX_GLOBAL_BLOCK - 1)
        slaves = req.get("slaves")
        if slaves is None:
            return TakeEnc(str(req["peer"]), number, size, deadline)
        if not isinstance(slaves, list) or not slaves or not all(map(_is_sae_id, slaves)):
            raise BadRequest("slaves must be a list of SAE IDs")
        master = req.get("master", "")
        if master != "" and not _is_sae_id(master):
            raise BadRequest("master must be an SAE ID")
        return TakeEnc(str(req["peer"]), number, size, deadline, tuple(slaves), master)
    if op in ("reserve", "take_dec", "answered") and not _is_sae_id(req["sae"]):
        raise BadRequest("sae must be an SAE ID")
    if op == "reserve":
        return Reserve(str(req["peer"]), [str(k) for k in req["key_ids"]], str(req["sae"]))
    if op == "take_dec":
        master = req.get("master")
        if master is not None and not _is_sae_id(master):
            raise BadRequest("master must be an SAE ID")
        holder = holder_of(req)
        if holder is not None and holder in here.ended:
            raise BusyError("the request's taker has stopped waiting for it; "
                            "nothing was taken")
        return TakeDec(str(req["peer"]), [str(k) for k in req["key_ids"]], str(req["sae"]),
                       None if master is None else str(master), holder, deadline)
    if op == "answered":
        ids, holder = req["key_ids"], holder_of(req)
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_TAKE_KEYS or holder is None:
            raise BadRequest("answered names key IDs and their holder")
        written = bool(req.get("written"))
        return Answered(str(req["peer"]), [str(k) for k in ids], str(req["sae"]), holder,
                        written)
    if op == "cancel":
        peer = str(req["peer"])
        ids = req["key_ids"]
        if peer not in here.destinations or not isinstance(ids, list) or \
                not 0 < len(ids) <= MAX_RELAY_BLOCKS:
            raise BadRequest(f"cancel names a peer and 1 to {MAX_RELAY_BLOCKS} "
                                    f"key IDs")
        try:
            slices = [decode(str(k)) for k in ids]
        except CarveError as e:
            raise BadRequest(f"cancel: {e}") from None
        if any((s.origin, s.destination) != (here.node_id, here.destinations[peer])
               for s in slices):
            raise BadRequest(f"cancel: a key ID of another pair than "
                                    f"{here.node} -> {peer}")
        return Cancel(peer, slices)
    if op == "stock":
        return Stock(str(req["peer"]))
    if op == "summary":
        return Summary()
    if op == "digests":
        return Digests(str(req["kind"]), str(req["peer"]))
    raise BadRequest(f"unknown operation {op!r}")


# ---- answers --------------------------------------------------------------------------

def encode_answer(head: dict, data: bytes | None = None) -> list[bytes]:
    """A request served: the head, and the keys' bytes if there are any."""
    reply = [orjson.dumps({"ok": True, **head}, option=orjson.OPT_NON_STR_KEYS)]
    if data is not None:
        reply.append(data)
    return reply


def encode_refusal(kind: str, error: str) -> list[bytes]:
    """A request refused whole, nothing taken."""
    return [orjson.dumps({"ok": False, "kind": kind, "error": error})]


def refusal(e: StoreError) -> list[bytes]:
    return encode_refusal(e.kind, str(e))


def decode_answer(head: bytes) -> dict:
    """An answer's head; a refusal is raised as StoreError with its kind."""
    doc = orjson.loads(head)
    if not doc.get("ok"):
        raise refused(doc.get("kind", "bad"), doc.get("error", "refused"))
    return doc


def taken_key_ids(head: bytes) -> list[str]:
    """The key IDs an answer hands out (none if it is a refusal or cannot be read): what
    to give back when the answer comes after its taker gave up."""
    try:
        doc = orjson.loads(head)
    except ValueError:
        return []
    return (doc.get("key_ids") if doc.get("ok") else None) or []


def split_keys(sizes: list[int], data):
    """Consecutive keys of ``sizes`` out of ``data`` (bytes, or a memoryview: no copy)."""
    out, at = [], 0
    for n in sizes:
        out.append(data[at:at + n])
        at += n
    return out
