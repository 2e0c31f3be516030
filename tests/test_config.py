"""Tests of the topology configuration (control/core/config.py): the shipped examples load with
every default resolved, and every kind of mistake is refused with the field to fix."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from control.core.config import ConfigError, load_topology, parse_ratio, parse_size, parse_topology
from control.core.sizing import lsdb_estimate, rate_floor

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BASE = """\
[network]
name = "t"
prefix = "tt"

[[nodes]]
name = "A"
[[nodes]]
name = "B"
[[nodes]]
name = "C"

[[links]]
a = "A"
b = "B"
underlay = ["10.9.1.1/30", "10.9.1.2/30"]

[[links]]
a = "B"
b = "C"
underlay = ["10.9.2.1/30", "10.9.2.2/30"]

[[saes]]
id = "S1"
node = "A"
"""

LINK0_UL = 'underlay = ["10.9.1.1/30", "10.9.1.2/30"]'
LINK1_UL = 'underlay = ["10.9.2.1/30", "10.9.2.2/30"]'


def edit(*pairs: tuple[str, str], text: str = BASE) -> str:
    """Apply (old, new) replacements, each of which must match exactly once."""
    for old, new in pairs:
        assert text.count(old) == 1, f"edit target {old!r} is not unique in the base text"
        text = text.replace(old, new)
    return text


def link0(extra: str) -> str:
    return edit((LINK0_UL, LINK0_UL + "\n" + extra))


def link1(extra: str) -> str:
    return edit((LINK1_UL, LINK1_UL + "\n" + extra))


def defaults(extra: str) -> str:
    return edit(('prefix = "tt"\n', 'prefix = "tt"\n\n[defaults]\n' + extra + "\n"))


def problems_of(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, "net.toml")
    return ei.value.problems


def assert_problem(text: str, field: str, phrase: str) -> ConfigError:
    """The text is refused, with a problem at `field` whose message contains `phrase`,
    and str() of the error names the file, the field and the message on one line."""
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, "net.toml")
    err = ei.value
    hits = [msg for f, msg in err.problems if f == field and phrase in msg]
    assert hits, f"no problem at {field!r} containing {phrase!r}: {err.problems}"
    line = f"net.toml: {field}: {hits[0]}" if field else f"net.toml: {hits[0]}"
    assert line in str(err).splitlines()
    return err


# ---- the base text and the shipped examples --------------------------------------------

def test_base_is_valid():
    topo = parse_topology(BASE, "net.toml")
    assert list(topo.nodes) == ["A", "B", "C"]
    assert [lk.name for lk in topo.links] == ["A-B", "B-C"]


def test_triangle_example():
    topo = load_topology(EXAMPLES / "triangle.toml")
    assert topo.name == "triangle"
    assert topo.prefix == "tri"
    assert topo.path == EXAMPLES / "triangle.toml"
    assert len(topo.nodes) == 3 and len(topo.links) == 3
    assert {n: (s.id, str(s.address)) for n, s in topo.nodes.items()} == {
        "A": (1, "10.88.0.1"), "B": (2, "10.88.0.2"), "C": (3, "10.88.0.3")}
    assert [lk.name for lk in topo.links] == ["A-B", "B-C", "A-C"]
    assert [lk.index for lk in topo.links] == [0, 1, 2]
    by_name = {lk.name: lk for lk in topo.links}
    assert by_name["A-C"].ratio == (3, 1)
    assert by_name["A-B"].ratio == (1, 1)
    assert by_name["B-C"].ratio == (1, 1)
    for lk in topo.links:
        assert lk.block_size == 1 << 20
        assert lk.ring_capacity == 128 << 20
        assert lk.key_rate_mbps == 1000
        assert lk.source.kind == "emulator" and lk.source.generator == "urandom"
        assert lk.auth_key_file is None
    ac = topo.link("A-C")
    assert (ac.a, ac.b) == ("A", "C")
    assert ac.underlay_a == ipaddress.IPv4Interface("10.201.3.1/30")
    assert ac.underlay_of("C") == ipaddress.IPv4Interface("10.201.3.2/30")
    assert ac.peer_of("A") == "C" and ac.peer_of("C") == "A"
    assert [lk.name for lk in topo.links_of("B")] == ["A-B", "B-C"]
    assert topo.ports.agreement == 7001 and topo.ports.api == 8443
    assert [(s.id, s.node) for s in topo.saes] == [("SAE-A", "A"), ("SAE-C", "C")]


def test_line5_example():
    topo = load_topology(EXAMPLES / "line5.toml")
    assert topo.name == "line5" and topo.prefix == "line"
    assert list(topo.nodes) == ["N1", "N2", "N3", "N4", "N5"]
    assert len(topo.links) == 4
    assert [lk.name for lk in topo.links] == ["N1-N2", "N2-N3", "N3-N4", "N4-N5"]
    assert str(topo.node("N5").address) == "10.88.0.5"  # default node_net
    for lk in topo.links:
        assert lk.block_size == 1 << 20  # not set in the file: the built-in default
        assert lk.ring_capacity == 64 << 20
        assert lk.ratio == (1, 1)
    assert [(s.id, s.node) for s in topo.saes] == [("SAE-1", "N1"), ("SAE-5", "N5")]


def test_grid9_example():
    topo = load_topology(EXAMPLES / "grid9.toml")
    assert topo.prefix == "grid9"
    assert list(topo.nodes) == [f"{r}{c}" for r in "ABC" for c in "123"]
    assert len(topo.links) == 12
    for node in topo.nodes:  # each node joined to its grid neighbours, no others
        r, c = "ABC".index(node[0]), int(node[1]) - 1
        peers = {lk.peer_of(node) for lk in topo.links_of(node)}
        assert peers == {f"{'ABC'[r + dr]}{c + dc + 1}" for dr, dc in
                         ((-1, 0), (1, 0), (0, -1), (0, 1))
                         if 0 <= r + dr < 3 and 0 <= c + dc < 3}
    assert len({lk.underlay_a.network for lk in topo.links}) == 12
    assert topo.gkm.destinations_of("A1") == ["C3"] and topo.gkm.destinations_of("B2") == []
    assert (topo.dataplane.workers, topo.api.workers) == (1, 1)
    assert [(s.id, s.node) for s in topo.saes] == [("SAE-A1", "A1"), ("SAE-C3", "C3")]


def test_ring16_example():
    topo = load_topology(EXAMPLES / "ring16.toml")
    assert topo.prefix == "ring16"
    names = [f"N{i}" for i in range(1, 17)]
    assert list(topo.nodes) == names
    assert [(lk.a, lk.b) for lk in topo.links] == list(zip(names, names[1:] + names[:1],
                                                            strict=True))
    assert len({lk.underlay_a.network for lk in topo.links}) == 16
    assert topo.gkm.destinations_of("N1") == ["N9"] and topo.gkm.origins_of("N5") == []
    assert (topo.dataplane.workers, topo.api.workers) == (1, 1)
    # Small enough for a 2-core machine: 1 GiB of rings in all.
    assert sum(4 * lk.ring_capacity for lk in topo.links) == 1 << 30
    assert [(s.id, s.node) for s in topo.saes] == [("SAE-1", "N1"), ("SAE-9", "N9")]


def test_per_link_values_override_defaults():
    text = defaults('block_size = "64KiB"\nring_capacity = "1MiB"\nratio = "2:1"\n'
                    "key_rate_mbps = 10")
    text = edit((LINK1_UL, LINK1_UL + '\nblock_size = 4096\nratio = "1:5"\n'
                 'key_rate_mbps = 0\nname = "bc_link"'), text=text)
    topo = parse_topology(text)
    ab, bc = topo.links
    assert (ab.block_size, ab.ring_capacity, ab.ratio, ab.key_rate_mbps) == (
        64 << 10, 1 << 20, (2, 1), 10)
    # key_rate 0 ("as fast as possible") must not fall back to the default
    assert (bc.block_size, bc.ring_capacity, bc.ratio, bc.key_rate_mbps) == (
        4096, 1 << 20, (1, 5), 0)
    assert bc.name == "bc_link"


def test_explicit_node_ids_and_addresses_and_node_net():
    text = edit(('prefix = "tt"', 'prefix = "tt"\nnode_net = "192.168.5.0/29"'),
                ('name = "B"', 'name = "B"\nid = 40\naddress = "192.168.5.6"'))
    topo = parse_topology(text)
    assert (topo.node("A").id, str(topo.node("A").address)) == (1, "192.168.5.1")
    assert (topo.node("B").id, str(topo.node("B").address)) == (40, "192.168.5.6")
    # Unset ids and addresses take the lowest ones nobody asked for.
    assert (topo.node("C").id, str(topo.node("C").address)) == (2, "192.168.5.2")


def test_relative_auth_key_file_resolves_against_the_config_file(tmp_path):
    (tmp_path / "net.toml").write_text(link0('auth_key_file = "keys/ab.key"'))
    topo = load_topology(tmp_path / "net.toml")
    assert topo.links[0].auth_key_file == (tmp_path / "keys" / "ab.key").resolve()
    assert topo.links[1].auth_key_file is None
    # Made absolute without following a link, so the link end sees (and refuses) one.
    (tmp_path / "keys").mkdir()
    (tmp_path / "real.key").write_bytes(bytes(32))
    (tmp_path / "real.key").chmod(0o600)
    (tmp_path / "keys" / "ab.key").symlink_to(tmp_path / "real.key")
    topo = load_topology(tmp_path / "net.toml")
    assert topo.links[0].auth_key_file == tmp_path / "keys" / "ab.key"
    from control.lkm.link_end import load_link_key

    with pytest.raises(SystemExit, match="symbolic link"):
        load_link_key(topo.links[0].auth_key_file)


def test_lookup_of_unknown_node_or_link_raises_config_error():
    topo = parse_topology(BASE, "net.toml")
    with pytest.raises(ConfigError, match="no node named 'Z'"):
        topo.node("Z")
    with pytest.raises(ConfigError, match="no link named 'A-C'"):
        topo.link("A-C")


# ---- each kind of mistake, reported at its field ---------------------------------------

def test_toml_syntax_error():
    err = assert_problem(BASE + "\n[[nodes]\n", "", "not valid TOML")
    assert "line" in err.problems[0][1]  # where in the file


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as ei:
        load_topology(path)
    assert ei.value.problems == [("", "file not found")]
    assert str(ei.value) == f"{path}: file not found"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_topology(tmp_path)
    assert ei.value.problems[0][0] == ""
    assert "cannot read" in ei.value.problems[0][1]


def test_a_file_that_cannot_be_read_is_refused_not_a_traceback(tmp_path):
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)  # ELOOP
    for path in (loop, tmp_path / ("x" * 300 + ".toml")):  # ENAMETOOLONG
        with pytest.raises(ConfigError, match="cannot read"):
            load_topology(path)


def test_unknown_field_typo():
    assert_problem(link0('ratoi = "3:1"'), "links[0].ratoi", "unknown field")


def test_unknown_section():
    assert_problem(BASE + "\n[defualts]\nratio = '1:1'\n", "defualts", "unknown field")


def test_missing_required_field():
    assert_problem(edit((LINK0_UL + "\n", "")), "links[0].underlay", "required field is missing")


def test_missing_network_section():
    assert_problem(edit(('[network]\nname = "t"\nprefix = "tt"\n', "")), "network",
                   "required field is missing")


@pytest.mark.parametrize(("ratio", "phrase"), [
    ("3-1", "expected 'A_TO_B:B_TO_A'"),
    ("0:0", "sends key nowhere"),
    ("1001:1", "at most 1000"),
    ("3:1:1", "expected 'A_TO_B:B_TO_A'"),
    ("-3:1", "expected 'A_TO_B:B_TO_A'"),
    ("\u00b2:1", "expected 'A_TO_B:B_TO_A'"),  # a superscript two: isdigit, not a number
])
def test_bad_ratio(ratio, phrase):
    assert_problem(link1(f'ratio = "{ratio}"'), "links[1].ratio", phrase)


def test_a_ratio_that_starves_a_direction_is_refused():
    """'0:1' was taken: end a then has no key for even its keepalives, and the link is
    never up (the review's ratio0.toml)."""
    err = assert_problem(defaults('ratio = "0:1"'), "defaults.ratio", "gives a->b no key")
    assert "keepalives" in dict(err.problems)["defaults.ratio"]
    assert_problem(link1('ratio = "5:0"'), "links[1].ratio", "gives b->a no key")


def test_a_key_rate_too_slow_for_the_keepalives_is_refused_where_it_is_set():
    """0.00001 Mb/s was taken: 0.6 B/s a direction, where keepalives alone at their
    longest period (10 s) take about 30 B/s: the link could never stay up."""
    err = assert_problem(defaults("key_rate_mbps = 0.00001"), "defaults.key_rate_mbps",
                         "for link A-B is below the")
    msg = dict(err.problems)["defaults.key_rate_mbps"]
    assert "keepalives" in msg and "pings" in msg
    assert_problem(link1("key_rate_mbps = 0.0001"), "links[1].key_rate_mbps",
                   "for link B-C is below the")


def test_the_slowest_rate_accepted_is_the_floor_and_a_lopsided_ratio_raises_it():
    # the base: two links, global key for every pair of its three nodes (12 connections)
    lsdb = lsdb_estimate([("A-B", "A", "B"), ("B-C", "B", "C")])
    floor = rate_floor((1, 1), lsdb, 12).mbps
    assert 0.001 < floor < 0.003  # about 2 kb/s: far below the slow links the design runs
    parse_topology(defaults(f"key_rate_mbps = {floor * 1.001}"), "net.toml")
    assert_problem(defaults(f"key_rate_mbps = {floor * 0.999}"), "defaults.key_rate_mbps",
                   "is below the")
    lopsided = rate_floor((100, 1), lsdb, 12).mbps
    assert lopsided == pytest.approx(floor * 101 / 2)
    assert_problem(link1(f'key_rate_mbps = {floor * 2}\nratio = "100:1"'),
                   "links[1].key_rate_mbps", "is below the")
    parse_topology(defaults("key_rate_mbps = 0"), "net.toml")  # as fast as the source


def test_without_global_key_the_floor_is_the_keepalives_alone():
    text = edit(('[[saes]]', '[gkm]\npairs = []\n\n[[saes]]'),
                text=defaults("key_rate_mbps = 0.0015"))
    parse_topology(text, "net.toml")  # refused with the relay's 12 connections' pings
    assert_problem(defaults("key_rate_mbps = 0.0015"), "defaults.key_rate_mbps", "below")


def test_bad_ratio_in_defaults():
    assert_problem(defaults('ratio = "3-1"'), "defaults.ratio", "expected 'A_TO_B:B_TO_A'")


def test_bad_size_string():
    err = assert_problem(link1('block_size = "12 parsecs"'), "links[1].block_size",
                         "expected a size like")
    assert "'12 parsecs'" in err.problems[0][1]


def test_bad_size_string_in_defaults():
    assert_problem(defaults('ring_capacity = "12 parsecs"'), "defaults.ring_capacity",
                   "expected a size like")


@pytest.mark.parametrize("size", ["16", '"17MiB"', "0"])
def test_block_size_out_of_range(size):
    assert_problem(link0(f"block_size = {size}"), "links[0].block_size", "must be between")


def test_block_size_limits_are_inclusive():
    topo = parse_topology(link0('block_size = 32\nring_capacity = "32MiB"'))
    assert topo.links[0].block_size == 32
    topo = parse_topology(link0('block_size = "16MiB"\nring_capacity = "32MiB"'))
    assert topo.links[0].block_size == 16 << 20


@pytest.mark.parametrize("cap", ["0", '"5GiB"'])
def test_ring_capacity_out_of_range(cap):
    assert_problem(link0(f"ring_capacity = {cap}"), "links[0].ring_capacity", "must be between")


def test_ring_capacity_smaller_than_block():
    assert_problem(link1('block_size = "1MiB"\nring_capacity = "512KiB"'),
                   "links[1].ring_capacity", "smaller than one key block")


def test_ring_capacity_smaller_than_default_block():
    text = edit((LINK1_UL, LINK1_UL + '\nring_capacity = "64KiB"'),
                text=defaults('block_size = "1MiB"'))
    err = assert_problem(text, "links[1].ring_capacity", "smaller than one key block")
    assert [f for f, _ in err.problems] == ["links[1].ring_capacity"]


def test_link_endpoint_names_unknown_node():
    err = assert_problem(edit(('b = "C"', 'b = "D"')), "links[1].b", "no node named 'D'")
    assert "known: A, B, C" in err.problems[0][1]


def test_link_with_a_equal_b():
    assert_problem(edit(('b = "C"', 'b = "B"')), "links[1].b", "two different nodes")


def test_duplicate_node_names():
    assert_problem(edit(('name = "C"', 'name = "B"'), ('b = "C"', 'b = "A"')),
                   "nodes[2].name", "duplicate node name 'B'")


def test_duplicate_node_ids():
    text = edit(('name = "A"', 'name = "A"\nid = 7'), ('name = "C"', 'name = "C"\nid = 7'))
    err = assert_problem(text, "nodes[0].id", "duplicate node id 7")
    assert ("nodes[2].id", "duplicate node id 7") in err.problems


def test_node_address_outside_node_net():
    assert_problem(edit(('name = "B"', 'name = "B"\naddress = "10.99.0.2"')),
                   "nodes[1].address", "outside network.node_net")


def test_node_net_too_small():
    assert_problem(edit(('prefix = "tt"', 'prefix = "tt"\nnode_net = "10.88.0.0/30"')),
                   "network.node_net", "too small")


def test_duplicate_link_between_the_same_pair():
    # the same pair in the other order is still the same pair
    text = BASE + '\n[[links]]\na = "B"\nb = "A"\nunderlay = ["10.9.3.1/30", "10.9.3.2/30"]\n'
    err = assert_problem(text, "links[2]", "already joined by links[0]")
    assert len(err.problems) == 1


def test_duplicate_link_name():
    text = edit((LINK1_UL, LINK1_UL + '\nname = "A-B"'))
    assert_problem(text, "links[1].name", "duplicate link name 'A-B'")


def test_bad_link_name():
    assert_problem(link0('name = "a b"'), "links[0].name", "must be 1-17 letters")


def test_underlay_addresses_not_in_one_subnet():
    text = edit((LINK1_UL, 'underlay = ["10.9.2.1/30", "10.9.2.5/30"]'))
    assert_problem(text, "links[1].underlay", "not in one subnet")


def test_underlay_same_address_at_both_ends():
    text = edit((LINK1_UL, 'underlay = ["10.9.2.1/30", "10.9.2.1/30"]'))
    assert_problem(text, "links[1].underlay", "same address")


def test_underlay_address_reused():
    text = edit((LINK1_UL, 'underlay = ["10.9.2.1/30", "10.9.1.2/30"]'),
                text=edit((LINK0_UL, 'underlay = ["10.9.1.1/24", "10.9.1.2/24"]')))
    err = assert_problem(text, "links[1].underlay[1]", "10.9.1.2 is already used by")
    assert "links[0].underlay[1]" in dict(err.problems)["links[1].underlay[1]"]


@pytest.mark.parametrize(("pair", "end", "phrase"), [
    (("10.9.2.0/30", "10.9.2.3/30"), 0, "10.9.2.0 is the network address of 10.9.2.0/30"),
    (("10.9.2.0/30", "10.9.2.3/30"), 1, "10.9.2.3 is the broadcast address of 10.9.2.0/30"),
    (("224.0.0.1/30", "224.0.0.2/30"), 0, "a multicast address"),
    (("0.0.0.0/8", "0.0.0.1/8"), 0, "the unspecified address"),
    (("169.254.1.1/30", "169.254.1.2/30"), 1, "a link-local address"),
    (("240.0.0.1/30", "240.0.0.2/30"), 0, "a reserved address"),
])
def test_underlay_address_that_no_link_can_use(pair, end, phrase):
    """Accepted before, and the link then never came up (loopback: routed to lo)."""
    text = edit((LINK1_UL, f'underlay = ["{pair[0]}", "{pair[1]}"]'))
    assert_problem(text, f"links[1].underlay[{end}]", phrase)


def test_a_loopback_underlay_is_for_two_ends_on_one_host_not_for_net_up():
    """The topology check takes loopback (two link ends on one host, as the key manager
    tests run them); ``net up``, which puts the addresses on veths, refuses it."""
    from control.tools.preflight import wire_problems

    topo = parse_topology(edit((LINK1_UL, 'underlay = ["127.9.2.1/30", "127.9.2.2/30"]')),
                          "n.toml")
    assert [(f, "loopback" in why) for f, why in wire_problems(topo)] == [
        ("links[1].underlay[0]", True), ("links[1].underlay[1]", True)]


def test_underlay_of_a_31_has_no_network_or_broadcast_address():
    parse_topology(edit((LINK1_UL, 'underlay = ["10.9.2.0/31", "10.9.2.1/31"]')), "n.toml")


def test_bad_underlay_address():
    assert_problem(edit((LINK1_UL, 'underlay = ["10.9.2.1/30", "10.9.2.300/30"]')),
                   "links[1].underlay[1]", "not a valid IPv4 interface")


def test_sae_on_unknown_node():
    assert_problem(edit(('node = "A"', 'node = "Z"')), "saes[0].node", "no node named 'Z'")


def test_duplicate_sae_id():
    text = BASE + '\n[[saes]]\nid = "S1"\nnode = "B"\n'
    err = assert_problem(text, "saes[1].id", "duplicate SAE id 'S1'")
    assert [f for f, _ in err.problems] == ["saes[1].id"]


def test_bad_sae_id():
    assert_problem(edit(('id = "S1"', 'id = "S 1"')), "saes[0].id", "pattern")


@pytest.mark.parametrize("prefix", ["Bad-Prefix", "t", "1abc", "abcdefghi"])
def test_bad_prefix(prefix):
    assert_problem(edit(('prefix = "tt"', f'prefix = "{prefix}"')), "network.prefix",
                   "lowercase letters or digits")


@pytest.mark.parametrize("name", ["1A", "A-B", "ABCDEFGHI", ""])
def test_bad_node_name(name):
    assert_problem(edit(('name = "C"', f'name = "{name}"')), "nodes[2].name",
                   "must be 1-8 letters")


def test_too_few_nodes_and_links():
    text = 'links = []\n[network]\nname = "t"\nprefix = "tt"\n[[nodes]]\nname = "A"\n'
    probs = problems_of(text)
    assert {f for f, _ in probs} == {"nodes", "links"}


def test_several_mistakes_are_reported_together():
    text = edit(('prefix = "tt"', 'prefix = "Bad-Prefix"'),
                ('name = "C"', 'name = "1C"'),
                (LINK0_UL, LINK0_UL + '\nratoi = "3:1"'),
                (LINK1_UL, LINK1_UL + '\nblock_size = "12 parsecs"\nratio = "0:0"'))
    with pytest.raises(ConfigError) as ei:
        parse_topology(text, "net.toml")
    fields = [f for f, _ in ei.value.problems]
    assert sorted(fields) == sorted(["network.prefix", "nodes[2].name", "links[0].ratoi",
                                     "links[1].block_size", "links[1].ratio"])
    lines = str(ei.value).splitlines()
    assert len(lines) == 5
    assert all(line.startswith("net.toml: ") for line in lines)


def test_several_cross_field_mistakes_are_reported_together():
    text = edit(('b = "C"', 'b = "D"'),
                ('node = "A"', 'node = "Z"'),
                (LINK0_UL, 'underlay = ["10.9.1.1/30", "10.9.1.5/30"]'))
    text += '\n[[saes]]\nid = "S1"\nnode = "B"\n'
    probs = problems_of(text)
    assert [f for f, _ in probs] == ["links[0].underlay", "links[1].b", "saes[0].node",
                                     "saes[1].id"]


# ---- parse_size and parse_ratio -------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (1048576, 1048576),
    (0, 0),
    ("4096", 4096),
    ("100B", 100),
    ("64KiB", 64 << 10),
    ("64 KiB", 64 << 10),
    ("1MiB", 1 << 20),
    ("1mib", 1 << 20),
    (" 2 GiB ", 2 << 30),
    ("5KB", 5000),
    ("1MB", 1_000_000),
    ("3GB", 3_000_000_000),
])
def test_parse_size_accepts(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [
    "12 parsecs", "1.5MiB", "-1MiB", "MiB", "", "1 MiB B", "1TiB", 1.5, None, True, [1],
])
def test_parse_size_refuses(value):
    with pytest.raises(ValueError, match="expected a size like"):
        parse_size(value)


