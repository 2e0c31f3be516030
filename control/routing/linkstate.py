"""Link-state routing over the OTP links, without I/O.

Every node originates one entry per link it ends: ``[link, node, seq, up]``, with a seq
that only grows (microseconds of wall time). Entries travel inside the links' keepalives
(authenticated by the one-time MAC) and every node merges what it hears: the higher seq
wins, and an entry not refreshed for LSA_MAX_AGE_S is forgotten, so a dead node's links go
down everywhere. A link is up when both of its ends say so (for a node's own links, its
tunnel manager's view decides at once). Routes are shortest paths in hops over the links
that are up, ties broken by link index, so every node computes the same tree.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dataplane.limits import LSA_MAX_AGE_S


@dataclass(frozen=True)
class LinkEnds:
    name: str
    index: int
    a: str
    b: str


class LinkStateDb:
    def __init__(self, links: list[LinkEnds], max_age_s: float = LSA_MAX_AGE_S):
        self.links = {lk.name: lk for lk in links}
        self.max_age_s = max_age_s
        self.entries: dict[tuple[str, str], tuple[int, bool, float]] = {}

    def _valid(self, e: object) -> tuple[str, str, int, bool] | None:
        if not (isinstance(e, list | tuple) and len(e) == 4):
            return None
        link, node, seq, up = e
        lk = self.links.get(link) if isinstance(link, str) else None
        if lk is None or node not in (lk.a, lk.b):
            return None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(up, bool):
            return None
        return link, node, seq, up

    def merge(self, entries: object, now: float) -> int:
        """Take in a neighbour's entries; malformed ones are ignored. Returns how many
        entries changed."""
        if not isinstance(entries, list):
            return 0
        changed = 0
        for raw in entries:
            e = self._valid(raw)
            if e is None:
                continue
            link, node, seq, up = e
            old = self.entries.get((link, node))
            if old is None or seq > old[0]:
                self.entries[(link, node)] = (seq, up, now)
                changed += old is None or old[1] != up
        return changed

    def originate(self, node: str, states: dict[str, bool], seq: int, now: float) -> None:
        for link, up in states.items():
            self.merge([[link, node, seq, up]], now)

    def expire(self, now: float) -> None:
        for key in [k for k, (_, _, t) in self.entries.items() if now - t > self.max_age_s]:
            del self.entries[key]

    def export(self) -> list[list]:
        return [[link, node, seq, up] for (link, node), (seq, up, _) in
                sorted(self.entries.items())]

    def link_up(self, name: str) -> bool:
        lk = self.links[name]
        ea, eb = self.entries.get((name, lk.a)), self.entries.get((name, lk.b))
        return bool(ea and eb and ea[1] and eb[1])

    def up_links(self, local_node: str, local: dict[str, bool]) -> set[str]:
        """Links up as seen from ``local_node``: its own links by its own view."""
        up = set()
        for name, lk in self.links.items():
            if local_node in (lk.a, lk.b):
                if local.get(name, False):
                    up.add(name)
            elif self.link_up(name):
                up.add(name)
        return up


def shortest_paths(links: list[LinkEnds], up: set[str], src: str
                   ) -> dict[str, list[tuple[str, str]]]:
    """For every node reachable from ``src``: its path as (link, node it leaves from)
    pairs, first hop first (BFS in hops, neighbours in link-index order, so every node
    computes the same tree)."""
    adj: dict[str, list[tuple[int, str, str]]] = {}
    for lk in links:
        if lk.name in up:
            adj.setdefault(lk.a, []).append((lk.index, lk.b, lk.name))
            adj.setdefault(lk.b, []).append((lk.index, lk.a, lk.name))
    paths: dict[str, list[tuple[str, str]]] = {}
    seen = {src}
    queue: deque[tuple[str, list[tuple[str, str]]]] = deque([(src, [])])
    while queue:
        node, path = queue.popleft()
        for _, nb, name in sorted(adj.get(node, [])):
            if nb not in seen:
                seen.add(nb)
                paths[nb] = [*path, (name, node)]
                queue.append((nb, paths[nb]))
    return paths


def next_hops(links: list[LinkEnds], up: set[str], src: str) -> dict[str, str]:
    """For every node reachable from ``src``: the link of the first hop."""
    return {dst: path[0][0] for dst, path in shortest_paths(links, up, src).items()}
