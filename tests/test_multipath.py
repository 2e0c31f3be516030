"""Tests of the node-disjoint relay paths (control/routing/multipath.py): pure. Random
graphs are checked against a brute-force search over every set of simple paths."""

from __future__ import annotations

import random

import pytest

from control.routing.linkstate import LinkEnds, shortest_paths
from control.routing.multipath import disjoint_paths, next_link, path_nodes

# examples/grid9.toml's links in file order
GRID_PAIRS = [("A1", "A2"), ("A2", "A3"), ("B1", "B2"), ("B2", "B3"), ("C1", "C2"),
              ("C2", "C3"), ("A1", "B1"), ("B1", "C1"), ("A2", "B2"), ("B2", "C2"),
              ("A3", "B3"), ("B3", "C3")]
GRID = [LinkEnds(f"{a}-{b}", i, a, b) for i, (a, b) in enumerate(GRID_PAIRS)]
TRIANGLE = [LinkEnds("L0", 0, "A", "B"), LinkEnds("L1", 1, "B", "C"),
            LinkEnds("L2", 2, "A", "C")]
# The trap: the shortest path s-a-b-t blocks both relays that a second path needs
TRAP = [LinkEnds("sa", 0, "s", "a"), LinkEnds("ab", 1, "a", "b"), LinkEnds("bt", 2, "b", "t"),
        LinkEnds("sc", 3, "s", "c"), LinkEnds("cb", 4, "c", "b"), LinkEnds("ad", 5, "a", "d"),
        LinkEnds("dt", 6, "d", "t")]


def names(links: list[LinkEnds]) -> set[str]:
    return {lk.name for lk in links}


def max_disjoint(links: list[LinkEnds], up: set[str], src: str, dst: str) -> int:
    """How many node-disjoint paths from src to dst there are at most."""
    return len(disjoint_paths(links, up, src, dst, k=len(links) + 1))


def cost_of(path, costs=None) -> int:
    return sum((costs or {}).get(name, 1) for name, _ in path)


def check_valid(links, up, src, dst, paths) -> None:
    """Simple paths from src to dst over up links, sharing no node but src and dst."""
    by_name = {lk.name: lk for lk in links}
    seen: set[str] = set()
    for path in paths:
        assert all(name in up for name, _ in path)
        nodes = path_nodes(src, path, by_name)
        assert nodes[0] == src and nodes[-1] == dst
        assert len(set(nodes)) == len(nodes)
        interior = set(nodes[1:-1])
        assert not interior & seen
        seen |= interior
    assert len({tuple(p) for p in paths}) == len(paths)


def greedy(links, up, src, dst) -> int:
    """Take the shortest path, remove its relays and links, repeat."""
    up, count = set(up), 0
    while (path := shortest_paths(links, up, src).get(dst)) is not None:
        relays = set(path_nodes(src, path, {lk.name: lk for lk in links})[1:-1])
        up -= {name for name, _ in path}
        up -= {lk.name for lk in links if lk.a in relays or lk.b in relays}
        count += 1
    return count


def least_costs(links, up, src, dst, costs) -> dict[int, int]:
    """Brute force: for every m, the least total cost of m node-disjoint paths (absent:
    there are no m such paths)."""
    adj: dict[str, list[LinkEnds]] = {}
    for lk in links:
        if lk.name in up:
            adj.setdefault(lk.a, []).append(lk)
            adj.setdefault(lk.b, []).append(lk)
    paths: list[tuple[frozenset[str], int]] = []  # (relays, cost) of every simple path

    def walk(node, visited, cost):
        for lk in adj.get(node, []):
            nb = lk.b if node == lk.a else lk.a
            c = cost + costs.get(lk.name, 1)
            if nb == dst:
                paths.append((frozenset(visited - {src}), c))
            elif nb not in visited:
                walk(nb, visited | {nb}, c)

    walk(src, {src}, 0)
    best: dict[int, int] = {}

    def choose(start, used, count, cost):
        if count:
            best[count] = min(best.get(count, cost), cost)
        for i in range(start, len(paths)):
            relays, c = paths[i]
            if not relays & used:
                choose(i + 1, used | relays, count + 1, cost + c)

    choose(0, frozenset(), 0, 0)
    return best


