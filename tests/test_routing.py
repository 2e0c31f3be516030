"""Tests of the link-state routing (control/routing/linkstate.py): the entry database and the BFS
first hops. Pure; graphs are checked against an independent all-pairs shortest path."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from control.routing.linkstate import LinkEnds, LinkStateDb, next_hops

INF = float("inf")


def links_of(pairs: list[tuple[str, str]], indexes: list[int] | None = None) -> list[LinkEnds]:
    indexes = list(range(len(pairs))) if indexes is None else indexes
    return [LinkEnds(f"L{i}", i, a, b) for i, (a, b) in zip(indexes, pairs, strict=True)]


TRIANGLE = links_of([("A", "B"), ("B", "C"), ("A", "C")])  # L0, L1, L2


def db(links=TRIANGLE, max_age_s: float = 3.0) -> LinkStateDb:
    return LinkStateDb(links, max_age_s=max_age_s)


# ---- merge ----------------------------------------------------------------------------

def test_merge_takes_new_entries_and_counts_changes():
    d = db()
    assert d.merge([["L0", "A", 5, True], ["L0", "B", 7, False]], now=1.0) == 2
    assert d.entries == {("L0", "A"): (5, True, 1.0, 1), ("L0", "B"): (7, False, 1.0, 1)}
    assert d.export() == [["L0", "A", 5, True], ["L0", "B", 7, False]]


def test_merge_keeps_the_higher_seq():
    d = db()
    d.merge([["L0", "A", 5, True]], now=1.0)
    assert d.merge([["L0", "A", 4, False]], now=2.0) == 0  # older: ignored
    assert d.entries[("L0", "A")] == (5, True, 1.0, 1)
    assert d.merge([["L0", "A", 5, False]], now=2.0) == 0  # same seq: ignored
    assert d.entries[("L0", "A")] == (5, True, 1.0, 1)
    assert d.merge([["L0", "A", 6, True]], now=3.0) == 0  # newer, same state: refreshed
    assert d.entries[("L0", "A")] == (6, True, 3.0, 1)
    assert d.merge([["L0", "A", 9, False]], now=4.0) == 1  # newer, other state
    assert d.entries[("L0", "A")] == (9, False, 4.0, 1)


def test_merge_order_does_not_matter_for_the_result():
    entries = [["L0", "A", 3, True], ["L0", "A", 8, False], ["L0", "A", 5, True]]
    d1, d2 = db(), db()
    d1.merge(entries, now=0.0)
    d2.merge(list(reversed(entries)), now=0.0)
    assert d1.export() == d2.export() == [["L0", "A", 8, False]]


def test_merge_accepts_tuples_as_entries():
    d = db()
    assert d.merge([("L1", "C", 2, True)], now=0.0) == 1
    assert d.export() == [["L1", "C", 2, True]]


MALFORMED = [
    ["L0", "A", 1],  # too short
    ["L0", "A", 1, True, 0],  # too long
    "L0A1T",
    None,
    {"link": "L0", "node": "A", "seq": 1, "up": True},
    [0, "A", 1, True],  # link not a string
    [["L0"], "A", 1, True],  # unhashable link
    ["L9", "A", 1, True],  # unknown link
    ["L1", "A", 1, True],  # A is not an end of L1 (B-C)
    ["L0", "C", 1, True],
    ["L0", ["A"], 1, True],
    ["L0", None, 1, True],
    ["L0", "A", True, True],  # a bool is not a seq
    ["L0", "A", False, True],
    ["L0", "A", -1, True],
    ["L0", "A", 1.0, True],
    ["L0", "A", "1", True],
    ["L0", "A", None, True],
    ["L0", "A", 1, 1],  # up must be a bool
    ["L0", "A", 1, "true"],
    ["L0", "A", 1, None],
]


def test_merge_ignores_malformed_entries():
    d = db()
    good = ["L2", "C", 4, True]
    assert d.merge(MALFORMED + [good] + MALFORMED, now=1.0) == 1
    assert d.export() == [good]


def test_merge_of_a_malformed_entry_does_not_overwrite_a_good_one():
    d = db()
    d.merge([["L0", "A", 1, True]], now=0.0)
    assert d.merge([["L0", "A", True, False], ["L0", "A", 2, 0]], now=1.0) == 0
    assert d.entries[("L0", "A")] == (1, True, 0.0, 1)


def test_merge_ignores_what_is_not_a_list():
    d = db()
    entry = ["L0", "A", 1, True]
    for junk in [None, 5, "L0", {"L0": entry}, (entry,), {tuple(entry)}, b"x"]:
        assert d.merge(junk, now=0.0) == 0
    assert d.entries == {}


def test_zero_seq_is_valid():
    d = db()
    assert d.merge([["L0", "A", 0, True]], now=0.0) == 1
    assert d.merge([["L0", "A", 1 << 70, False]], now=0.0) == 1  # big ints are fine


def test_originate():
    d = db()
    d.originate("A", {"L0": True, "L2": False}, seq=10, now=5.0)
    assert d.export() == [["L0", "A", 10, True], ["L2", "A", 10, False]]
    d.originate("A", {"L0": False}, seq=9, now=6.0)  # an older clock: above the held seq
    assert d.export()[0] == ["L0", "A", 11, False]
    d.merge([["L0", "A", 9, True]], now=7.0)  # an older entry heard back: ignored
    assert d.export()[0] == ["L0", "A", 11, False]


# ---- expire ---------------------------------------------------------------------------

def test_expire_drops_entries_older_than_max_age():
    d = db(max_age_s=3.0)
    d.merge([["L0", "A", 1, True]], now=10.0)
    d.merge([["L0", "B", 1, True]], now=12.0)
    d.expire(now=13.0)  # exactly max_age: kept
    assert set(d.entries) == {("L0", "A"), ("L0", "B")}
    d.expire(now=13.5)
    assert set(d.entries) == {("L0", "B")}
    assert not d.link_up("L0")
    d.expire(now=15.5)
    assert d.entries == {}


def test_a_newer_seq_keeps_an_entry_alive_a_relayed_old_one_does_not():
    d = db(max_age_s=3.0)
    d.merge([["L0", "A", 1, True], ["L0", "B", 1, True]], now=0.0)
    for t in (1.0, 2.0, 3.0):
        d.merge([["L0", "A", int(t * 10), True]], now=t)  # A refreshes its entry
        d.merge([["L0", "B", 1, True]], now=t)  # B's old entry, heard again via others
    d.expire(now=3.5)
    assert set(d.entries) == {("L0", "A")}
    # Once forgotten, the same entry handed back by a neighbour that still holds it is not
    # news: two neighbours used to hand a dead node's entry back and forth for good.
    assert d.merge([["L0", "B", 1, True]], now=4.0) == 0 and ("L0", "B") not in d.entries
    assert d.merge([["L0", "B", 2, True]], now=4.0) == 1  # B alive again: a newer seq
    d.expire(now=100.0)  # forgotten again (seq 2), and after a while the tombstone lapses
    d.expire(now=100.0 + 4 * 3.0)
    assert d.merge([["L0", "B", 1, True]], now=112.0) == 1


def test_a_dead_nodes_entry_dies_although_neighbours_keep_handing_it_on():
    """Three routers merging each other's last published entries every 0.2 s (what they
    read lags what they hold): a dead node's entry, which reached them at different
    times, is gone everywhere soon after max age and stays gone. Before tombstones each
    forgot it and took it straight back from a neighbour that still held it, for good."""
    nodes = {n: db(max_age_s=3.0) for n in "ABX"}
    for i, d in enumerate(nodes.values()):
        d.merge([["L0", "A", 1, True]], now=1.0 * i)  # heard at 0, 1 and 2 s
    published = {n: d.export() for n, d in nodes.items()}
    t = 2.0
    while t < 60.0:
        t += 0.2
        for name, d in nodes.items():
            for other in nodes:
                if other != name:
                    d.merge(published[other], now=t)
            d.expire(now=t)
        published = {n: d.export() for n, d in nodes.items()}
        if t > 2.0 + 2 * 3.0:
            assert all(("L0", "A") not in d.entries for d in nodes.values()), t


def test_an_originator_whose_clock_steps_back_still_supersedes_its_entries():
    d = db()
    d.originate("A", {"L0": True}, seq=1_000, now=0.0)
    d.originate("A", {"L0": False}, seq=10, now=1.0)  # the wall clock went back
    assert d.entries[("L0", "A")][:2] == (1_001, False)


# ---- link_up / up_links ---------------------------------------------------------------

def test_link_up_needs_both_ends_up():
    d = db()
    assert not d.link_up("L0")
    d.merge([["L0", "A", 1, True]], now=0.0)
    assert not d.link_up("L0")  # B has not said anything
    d.merge([["L0", "B", 1, False]], now=0.0)
    assert not d.link_up("L0")
    d.merge([["L0", "B", 2, True]], now=0.0)
    assert d.link_up("L0")
    d.merge([["L0", "A", 2, False]], now=0.0)
    assert not d.link_up("L0")
    assert not d.link_up("L1")


def test_link_up_ignores_entries_of_other_links():
    d = db()
    d.merge([["L0", "A", 1, True], ["L2", "C", 1, True], ["L1", "B", 1, True]], now=0.0)
    assert not any(d.link_up(n) for n in ("L0", "L1", "L2"))


def test_up_links_uses_the_local_view_for_own_links():
    d = db()
    everyone_up = [[lk.name, end, 1, True] for lk in TRIANGLE for end in (lk.a, lk.b)]
    d.merge(everyone_up, now=0.0)
    assert d.up_links("A", {"L0": True, "L2": True}) == {"L0", "L1", "L2"}
    # A's own view wins over the database, both ways
    assert d.up_links("A", {"L0": False, "L2": True}) == {"L1", "L2"}
    assert d.up_links("A", {}) == {"L1"}  # not in the local view: down
    d.merge([["L0", "B", 2, False], ["L2", "C", 2, False]], now=0.0)
    assert d.up_links("A", {"L0": True, "L2": True}) == {"L0", "L1", "L2"}
    assert d.up_links("C", {"L1": True, "L2": True}) == {"L1", "L2"}  # L0: B says down
    d.merge([["L1", "C", 2, False]], now=0.0)
    assert d.up_links("A", {"L0": True, "L2": True}) == {"L0", "L2"}
    assert d.up_links("B", {"L0": True, "L1": True}) == {"L0", "L1"}


def test_up_links_for_a_node_without_links():
    links = TRIANGLE + [LinkEnds("L3", 3, "C", "D")]
    d = db(links)
    d.merge([["L3", "C", 1, True], ["L3", "D", 1, True]], now=0.0)
    assert d.up_links("E", {"L3": False}) == {"L3"}  # E ends no link: the DB decides


# ---- next_hops: fixed graphs ----------------------------------------------------------

ALL = {"L0", "L1", "L2", "L3", "L4", "L5"}


def walk(links: list[LinkEnds], up: set[str], src: str, dst: str, limit: int) -> int:
    """Follow every node's own first hop towards ``dst``; hops taken (fails on a loop)."""
    by_name = {lk.name: lk for lk in links}
    node, hops = src, 0
    while node != dst:
        first = next_hops(links, up, node)
        assert dst in first, f"{node} has no route to {dst}"
        lk = by_name[first[dst]]
        assert lk.name in up and node in (lk.a, lk.b)
        node = lk.b if node == lk.a else lk.a
        hops += 1
        assert hops <= limit, f"routing loop from {src} to {dst}"
    return hops


