"""Link-state routing over the OTP links, without I/O.

Every node originates one entry per link it ends: ``[link, node, seq, up]``, and
``[link, node, seq, up, cost]`` when the end's cost is not 1 (routing.linkcost; the hop
metric always advertises 1), with a seq that only grows (microseconds of wall time).
Entries travel inside the links' keepalives (authenticated by the one-time MAC) and every
node merges what it hears: the higher seq wins, and an entry not refreshed for
LSA_MAX_AGE_S is forgotten, so a dead node's links go down everywhere. A forgotten entry
is not taken back from a neighbour that still holds it (it would be news again, and two
neighbours could hand a dead node's entry back and forth for good): its seq is
remembered for a while (TOMBSTONE_AGES max ages), and only a newer one is heard. A link is up when
both of its ends say so (for a node's own links, its tunnel manager's view decides at
once), and costs the higher of its ends' costs. Routes are least-cost paths over the
links that are up, ties broken by the link indices along the path, first hop first: with
every cost 1 that is the breadth-first tree in link-index order. Every hop of a route
lies on a least-cost path from there, so routes computed at different nodes never loop.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from control.routing.linkcost import MAX_COST
from dataplane.limits import LSA_MAX_AGE_S


@dataclass(frozen=True)
class LinkEnds:
    name: str
    index: int
    a: str
    b: str


TOMBSTONE_AGES = 4  # a forgotten entry's seq is refused this many max ages


class LinkStateDb:
    def __init__(self, links: list[LinkEnds], max_age_s: float = LSA_MAX_AGE_S):
        self.links = {lk.name: lk for lk in links}
        self.max_age_s = max_age_s
        # (link, node) -> (seq, up, when heard, cost)
        self.entries: dict[tuple[str, str], tuple[int, bool, float, int]] = {}
        # (link, node) -> (seq forgotten, until when it is refused)
        self.forgotten: dict[tuple[str, str], tuple[int, float]] = {}

    def _valid(self, e: object) -> tuple[str, str, int, bool, int] | None:
        if not (isinstance(e, list | tuple) and len(e) in (4, 5)):
            return None
        link, node, seq, up = e[:4]
        cost = e[4] if len(e) == 5 else 1
        lk = self.links.get(link) if isinstance(link, str) else None
        if lk is None or node not in (lk.a, lk.b):
            return None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(up, bool):
            return None
        if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= MAX_COST:
            return None
        return link, node, seq, up, cost

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
            link, node, seq, up, cost = e
            old = self.entries.get((link, node))
            if old is None and (gone := self.forgotten.get((link, node))) is not None \
                    and seq <= gone[0] and now < gone[1]:
                continue  # forgotten here: the same entry handed back is not news
            if old is None or seq > old[0]:
                self.entries[(link, node)] = (seq, up, now, cost)
                changed += old is None or old[1] != up or old[3] != cost
        return changed

    def originate(self, node: str, states: dict[str, bool], seq: int, now: float,
                  costs: dict[str, int] | None = None) -> None:
        """This node's entries, each with a seq above any it is known to have used (held
        here, heard back from a neighbour, or forgotten): the wall clock ``seq`` may step
        back, the entries' seqs never do."""
        costs = costs or {}
        for link, up in states.items():
            key = (link, node)
            held = max(self.entries[key][0] if key in self.entries else -1,
                       self.forgotten[key][0] if key in self.forgotten else -1)
            self.merge([[link, node, max(seq, held + 1), up, costs.get(link, 1)]], now)

    def expire(self, now: float) -> None:
        for key in [k for k, (_, _, t, _) in self.entries.items() if now - t > self.max_age_s]:
            self.forgotten[key] = (self.entries.pop(key)[0],
                                   now + TOMBSTONE_AGES * self.max_age_s)
        for key in [k for k, (_, until) in self.forgotten.items() if now >= until]:
            del self.forgotten[key]

    def export(self) -> list[list]:
        """The entries to flood; the cost only where it is not 1 (key spent on keepalives
        stays as it was under the hop metric)."""
        return [[link, node, seq, up] + ([cost] if cost != 1 else [])
                for (link, node), (seq, up, _, cost) in sorted(self.entries.items())]

    def link_cost(self, name: str, local_node: str | None = None,
                  local: dict[str, int] | None = None) -> int:
        """The higher of the link's two ends' costs (an end not heard from: 1); a node's
        own end by its own view ``local``."""
        lk = self.links[name]
        costs = []
        for end in (lk.a, lk.b):
            if end == local_node and local is not None and name in local:
                costs.append(local[name])
            else:
                entry = self.entries.get((name, end))
                costs.append(entry[3] if entry else 1)
        return max(costs)

    def costs(self, up: set[str], local_node: str | None = None,
              local: dict[str, int] | None = None) -> dict[str, int]:
        return {name: self.link_cost(name, local_node, local) for name in up}

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


def shortest_paths(links: list[LinkEnds], up: set[str], src: str,
                   costs: dict[str, int] | None = None) -> dict[str, list[tuple[str, str]]]:
    """For every node reachable from ``src``: its least-cost path as (link, node it leaves
    from) pairs, first hop first. ``costs`` per link name (absent: 1). Among paths of
    equal cost the one whose link indices, first hop first, compare lowest wins, so with
    every cost 1 this is the breadth-first tree with neighbours in link-index order."""
    costs = costs or {}
    adj: dict[str, list[tuple[int, str, str]]] = {}
    for lk in links:
        if lk.name in up:
            adj.setdefault(lk.a, []).append((lk.index, lk.b, lk.name))
            adj.setdefault(lk.b, []).append((lk.index, lk.a, lk.name))
    paths: dict[str, list[tuple[str, str]]] = {}
    done = {src}
    # (cost so far, link indices so far, node, path): the heap pops the least of each
    heap: list[tuple[int, tuple[int, ...], str, list[tuple[str, str]]]] = [(0, (), src, [])]
    while heap:
        cost, order, node, path = heapq.heappop(heap)
        if node != src:
            if node in done:
                continue
            done.add(node)
            paths[node] = path
        for index, nb, name in adj.get(node, []):
            if nb not in done:
                heapq.heappush(heap, (cost + costs.get(name, 1), (*order, index), nb,
                                      [*path, (name, node)]))
    return paths


def next_hops(links: list[LinkEnds], up: set[str], src: str,
              costs: dict[str, int] | None = None) -> dict[str, str]:
    """For every node reachable from ``src``: the link of the first hop."""
    return {dst: path[0][0] for dst, path in shortest_paths(links, up, src, costs).items()}