def random_graph(rng: random.Random, n: int, p: float):
    nodes = [f"N{i}" for i in range(n)]
    pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1:] if rng.random() < p]
    indexes = rng.sample(range(100), len(pairs))
    links = [LinkEnds(f"K{i}", i, a, b) for i, (a, b) in zip(indexes, pairs, strict=True)]
    up = {lk.name for lk in links if rng.random() < 0.9}
    costs = {lk.name: rng.randint(1, 4) for lk in links if rng.random() < 0.7}
    return nodes, links, up, costs


# ---- fixed topologies ------------------------------------------------------------------

def test_grid_corners_have_two_disjoint_four_hop_paths_and_no_more():
    up = names(GRID)
    paths = disjoint_paths(GRID, up, "A1", "C3", 2)
    assert len(paths) == 2 and [len(p) for p in paths] == [4, 4]
    check_valid(GRID, up, "A1", "C3", paths)
    assert disjoint_paths(GRID, up, "A1", "C3", 3) == paths
    assert max_disjoint(GRID, up, "A1", "C3") == 2
    # a corner has two neighbours, a side node three
    assert max_disjoint(GRID, up, "B2", "A1") == 2
    assert max_disjoint(GRID, up, "A2", "C2") == 3


def test_triangle_gives_the_direct_link_and_the_two_hop_path():
    up = names(TRIANGLE)
    assert disjoint_paths(TRIANGLE, up, "A", "C", 2) == [[("L2", "A")],
                                                         [("L0", "A"), ("L1", "B")]]
    assert disjoint_paths(TRIANGLE, up, "A", "C", 1) == [[("L2", "A")]]


def test_the_trap_greedy_finds_one_path_the_flow_finds_two():
    up = names(TRAP)
    assert shortest_paths(TRAP, up, "s")["t"] == [("sa", "s"), ("ab", "a"), ("bt", "b")]
    assert greedy(TRAP, up, "s", "t") == 1
    assert disjoint_paths(TRAP, up, "s", "t", 2) == [
        [("sa", "s"), ("ad", "a"), ("dt", "d")],
        [("sc", "s"), ("cb", "c"), ("bt", "b")],
    ]


def test_a_cut_link_reduces_the_count():
    up = names(GRID) - {"A1-A2"}
    paths = disjoint_paths(GRID, up, "A1", "C3", 2)
    assert len(paths) == 1 and max_disjoint(GRID, up, "A1", "C3") == 1
    check_valid(GRID, up, "A1", "C3", paths)
    assert disjoint_paths(GRID, up - {"A1-B1"}, "A1", "C3", 2) == []


def test_an_expensive_link_is_avoided_when_another_set_costs_less():
    # s reaches t over x, y or z; s-x is dear
    links = [LinkEnds("sx", 0, "s", "x"), LinkEnds("xt", 1, "x", "t"),
             LinkEnds("sy", 2, "s", "y"), LinkEnds("yt", 3, "y", "t"),
             LinkEnds("sz", 4, "s", "z"), LinkEnds("zt", 5, "z", "t")]
    up, costs = names(links), {"sx": 10}
    assert disjoint_paths(links, up, "s", "t", 2, costs) == [[("sy", "s"), ("yt", "y")],
                                                             [("sz", "s"), ("zt", "z")]]
    assert disjoint_paths(links, up, "s", "t", 2) == [[("sx", "s"), ("xt", "x")],
                                                      [("sy", "s"), ("yt", "y")]]
    three = disjoint_paths(links, up, "s", "t", 3, costs)
    assert [p[0][0] for p in three] == ["sy", "sz", "sx"]  # by cost