def test_triangle():
    up = {"L0", "L1", "L2"}
    assert next_hops(TRIANGLE, up, "A") == {"B": "L0", "C": "L2"}
    assert next_hops(TRIANGLE, up, "B") == {"A": "L0", "C": "L1"}
    assert next_hops(TRIANGLE, up, "C") == {"A": "L2", "B": "L1"}
    # A-C down: A reaches C through B
    assert next_hops(TRIANGLE, {"L0", "L1"}, "A") == {"B": "L0", "C": "L0"}
    assert next_hops(TRIANGLE, {"L0", "L1"}, "C") == {"B": "L1", "A": "L1"}


def test_line_of_five():
    nodes = ["N0", "N1", "N2", "N3", "N4"]
    links = links_of(list(zip(nodes, nodes[1:], strict=False)))
    up = {lk.name for lk in links}
    assert next_hops(links, up, "N0") == {"N1": "L0", "N2": "L0", "N3": "L0", "N4": "L0"}
    assert next_hops(links, up, "N2") == {"N0": "L1", "N1": "L1", "N3": "L2", "N4": "L2"}
    assert next_hops(links, up, "N4") == {n: "L3" for n in nodes[:4]}
    for s in nodes:
        for t in nodes:
            assert walk(links, up, s, t, 4) == abs(nodes.index(s) - nodes.index(t))
    # cut the middle: two halves
    cut = up - {"L2"}
    assert next_hops(links, cut, "N0") == {"N1": "L0", "N2": "L0"}
    assert next_hops(links, cut, "N4") == {"N3": "L3"}