@pytest.mark.parametrize(("value", "expected"), [
    ("1:1", (1, 1)), ("3:1", (3, 1)), ("1:1000", (1, 1000)), ("1000:1", (1000, 1)),
    (" 2 : 5 ", (2, 5)),
])
def test_parse_ratio_accepts(value, expected):
    assert parse_ratio(value) == expected


@pytest.mark.parametrize(("value", "phrase"), [
    ("3-1", "expected 'A_TO_B:B_TO_A'"),
    ("3", "expected 'A_TO_B:B_TO_A'"),
    ("3:", "expected 'A_TO_B:B_TO_A'"),
    ("a:b", "expected 'A_TO_B:B_TO_A'"),
    ("1.5:1", "expected 'A_TO_B:B_TO_A'"),
    ("-1:2", "expected 'A_TO_B:B_TO_A'"),
    ((3, 1), "expected 'A_TO_B:B_TO_A'"),
    (3, "expected 'A_TO_B:B_TO_A'"),
    ("0:0", "sends key nowhere"),
    ("0:1", "gives a->b no key"),
    ("1000:0", "gives b->a no key"),
    ("1:1001", "at most 1000"),
])
def test_parse_ratio_refuses(value, phrase):
    with pytest.raises(ValueError, match=phrase):
        parse_ratio(value)