def test_the_least_cost_pair_may_leave_out_the_cheapest_path():
    # the trap with a cheap middle: s-a-b-t costs 3, the disjoint pair 4 + 4
    costs = {"sa": 1, "ab": 1, "bt": 1, "sc": 2, "cb": 1, "ad": 2, "dt": 1}
    paths = disjoint_paths(TRAP, names(TRAP), "s", "t", 2, costs)
    assert sorted(cost_of(p, costs) for p in paths) == [4, 4]
    assert disjoint_paths(TRAP, names(TRAP), "s", "t", 1, costs) == [
        [("sa", "s"), ("ab", "a"), ("bt", "b")]]


def test_degenerate_requests_give_nothing():
    up = names(TRIANGLE)
    assert disjoint_paths(TRIANGLE, up, "A", "A", 2) == []
    assert disjoint_paths(TRIANGLE, up, "A", "C", 0) == []
    assert disjoint_paths(TRIANGLE, up, "A", "Z", 2) == []
    assert disjoint_paths(TRIANGLE, set(), "A", "C", 2) == []
    assert max_disjoint(TRIANGLE, up, "A", "A") == 0


def test_a_cost_below_1_is_refused():
    with pytest.raises(ValueError, match="L1"):
        disjoint_paths(TRIANGLE, names(TRIANGLE), "A", "C", 2, {"L1": 0})


def test_path_nodes_and_next_link():
    path = [("L0", "A"), ("L1", "B")]
    assert path_nodes("A", path, {lk.name: lk for lk in TRIANGLE}) == ["A", "B", "C"]
    assert [next_link(path, n) for n in "ABCD"] == ["L0", "L1", None, None]
    with pytest.raises(ValueError):
        path_nodes("C", path, {lk.name: lk for lk in TRIANGLE})


# ---- properties ------------------------------------------------------------------------

def test_k1_is_the_unicast_route():
    rng = random.Random(1)
    graphs = [(GRID, names(GRID), {}), (GRID, names(GRID), {"A1-A2": 3, "B3-C3": 2}),
              (TRAP, names(TRAP), {})]
    for _ in range(150):
        nodes, links, up, costs = random_graph(rng, rng.randint(2, 9), 0.4)
        graphs.append((links, up, costs))
    for links, up, costs in graphs:
        nodes = sorted({lk.a for lk in links} | {lk.b for lk in links})
        for src in nodes:
            routes = shortest_paths(links, up, src, costs)
            for dst in nodes:
                expect = [routes[dst]] if dst in routes else []
                assert disjoint_paths(links, up, src, dst, 1, costs) == expect


def test_shuffled_inputs_give_the_same_paths():
    rng = random.Random(2)
    cases = [(GRID, names(GRID), {}, "A1", "C3"), (TRAP, names(TRAP), {}, "s", "t")]
    for _ in range(60):
        nodes, links, up, costs = random_graph(rng, rng.randint(3, 9), 0.5)
        cases.append((links, up, costs, nodes[0], nodes[-1]))
    for links, up, costs, src, dst in cases:
        for k in (1, 2, 3):
            want = disjoint_paths(links, up, src, dst, k, costs)
            for _ in range(4):
                shuffled = rng.sample(links, len(links))
                up2: set[str] = set()
                for name in rng.sample(sorted(up), len(up)):
                    up2.add(name)
                costs2 = dict(rng.sample(sorted(costs.items()), len(costs)))
                assert disjoint_paths(shuffled, up2, src, dst, k, costs2) == want


def test_random_graphs_match_a_brute_force_search():
    rng = random.Random(3)
    for _ in range(250):
        nodes, links, up, costs = random_graph(rng, rng.randint(2, 7), rng.choice([0.4, 0.7]))
        src, dst = rng.sample(nodes, 2)
        least = least_costs(links, up, src, dst, costs)
        most = max(least, default=0)
        assert max_disjoint(links, up, src, dst) == most
        index = {lk.name: lk.index for lk in links}
        for k in range(1, most + 2):
            paths = disjoint_paths(links, up, src, dst, k, costs)
            check_valid(links, up, src, dst, paths)
            assert len(paths) == min(k, most)
            if paths:
                assert sum(cost_of(p, costs) for p in paths) == least[len(paths)]
            keys = [(cost_of(p, costs), tuple(index[n] for n, _ in p)) for p in paths]
            assert keys == sorted(keys)
