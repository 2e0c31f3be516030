"""The global key manager's refusals, shared by the store, the manager and every client on
the node (the key API, the demo): a request is refused whole and nothing changes.

Each refusal has a ``kind``, the word the manager's replies carry and the key API maps to a
status code (``api/kme.py``). There is one subclass per kind, so callers tell refusals
apart by type or by ``kind``, never by their message; a refusal read off the wire becomes
its kind's class again (:func:`refused`), or a plain :class:`StoreError` for a kind this
code does not know.
"""

from __future__ import annotations

from typing import ClassVar


class StoreError(Exception):
    """A request refused whole; nothing changed. ``kind`` says why, for the caller."""

    def __init__(self, kind: str, message: str):
        self.kind = kind
        super().__init__(message)


class StoreFailed(Exception):
    """The key store could not write (a full or failing disk). Not a refusal: the rules
    had already changed the in-memory index when the write failed, so nothing this
    process holds in memory may be answered from any more. The store refuses every later
    write and every answer drawn from that index, and the key manager stops, to be
    restarted by its node from what the disk holds."""


class _KindError(StoreError):
    """A refusal whose class names its kind: constructed from the message alone."""

    KIND: ClassVar[str]

    def __init__(self, message: str):
        super().__init__(self.KIND, message)


class ShortError(_KindError):
    """Not enough usable key for the request (the key API answers 503)."""

    KIND = "short"


class UnknownError(_KindError):
    """No such key, peer or store here, or a key already delivered (or not issued to the
    master SAE named)."""

    KIND = "unknown"


class ForbiddenError(_KindError):
    """The key exists but is reserved for other SAEs."""

    KIND = "forbidden"


class BadRequest(_KindError):
    """The request itself is malformed or impossible (a key ID named twice, keys larger
    than any block, a reservation beyond the blocks held)."""

    KIND = "bad"


class BusyError(_KindError):
    """The store or the key manager cannot serve now (another process holds the store, a
    taker's deadline passed)."""

    KIND = "busy"


class PendingError(_KindError):
    """The key's reservation is not yet confirmed by the master's key manager."""

    KIND = "pending"


class DeliveringError(_KindError):
    """An answer carrying the key to the same SAE is being written on another connection;
    handing it again now could deliver it twice."""

    KIND = "delivering"


KINDS: dict[str, type[_KindError]] = {c.KIND: c for c in (
    ShortError, UnknownError, ForbiddenError, BadRequest, BusyError, PendingError,
    DeliveringError)}


def refused(kind: str, message: str) -> StoreError:
    """The refusal of ``kind`` with ``message``, as its class."""
    cls = KINDS.get(kind)
    return cls(message) if cls is not None else StoreError(kind, message)