# ---- real bugs, kept as expected failures ----------------------------------------------

@pytest.mark.parametrize(("extra", "field"), [
    ("block_size = 0", "defaults.block_size"),
    ("block_size = 1", "defaults.block_size"),
    ('ring_capacity = "8GiB"', "defaults.ring_capacity"),
])
def test_defaults_sizes_are_range_checked(extra, field):
    assert_problem(defaults(extra), field, "must be between")


def test_auto_node_id_does_not_collide_with_explicit_id():
    text = edit(('name = "A"', 'name = "A"\nid = 2'))
    try:
        topo = parse_topology(text)
    except ConfigError:
        return  # refusing the file is an acceptable fix too
    ids = [n.id for n in topo.nodes.values()]
    assert len(set(ids)) == len(ids), ids


def test_auto_node_address_does_not_collide_with_explicit_address():
    text = edit(('name = "A"', 'name = "A"\naddress = "10.88.0.2"'))
    try:
        topo = parse_topology(text)
    except ConfigError:
        return
    addrs = [n.address for n in topo.nodes.values()]
    assert len(set(addrs)) == len(addrs), addrs


@pytest.mark.parametrize("text", [
    edit(('prefix = "tt"', 'prefix = "tt\\n"')),
    edit(('name = "C"', 'name = "C\\n"'), ('b = "C"', 'b = "C\\n"\nname = "BC"')),
    edit(('b = "C"', 'b = "C"\nname = "BC\\n"')),
], ids=["prefix", "node", "link"])
def test_names_with_trailing_newline_are_refused(text):
    problems_of(text)