def test_square_with_a_cut_link():
    # A-B (L0), B-C (L1), C-D (L2), D-A (L3)
    sq = links_of([("A", "B"), ("B", "C"), ("C", "D"), ("D", "A")])
    up = {"L0", "L1", "L2", "L3"}
    # C is two hops away both ways: the tie goes to the lower link index
    assert next_hops(sq, up, "A") == {"B": "L0", "D": "L3", "C": "L0"}
    assert next_hops(sq, up, "B")["D"] == "L0"
    assert next_hops(sq, up, "C")["A"] == "L1"
    assert next_hops(sq, up, "D")["B"] == "L2"
    cut = up - {"L1"}  # B-C cut: B and C now three hops apart, the other way round
    assert next_hops(sq, cut, "A") == {"B": "L0", "D": "L3", "C": "L3"}
    assert next_hops(sq, cut, "B") == {"A": "L0", "D": "L0", "C": "L0"}
    assert next_hops(sq, cut, "C") == {"D": "L2", "A": "L2", "B": "L2"}
    for u in up:
        for s in "ABCD":
            for t in "ABCD":
                walk(sq, up - {u}, s, t, 3)


def test_ties_go_to_the_lowest_link_index_not_the_list_order():
    # the same square, links listed in another order and numbered differently
    sq = [LinkEnds("ab", 5, "A", "B"), LinkEnds("bc", 0, "B", "C"),
          LinkEnds("cd", 1, "C", "D"), LinkEnds("da", 2, "D", "A")]
    up = {"ab", "bc", "cd", "da"}
    assert next_hops(sq, up, "A")["C"] == "da"
    assert next_hops(list(reversed(sq)), up, "A")["C"] == "da"
    # parallel links: the lower index carries the traffic
    par = [LinkEnds("x", 3, "A", "B"), LinkEnds("y", 1, "A", "B")]
    assert next_hops(par, {"x", "y"}, "A") == {"B": "y"}
    assert next_hops(par, {"x", "y"}, "B") == {"A": "y"}
    assert next_hops(par, {"x"}, "A") == {"B": "x"}


