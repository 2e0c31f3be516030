"""The topology builder (bench/topology.py): the TOML it writes loads with the topology
parser and says what was asked, for the benches' templates and the tests' networks."""

from __future__ import annotations

import ipaddress
import tomllib

from bench.topology import (
    EMULATOR,
    graph,
    line,
    merge,
    network,
    render,
    saes,
    template,
    triangle,
)
from control.core.config import load_topology, parse_topology


def test_a_line_with_settings_and_saes_loads_as_asked(tmp_path):
    path = tmp_path / "net.toml"
    path.write_text(render(
        network("t-line", "tl", defaults={"key_rate_mbps": 25, "block_size": "64KiB",
                                          "ring_capacity": "8MiB", "ratio": "3:1"},
                gkm={"block_size": "256KiB", "high_watermark": "4MiB",
                     "pairs": [["A", "C"]]},
                dataplane={"workers": 3}, api={"workers": 1}),
        line("ABC", 77), saes(("SAE-A", "A"), ("SAE-C", "C"))))
    topo = load_topology(path)
    assert (topo.name, topo.prefix) == ("t-line", "tl")
    assert list(topo.nodes) == ["A", "B", "C"]
    assert [(lk.name, lk.a, lk.b) for lk in topo.links] == [("A-B", "A", "B"),
                                                            ("B-C", "B", "C")]
    ab, bc = topo.links
    assert (ab.underlay_a, ab.underlay_b) == (ipaddress.IPv4Interface("10.77.1.1/30"),
                                              ipaddress.IPv4Interface("10.77.1.2/30"))
    assert bc.underlay_a == ipaddress.IPv4Interface("10.77.2.1/30")
    for lk in topo.links:
        assert (lk.source.kind, lk.source.generator) == ("emulator", "aes-ctr")
        assert (lk.key_rate_mbps, lk.block_size, lk.ring_capacity, lk.ratio) == \
            (25, 64 << 10, 8 << 20, (3, 1))
    assert topo.gkm.pairs == (("A", "C"), ("C", "A")) and topo.gkm.block_size == 256 << 10
    assert topo.gkm.high_watermark == 4 << 20
    assert topo.dataplane.workers == 3 and topo.api.workers == 1
    assert [(s.id, s.node) for s in topo.saes] == [("SAE-A", "A"), ("SAE-C", "C")]


def test_a_ring_closes_on_the_first_node_and_the_triangle_links_a_to_c():
    ring = parse_topology(render(network("r", "rr"), line("ABCD", 5, closed=True)))
    assert [lk.name for lk in ring.links] == ["A-B", "B-C", "C-D", "D-A"]
    assert str(ring.link("D-A").underlay_b) == "10.5.4.2/30"
    tri = parse_topology(render(network("t", "tt"), triangle(6)))
    assert [lk.name for lk in tri.links] == ["A-B", "B-C", "A-C"]
    assert str(tri.link("A-C").underlay_a) == "10.6.3.1/30"


def test_per_link_settings_and_the_default_source():
    text = render(network("x", "xx"),
                  line("ABC", 8, source=None,
                       extra=lambda i: {"ratio": "1:3"} if i == 1 else {"ring_capacity": "2MiB"}))
    topo = parse_topology(text)
    ab, bc = topo.links
    assert ab.ratio == (1, 3) and bc.ratio == (1, 1) and bc.ring_capacity == 2 << 20
    assert "source" not in tomllib.loads(text)["links"][0]  # the config's default source
    assert ab.source.kind == "emulator" and ab.source.generator == "urandom"


def test_a_template_is_the_rendered_text_once_formatted():
    """The benches append ``template(...)`` to a str.format template: every brace of the
    TOML (the key source's inline table) doubled, so formatting gives the TOML back."""
    parts = (network("n", "p", gkm={"pairs": [["A", "B"]]}),
             graph("AB", [("A", "B")], 3, source={"generator": "aes-ctr"}))
    assert "{{ generator" in template(*parts)
    assert template(*parts).format() == render(*parts)
    head = '[network]\nname = "n"\nprefix = "{prefix}"\n'
    topo = parse_topology((head + template(line("AB", 2))).format(prefix="pq"))
    assert topo.prefix == "pq" and topo.links[0].source.generator == "aes-ctr"


def test_values_round_trip_through_toml_and_parts_merge():
    odd = {"s": 'quote " back \\ tab\t é', "f": 0.25, "t": True, "n": [], "i": -3,
           "nested": {"k": [1, 2], "inline": {"x": "y"}}}
    assert tomllib.loads(render({"sec": odd})) == {"sec": odd}
    both = merge(network("a", "p", gkm={"pairs": [], "window": "1MiB"}), saes(("S1", "A")),
                 {"gkm": {"pairs": [["A", "B"]]}}, saes(("S2", "B")))
    assert both["gkm"] == {"pairs": [["A", "B"]], "window": "1MiB"}
    assert [s["id"] for s in both["saes"]] == ["S1", "S2"]
    assert tomllib.loads(render(both)) == both
    assert EMULATOR == {"kind": "emulator", "generator": "aes-ctr"}