# ---- [gkm] ---------------------------------------------------------------------------------

def gkm(section: str) -> str:
    return BASE.replace("[[nodes]]", "[gkm]\n" + section + "\n[[nodes]]", 1)


def test_gkm_defaults_keep_every_pair_both_ways():
    t = parse_topology(BASE)
    assert (t.gkm.block_size, t.gkm.low_watermark, t.gkm.high_watermark, t.gkm.window) == \
        (1 << 20, 32 << 20, 64 << 20, 16 << 20)
    assert set(t.gkm.pairs) == {("A", "B"), ("B", "A"), ("A", "C"), ("C", "A"), ("B", "C"),
                                ("C", "B")}
    assert t.gkm.destinations_of("A") == ["B", "C"] and t.gkm.origins_of("C") == ["A", "B"]


def test_gkm_explicit_pairs_and_none():
    t = parse_topology(gkm('pairs = [["A", "C"]]\nblock_size = "32B"\n'
                           'low_watermark = 32\nhigh_watermark = 64\nwindow = 32'))
    assert t.gkm.pairs == (("A", "C"), ("C", "A"))
    assert t.gkm.destinations_of("B") == [] and t.gkm.origins_of("B") == []
    assert parse_topology(gkm("pairs = []")).gkm.pairs == ()