def test_unreachable_nodes_are_absent():
    links = TRIANGLE + links_of([("D", "E")], [3])
    up = {"L0", "L1", "L2", "L3"}
    assert next_hops(links, up, "A") == {"B": "L0", "C": "L2"}
    assert next_hops(links, up, "D") == {"E": "L3"}
    assert next_hops(links, set(), "A") == {}
    assert next_hops(links, up, "Z") == {}  # a node no link ends
    assert "A" not in next_hops(links, up, "A")  # never a route to itself
    # down links carry nothing even though they exist
    assert next_hops(links, {"L1"}, "A") == {}


# ---- next_hops: random graphs ---------------------------------------------------------

def all_pairs(nodes: list[str], links: list[LinkEnds], up: set[str],
              costs: dict[str, int] | None = None) -> dict:
    """Floyd-Warshall least costs over the up links (each link 1 unless ``costs`` says)."""
    d = {(u, v): (0 if u == v else INF) for u in nodes for v in nodes}
    for lk in links:
        if lk.name in up and lk.a != lk.b:
            c = (costs or {}).get(lk.name, 1)
            d[lk.a, lk.b] = d[lk.b, lk.a] = min(d[lk.a, lk.b], c)
    for k in nodes:
        for i in nodes:
            for j in nodes:
                if d[i, k] + d[k, j] < d[i, j]:
                    d[i, j] = d[i, k] + d[k, j]
    return d


