"""Node-disjoint relay paths for multipath global key, without I/O.

With ``[gkm] paths = k`` a global key block leaves its origin as k XOR shares, each
relayed over its own path; the paths share no node but the two ends, so no single relay
node sees two shares and none learns the block. Every router holds the same link-state
database and computes the same set of paths for an (origin, destination) pair, so each
installs only the routes of the paths it lies on: the result is a pure function of the
links (by index), the up set, the costs and the two ends.

The paths are a minimum-cost flow (Suurballe/Bhandari): every node but the ends is split
into an entry and an exit joined by one arc of capacity 1 and cost 0, every up link
becomes two arcs of capacity 1 at the link's cost, and flow is augmented one unit at a
time along a least-cost path of the residual graph (Bellman-Ford, arcs in link-index
order), so each set of m paths has the least total cost among all sets of m node-disjoint
paths. The first augmenting path is ``shortest_paths``'s route, so k = 1 gives exactly
the unicast route. Paths use linkstate's format: (link, node it leaves from) pairs, first
hop first.
"""

from __future__ import annotations

from control.routing.linkstate import LinkEnds, shortest_paths

Path = list[tuple[str, str]]


class _Flow:
    """The split graph and its residual capacities. Arc ``i ^ 1`` is arc i's reverse."""

    def __init__(self, links: list[LinkEnds], up: set[str], src: str, dst: str,
                 costs: dict[str, int]):
        self.src, self.dst = src, dst
        self.vertex: dict[tuple[str, bool], int] = {}  # (node, exit side) -> vertex
        self.node: list[str] = []  # vertex -> node
        self.to: list[int] = []
        self.cap: list[int] = []
        self.cost: list[int] = []
        self.link: list[LinkEnds | None] = []  # per arc: the link it crosses, if any
        for lk in links:
            if lk.name not in up or lk.a == lk.b:
                continue
            for node in (lk.a, lk.b):
                self._add_node(node)
            cost = costs.get(lk.name, 1)
            for a, b in ((lk.a, lk.b), (lk.b, lk.a)):
                if a != dst and b != src:  # no flow leaves dst or enters src
                    self._add_arc(self.vertex[(a, True)], self.vertex[(b, False)], cost, lk)

    def _add_node(self, node: str) -> None:
        if (node, False) in self.vertex:
            return
        entry = len(self.node)
        if node in (self.src, self.dst):
            self.vertex[(node, False)] = self.vertex[(node, True)] = entry
            self.node.append(node)
            return
        self.node += [node, node]
        self.vertex[(node, False)], self.vertex[(node, True)] = entry, entry + 1
        self._add_arc(entry, entry + 1, 0, None)

    def _add_arc(self, a: int, b: int, cost: int, link: LinkEnds | None) -> None:
        # the reverse arc (i ^ 1) leads back to this arc's tail: tail(i) is to[i ^ 1]
        self.to += [b, a]
        self.cap += [1, 0]
        self.cost += [cost, -cost]
        self.link += [link, link]

    def tail(self, arc: int) -> int:
        return self.to[arc ^ 1]

    def augment(self, arcs: list[int]) -> None:
        for arc in arcs:
            self.cap[arc] -= 1
            self.cap[arc ^ 1] += 1

    def arcs_of(self, path: Path) -> list[int]:
        """The split graph's arcs along a path of the original graph."""
        arcs = []
        for name, node in path:
            arc = next(i for i in range(0, len(self.to), 2)
                       if self.link[i] is not None and self.link[i].name == name
                       and self.tail(i) == self.vertex[(node, True)])
            if node != self.src:
                entry = self.vertex[(node, False)]
                arcs.append(next(i for i in range(0, len(self.to), 2)
                                 if self.link[i] is None and self.tail(i) == entry))
            arcs.append(arc)
        return arcs

    def least_cost_path(self) -> list[int] | None:
        """The residual graph's least-cost src -> dst arcs (Bellman-Ford: the residual
        graph of a least-cost flow has no negative cycle), or None if dst is cut off."""
        n = len(self.node)
        inf = float("inf")
        dist: list[float] = [inf] * n
        via: list[int] = [-1] * n
        start, goal = self.vertex[(self.src, True)], self.vertex[(self.dst, False)]
        dist[start] = 0
        for _ in range(n - 1):
            changed = False
            for arc in range(len(self.to)):
                if self.cap[arc] > 0:
                    a, b = self.tail(arc), self.to[arc]
                    if dist[a] + self.cost[arc] < dist[b]:
                        dist[b], via[b] = dist[a] + self.cost[arc], arc
                        changed = True
            if not changed:
                break
        if dist[goal] == inf:
            return None
        arcs: list[int] = []
        v = goal
        while v != start:
            arcs.append(via[v])
            v = self.tail(via[v])
        return arcs[::-1]

    def paths(self) -> list[Path]:
        """The flow taken apart into paths: from src, follow the arcs that carry flow."""
        out: dict[int, list[int]] = {}
        for arc in range(0, len(self.to), 2):
            if self.cap[arc] == 0:
                out.setdefault(self.tail(arc), []).append(arc)
        start, goal = self.vertex[(self.src, True)], self.vertex[(self.dst, False)]
        result = []
        for first in out.get(start, []):
            path: Path = []
            arc = first
            while True:
                lk = self.link[arc]
                if lk is not None:
                    path.append((lk.name, self.node[self.tail(arc)]))
                if self.to[arc] == goal:
                    break
                arc = out[self.to[arc]][0]
            result.append(path)
        return result