def test_gkm_relay_keys_default_to_the_run_dir_and_resolve_against_the_file(tmp_path):
    from control.core import paths

    t = parse_topology(BASE)
    assert t.gkm.keys == paths.network_dir("tt") / "relay-keys"
    assert t.gkm.nodes() == ["A", "B", "C"]
    assert parse_topology(gkm("pairs = []")).gkm.nodes() == []
    (tmp_path / "net.toml").write_text(gkm('keys = "relay"'))
    assert load_topology(tmp_path / "net.toml").gkm.keys == (tmp_path / "relay").resolve()
    assert parse_topology(gkm('keys = "/etc/qkdnet/relay"')).gkm.keys == \
        Path("/etc/qkdnet/relay")


@pytest.mark.parametrize("section, field, phrase", [
    ('block_size = "31B"', "gkm.block_size", "between 32 B and 16 MiB"),
    ('block_size = "17MiB"', "gkm.block_size", "between 32 B and 16 MiB"),
    ('low_watermark = 67000000\nhigh_watermark = "64MiB"', "gkm.high_watermark",
     "at least one block"),
    ('high_watermark = "32MiB"\nlow_watermark = "32MiB"', "gkm.high_watermark",
     "at least one block"),
    ('window = "512KiB"', "gkm.window", "smaller than one block"),
    ('window = 0', "gkm.window", "between 1 B and"),
    ('pairs = [["A", "Z"]]', "gkm.pairs[0][1]", "no node named 'Z'"),
    ('pairs = [["A", "A"]]', "gkm.pairs[0]", "two different nodes"),
    ('pairs = [["A", "B"], ["B", "A"]]', "gkm.pairs[1]", "listed twice"),
    ('pairs = "some"', "gkm.pairs", ""),
    ('pair = "all"', "gkm.pair", "unknown field"),
])
def test_gkm_mistakes_are_refused_at_their_field(section, field, phrase):
    assert_problem(gkm(section), field, phrase)