@st.composite
def graphs(draw):
    n = draw(st.integers(1, 8))
    nodes = [f"N{i}" for i in range(n)]
    pairs = draw(st.lists(st.tuples(st.sampled_from(nodes), st.sampled_from(nodes)),
                          max_size=16))
    # link indexes unrelated to the list order
    indexes = draw(st.permutations(list(range(len(pairs)))))
    indexes = [i * 3 + 1 for i in indexes]
    links = [LinkEnds(f"K{j}", idx, a, b)
             for j, ((a, b), idx) in enumerate(zip(pairs, indexes, strict=True))]
    up = {lk.name for lk in links if draw(st.booleans())}
    src = draw(st.sampled_from(nodes))
    return nodes, links, up, src


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_next_hops_are_first_links_of_shortest_paths(g):
    nodes, links, up, src = g
    dist = all_pairs(nodes, links, up)
    first = next_hops(links, up, src)
    reachable = {v for v in nodes if v != src and dist[src, v] < INF}
    assert set(first) == reachable
    by_name = {lk.name: lk for lk in links}
    own = [lk for lk in links if lk.name in up and src in (lk.a, lk.b) and lk.a != lk.b]
    for v in reachable:
        lk = by_name[first[v]]
        assert lk in own  # one of src's up links
        nb = lk.b if lk.a == src else lk.a
        assert 1 + dist[nb, v] == dist[src, v]  # on a shortest path
        # and the lowest-indexed of src's links that start one
        best = min(x.index for x in own
                   if 1 + dist[x.b if x.a == src else x.a, v] == dist[src, v])
        assert lk.index == best


@settings(max_examples=150, deadline=None)
@given(graphs())
def test_following_first_hops_never_loops(g):
    nodes, links, up, _ = g
    dist = all_pairs(nodes, links, up)
    for s in nodes:
        for t in nodes:
            if dist[s, t] < INF:
                assert walk(links, up, s, t, len(nodes) - 1) == dist[s, t]


@settings(max_examples=100, deadline=None)
@given(graphs(), st.randoms(use_true_random=False))
def test_next_hops_do_not_depend_on_the_list_order(g, rnd):
    nodes, links, up, src = g
    shuffled = list(links)
    rnd.shuffle(shuffled)
    assert next_hops(shuffled, up, src) == next_hops(links, up, src)


def test_shortest_paths_walk_the_links_from_the_source_to_each_destination():
    from control.routing.linkstate import shortest_paths

    paths = shortest_paths(TRIANGLE, {"L0", "L1"}, "A")  # A-C cut: C via B
    assert paths == {"B": [("L0", "A")], "C": [("L0", "A"), ("L1", "B")]}
    ring = [LinkEnds(f"L{i}", i, f"N{i}", f"N{(i + 1) % 6}") for i in range(6)]
    up = {lk.name for lk in ring}
    for src in ("N0", "N3"):
        got = shortest_paths(ring, up, src)
        assert {d: p[0][0] for d, p in got.items()} == next_hops(ring, up, src)
        by_name = {lk.name: lk for lk in ring}
        for dst, path in got.items():
            at = src
            for name, frm in path:  # each hop leaves from where the last one arrived
                lk = by_name[name]
                assert frm == at and at in (lk.a, lk.b)
                at = lk.b if at == lk.a else lk.a
            assert at == dst
            i, j = int(src[1:]), int(dst[1:])
            assert len(path) == min((i - j) % 6, (j - i) % 6)


