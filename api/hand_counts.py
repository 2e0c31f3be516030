"""The key API workers' hand counts, shared with their manager: one row of counters per
worker slot in memory mapped before the workers are forked, so that the manager can
publish the totals (``api.json``: ``qkdctl status``, metrics) and count what a worker
held in its hands when it died (keys that reach no application: lost, never reused). A
row also counts the connections its worker refused (``[api]
max_connections_per_address``), published beside the hands.

A row is written by its worker alone (plain stores of whole 64-bit words, each row on
cache lines of its own) and read by the manager, which folds a dead worker's row into its
totals before the slot's next worker starts: no lock is needed."""

from __future__ import annotations

import mmap

FIELDS = ("served_keys", "taken_keys", "given_back_keys", "given_back_bytes", "lost_keys",
          "lost_bytes", "held_keys", "held_bytes", "refused_connections")
_AT = {name: i for i, name in enumerate(FIELDS)}
_WORD = 8
_STRIDE = -(-len(FIELDS) // 8) * 8  # words per row: whole 64-byte cache lines
HELD = ("held_keys", "held_bytes")
_SERVED, _HELD_KEYS, _HELD_BYTES = _AT["served_keys"], _AT["held_keys"], _AT["held_bytes"]


class HandCounts:
    """One worker's counters, in a row of a shared table (or a private one)."""

    __slots__ = ("_row",)

    def __init__(self, row: memoryview | None = None):
        self._row = row if row is not None else \
            memoryview(bytearray(len(FIELDS) * _WORD)).cast("q")

    def add(self, **counts: int) -> None:
        """Add to the named counters (``FIELDS``; held ones may go down)."""
        r = self._row
        for name, v in counts.items():
            r[_AT[name]] += v

    def served(self, keys: int, nbytes: int) -> None:
        """``keys`` keys of ``nbytes`` in all left the hand for a request (every request
        served from a hand counts this: no keyword lookups)."""
        r = self._row
        r[_SERVED] += keys
        r[_HELD_KEYS] -= keys
        r[_HELD_BYTES] -= nbytes

    def __getitem__(self, name: str) -> int:
        return self._row[_AT[name]]

    def get(self) -> dict[str, int]:
        return dict(zip(FIELDS, self._row.tolist(), strict=True))

    def clear(self) -> None:
        for i in range(len(FIELDS)):
            self._row[i] = 0


class HandTable:
    """Every slot's row, in anonymous shared memory (inherited by forked workers), and
    the totals of the rows of workers that have ended."""

    def __init__(self, slots: int):
        self._map = mmap.mmap(-1, max(1, slots) * _STRIDE * _WORD)  # MAP_SHARED
        self._words = memoryview(self._map).cast("q")
        self.slots = slots
        self.ended = dict.fromkeys(FIELDS, 0)

    def row(self, slot: int) -> HandCounts:
        start = slot * _STRIDE
        return HandCounts(self._words[start:start + len(FIELDS)])

    def worker_ended(self, slot: int) -> int:
        """Fold an ended worker's row into the totals; what it still held is lost (a
        worker that stops gracefully has given its hands back). Returns the keys lost."""
        row = self.row(slot)
        got = row.get()
        for k in FIELDS:
            if k not in HELD:
                self.ended[k] += got[k]
        self.ended["lost_keys"] += got["held_keys"]
        self.ended["lost_bytes"] += got["held_bytes"]
        row.clear()
        return got["held_keys"]

    def totals(self) -> dict[str, int]:
        """Everything so far: ended workers' counts and the live rows'; keys held now;
        keys lost (with workers that died holding them, or whose give-back failed)."""
        out = {k: 0 if k in HELD else v for k, v in self.ended.items()}
        for s in range(self.slots):
            for k, v in self.row(s).get().items():
                out[k] += v
        return out