def test_metrics_defaults_and_section():
    topo = parse_topology(BASE, "net.toml")
    assert topo.metrics.enabled and topo.metrics.port == 9464
    topo = parse_topology(BASE + "[metrics]\nenabled = false\nport = 9100\n", "net.toml")
    assert not topo.metrics.enabled and topo.metrics.port == 9100


@pytest.mark.parametrize("port", [0, 65536])
def test_metrics_port_out_of_range(port):
    assert_problem(BASE + f"[metrics]\nport = {port}\n", "metrics.port", "")


def test_metrics_port_must_differ_from_the_other_node_address_ports():
    assert_problem(BASE + "[metrics]\nport = 8443\n", "metrics.port", "ports.api")
    assert_problem(BASE + "[ports]\nrelay = 9464\n", "metrics.port", "ports.relay")
    parse_topology(BASE + "[metrics]\nport = 8443\nenabled = false\n", "net.toml")


@pytest.mark.parametrize("value", ["inf", "nan", "1e9"])
def test_a_key_rate_that_is_not_a_finite_rate_is_refused_not_a_crash(value):
    problems = problems_of(defaults(f"key_rate_mbps = {value}"))
    assert [f for f, _ in problems] == ["defaults.key_rate_mbps"]
    problems = problems_of(link0(f"key_rate_mbps = {value}"))
    assert [f for f, _ in problems] == ["links[0].key_rate_mbps"]