@settings(max_examples=300, deadline=None)
@given(graphs(), st.data())
def test_ends_that_disagree_about_their_link_never_make_a_loop(g, data):
    """Every router has the same link-state database, but some links are up at one end
    only (one end hears the other, not the other way round): each router counts its own
    links by its own view, the others' by both ends. Following the routers' first hops
    still never loops: a packet arrives or meets a router without a route."""
    nodes, links, _, _ = g
    db = LinkStateDb(links)
    views: dict[tuple[str, str], bool] = {}
    for lk in links:
        for end in {lk.a, lk.b}:
            views[lk.name, end] = data.draw(st.booleans())
            db.merge([[lk.name, end, 1, views[lk.name, end]]], 0.0)
    hops = {}
    for n in nodes:
        local = {lk.name: views[lk.name, n] for lk in links if n in (lk.a, lk.b)}
        hops[n] = next_hops(links, db.up_links(n, local), n)
    by_name = {lk.name: lk for lk in links}
    for s in nodes:
        for t in nodes:
            at, seen = s, [s]
            while at != t and t in hops[at]:
                lk = by_name[hops[at][t]]
                at = lk.b if lk.a == at else lk.a
                seen.append(at)
                assert len(seen) <= len(nodes), f"loop {seen} to {t}"


# ---- costs (metric "key") ----------------------------------------------------------------

def test_entries_carry_a_cost_exported_only_where_it_is_not_1():
    d = db()
    assert d.merge([["L2", "A", 5, True, 9], ["L2", "C", 5, True]], now=0.0) == 2
    assert d.entries[("L2", "A")] == (5, True, 0.0, 9)
    assert d.export() == [["L2", "A", 5, True, 9], ["L2", "C", 5, True]]
    assert d.merge([["L2", "A", 6, True, 1]], now=1.0) == 1  # the cost changed: a change
    assert d.export() == [["L2", "A", 6, True], ["L2", "C", 5, True]]
    d.originate("C", {"L2": True}, 7, 2.0, costs={"L2": 3})
    assert d.export()[-1] == ["L2", "C", 7, True, 3]


def test_an_entry_with_a_bad_cost_is_ignored():
    d = db()
    for cost in (0, -1, 65, 2.0, True, "3", None):
        assert d.merge([["L0", "A", 1, True, cost]], now=0.0) == 0
    assert d.merge([["L0", "A", 1, True, 2, 9]], now=0.0) == 0  # six fields
    assert d.entries == {}


def test_a_link_costs_the_higher_of_its_ends_and_a_node_judges_its_own_end():
    d = db()
    d.merge([["L2", "A", 1, True, 4], ["L2", "C", 1, True, 2]], now=0.0)
    assert d.link_cost("L2") == 4
    assert d.link_cost("L2", "A", {"L2": 1}) == 2  # A's own view: its end is fine again
    assert d.link_cost("L0") == 1  # nothing heard: 1
    assert d.costs({"L0", "L2"}) == {"L0": 1, "L2": 4}


def test_a_dear_link_is_routed_around_and_a_tie_goes_to_the_lower_indices():
    up = {"L0", "L1", "L2"}
    assert next_hops(TRIANGLE, up, "A", {"L2": 3}) == {"B": "L0", "C": "L0"}
    assert next_hops(TRIANGLE, up, "C", {"L2": 3}) == {"A": "L1", "B": "L1"}
    # cost 2 ties with the two hops via B: the path whose first link index is lower wins
    assert next_hops(TRIANGLE, up, "A", {"L2": 2})["C"] == "L0"
    assert next_hops(TRIANGLE, up, "C", {"L2": 2})["A"] == "L1"
    assert next_hops(TRIANGLE, up, "A", {"L0": 2})["C"] == "L2"


@st.composite
def costed_graphs(draw):
    nodes, links, up, src = draw(graphs())
    costs = {lk.name: draw(st.integers(1, 64)) for lk in links}
    return nodes, links, up, src, costs


