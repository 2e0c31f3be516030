"""The chaos bench's ledger of global keys (pure): every key ID the master SAE obtained
and the slave SAE was given, each with its key's digest, and what went wrong.

- *mismatched*: a key ID whose bytes differ between the two sides;
- *duplicated*: a key ID obtained twice at the master's KME, or given twice to the slave;
- *reused*: the same key bytes under two different key IDs;
- *orphans*: keys the master obtained that the slave never got (after the run's last
  attempts), counted apart as *lost_answers* when an attempt to fetch them lost its answer
  (the connection died mid-answer, as when a key API worker is killed) before the KME
  refused them: those keys were spent on an answer nobody received.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Ledger:
    obtained: dict[str, str] = field(default_factory=dict)   # key ID -> digest
    delivered: dict[str, str] = field(default_factory=dict)
    obtained_twice: int = 0
    delivered_twice: int = 0
    lost_answer: set[str] = field(default_factory=set)  # fetches whose answer was lost

    def obtain(self, keys: list[tuple[str, str]]) -> None:
        for kid, digest in keys:
            if kid in self.obtained:
                self.obtained_twice += 1
            self.obtained[kid] = digest

    def deliver(self, keys: list[tuple[str, str]]) -> None:
        for kid, digest in keys:
            if kid in self.delivered:
                self.delivered_twice += 1
            self.delivered[kid] = digest
            self.lost_answer.discard(kid)

    def answer_lost(self, key_ids: list[str]) -> None:
        """A fetch of these keys lost its answer (they may have been handed out)."""
        self.lost_answer.update(k for k in key_ids if k not in self.delivered)

    def undelivered(self) -> list[str]:
        return sorted(k for k in self.obtained if k not in self.delivered)

    def report(self) -> dict:
        mismatched = sum(1 for k, d in self.delivered.items()
                         if k in self.obtained and self.obtained[k] != d)
        unknown = sum(1 for k in self.delivered if k not in self.obtained)
        by_digest = Counter({**self.obtained, **self.delivered}.values())
        reused = sum(n - 1 for n in by_digest.values() if n > 1)
        missing = self.undelivered()
        lost = sum(1 for k in missing if k in self.lost_answer)
        return {"keys_obtained": len(self.obtained), "keys_delivered": len(self.delivered),
                "mismatched": mismatched + unknown,
                "duplicated": self.obtained_twice + self.delivered_twice,
                "reused": reused, "orphans": len(missing), "lost_answers": lost}