@pytest.mark.parametrize("net,field", [("10.88.0.0/30", "network.node_net"),
                                       ("10.89.7.0/30", "dataplane.tunnel_net")])
def test_an_underlay_inside_the_otp_networks_addresses_is_refused(net, field):
    ul = net.removesuffix("0/30")
    text = edit((LINK0_UL, f'underlay = ["{ul}1/30", "{ul}2/30"]'))
    assert_problem(text, "links[0].underlay", f"overlaps {field}")


def test_ports_past_65535_or_two_listeners_on_one_port_are_refused():
    assert_problem(edit(('prefix = "tt"\n', 'prefix = "tt"\n[ports]\nagreement = 65535\n')),
                   "ports.agreement", "passes 65535")
    assert_problem(edit(('prefix = "tt"\n', 'prefix = "tt"\n[ports]\ntunnel = 65500\n')),
                   "ports.tunnel", "passes 65535")
    assert_problem(edit(('prefix = "tt"\n', 'prefix = "tt"\n[ports]\nrelay = 9000\n'
                                            'api = 9000\n')), "ports.api", "already ports.relay")
    parse_topology(edit(('prefix = "tt"\n', 'prefix = "tt"\n[ports]\nagreement = 65534\n'
                                            'tunnel = 65472\n')), "net.toml")  # just fits
    assert_problem(edit(('prefix = "tt"\n', 'prefix = "tt"\n[ports]\ntunnel = 65473\n')),
                   "ports.tunnel", "passes 65535")


def test_an_underlay_on_a_wide_lan_around_the_otp_network_is_fine():
    text = edit((LINK0_UL, 'underlay = ["10.201.1.1/8", "10.201.1.2/8"]'))
    assert parse_topology(text, "net.toml").links[0].underlay_a.network.prefixlen == 8