@settings(max_examples=300, deadline=None)
@given(costed_graphs())
def test_paths_are_least_cost_and_following_first_hops_never_loops(g):
    from control.routing.linkstate import shortest_paths

    nodes, links, up, src, costs = g
    dist = all_pairs(nodes, links, up, costs)
    by_name = {lk.name: lk for lk in links}
    paths = shortest_paths(links, up, src, costs)
    assert set(paths) == {v for v in nodes if v != src and dist[src, v] < INF}
    for v, path in paths.items():
        assert sum(costs[name] for name, _ in path) == dist[src, v]
    for s in nodes:  # hop by hop, each router by its own tree: arrives, at the least cost
        for t in nodes:
            if s == t or dist[s, t] == INF:
                continue
            node, paid = s, 0
            for _ in range(len(nodes)):
                lk = by_name[next_hops(links, up, node, costs)[t]]
                paid += costs[lk.name]
                node = lk.b if node == lk.a else lk.a
                if node == t:
                    break
            assert node == t and paid == dist[s, t]


@settings(max_examples=200, deadline=None)
@given(graphs())
def test_with_every_cost_1_the_tree_is_the_hop_metrics(g):
    from control.routing.linkstate import shortest_paths

    nodes, links, up, src = g
    assert shortest_paths(links, up, src, {lk.name: 1 for lk in links}) == \
        shortest_paths(links, up, src)
    # the same tree as breadth-first search in link-index order
    adj: dict[str, list] = {}
    for lk in links:
        if lk.name in up:
            adj.setdefault(lk.a, []).append((lk.index, lk.b, lk.name))
            adj.setdefault(lk.b, []).append((lk.index, lk.a, lk.name))
    bfs, seen, queue = {}, {src}, [(src, [])]
    while queue:
        node, path = queue.pop(0)
        for _, nb, name in sorted(adj.get(node, [])):
            if nb not in seen:
                seen.add(nb)
                bfs[nb] = [*path, (name, node)]
                queue.append((nb, bfs[nb]))
    assert shortest_paths(links, up, src) == bfs


def test_a_share_route_waits_its_hold_and_a_quarantine_after_another_of_its_pair():
    from control.routing.router import SHARE_HOLD_S, SHARE_QUARANTINE_S, share_ready

    assert not share_ready(10.0, 10.0 - SHARE_HOLD_S + 0.1, None, "a1")
    assert share_ready(10.0, 10.0 - SHARE_HOLD_S, None, "a1")
    # this node carried the pair's other share address until 5 s ago: not yet
    assert not share_ready(10.0, 0.0, ("a0", 5.0), "a1")
    assert share_ready(5.0 + SHARE_QUARANTINE_S, 0.0, ("a0", 5.0), "a1")
    # the same address again (its next hop moved): the hold alone
    assert share_ready(10.0, 0.0, ("a1", 9.9), "a1")



def test_the_tunnel_owner_filter_names_every_tun_and_only_the_owners():
    from control.routing.router import FILTER_RULES, tunnel_owner_filter

    script = tunnel_owner_filter(["otp0", "otp3"], {1000, 0})
    lines = [line.strip() for line in script.splitlines()]
    # Replaced whole at every start: made (if missing) and deleted before it is written.
    assert lines[:2] == ["table inet qkdnet {}", "delete table inet qkdnet"]
    assert lines.count("table inet qkdnet {") == 1
    assert "type filter hook output priority filter; policy accept;" in lines
    rules = [line for line in lines if line.startswith("oifname")]
    assert rules == ['oifname { "otp0", "otp3" } ip daddr 224.0.0.0/4 counter drop',
                     'oifname { "otp0", "otp3" } meta skuid != { 0, 1000 } counter '
                     'reject with icmpx admin-prohibited']
    assert len(rules) == FILTER_RULES  # what the router counts to know the filter is whole
    assert "table inet qkdoc {" in tunnel_owner_filter(["otp0"], {0}, table="qkdoc")
    assert 'meta skuid != { 0 }' in tunnel_owner_filter(["otp1"], {0})
    # A node without links: the table goes, nothing is filtered.
    assert tunnel_owner_filter([], {0}).splitlines() == ["table inet qkdnet {}",
                                                         "delete table inet qkdnet"]
