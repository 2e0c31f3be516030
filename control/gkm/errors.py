"""The global key manager's refusals, shared by the store, the manager and every client on
the node (the key API, the demo): a request is refused whole and nothing changes."""

from __future__ import annotations


class StoreError(Exception):
    """A request refused whole; nothing changed. ``kind`` says why, for the caller."""

    def __init__(self, kind: str, message: str):
        self.kind = kind  # "short" (not enough key), "unknown", "forbidden", "bad"
        super().__init__(message)