def path_cost(path: Path, costs: dict[str, int] | None = None) -> int:
    costs = costs or {}
    return sum(costs.get(name, 1) for name, _ in path)


def disjoint_paths(links: list[LinkEnds], up: set[str], src: str, dst: str, k: int,
                   costs: dict[str, int] | None = None) -> list[Path]:
    """Up to k paths from src to dst over up links that share no node but src and dst (a
    direct src-dst link can be one of them), with the least total cost among all sets of
    that many such paths; fewer when the network has fewer, [] when src == dst, dst is
    unreachable or k < 1. Ordered by (cost, link indices along the path). A pure function
    of its inputs: links are taken by index, whatever the order of the list."""
    costs = costs or {}
    for name in sorted(up):
        cost = costs.get(name, 1)
        if not isinstance(cost, int) or isinstance(cost, bool) or cost < 1:
            raise ValueError(f"link {name}: cost must be an int >= 1, not {cost!r}")
    if src == dst or k < 1:
        return []
    ordered = sorted(links, key=lambda lk: (lk.index, lk.name))
    first = shortest_paths(ordered, up, src, costs).get(dst)
    if first is None:
        return []
    if k == 1:
        return [first]
    flow = _Flow(ordered, up, src, dst, costs)
    flow.augment(flow.arcs_of(first))
    for _ in range(k - 1):
        arcs = flow.least_cost_path()
        if arcs is None:
            break
        flow.augment(arcs)
    index = {lk.name: lk.index for lk in ordered}
    return sorted(flow.paths(),
                  key=lambda p: (path_cost(p, costs), tuple(index[name] for name, _ in p)))


def path_nodes(src: str, path: Path, links: dict[str, LinkEnds]) -> list[str]:
    """The nodes along ``path``, src first, dst last."""
    nodes = [src]
    for name, node in path:
        lk = links[name]
        if node != nodes[-1] or node not in (lk.a, lk.b):
            raise ValueError(f"link {name} does not leave from {nodes[-1]}")
        nodes.append(lk.b if node == lk.a else lk.a)
    return nodes


def next_link(path: Path, node: str) -> str | None:
    """The link on which ``node`` forwards along ``path``; None where the node is not on
    it or is its last node."""
    return next((name for name, here in path if here == node), None)
