"""Tests of control/tools/preflight.py: what keeps a valid topology from coming up on a
machine, driven with the machine's facts given (no I/O)."""

from __future__ import annotations

from pathlib import Path

from control.core.config import parse_topology
from control.tools.preflight import given_dir_problems, ring_bytes, shm_problems
from dataplane.limits import RING_HEADER_SIZE
from tests.test_config import LINK0_UL, edit

GIB, MIB = 1 << 30, 1 << 20

def topo(defaults: str = "", link0: str = "", sections: str = "", path: str = "/etc/n.toml"):
    """test_config's three-node network, with a [defaults] table, other sections, and
    lines for link 0."""
    head = 'prefix = "tt"\n'
    text = edit((head, head + (f"[defaults]\n{defaults}\n" if defaults else "") + sections),
                (LINK0_UL, f"{LINK0_UL}\n{link0}"))
    return parse_topology(text, path)


def test_the_rings_of_a_network_are_four_per_link():
    t = topo('ring_capacity = "4GiB"')
    assert ring_bytes(t) == 2 * 4 * (4 * GIB + RING_HEADER_SIZE)


def test_rings_larger_than_dev_shm_are_refused_at_the_field_that_sets_them():
    """The review's ring4g.toml: 4 GiB rings on a machine with far less /dev/shm came up,
    and a node dies of SIGBUS once its rings fill past it."""
    t = topo('ring_capacity = "4GiB"')
    [(field, msg)] = shm_problems(t, free=20 * GIB, total=24 * GIB)
    assert field == "defaults.ring_capacity"
    assert "need 32.0 GiB" in msg and "20.0 GiB free of 24.0 GiB" in msg
    assert "2 links x 4 rings" in msg
    assert shm_problems(t, free=33 * GIB, total=40 * GIB) == []


def test_the_largest_rings_are_named_where_a_link_sets_them_or_where_to_set_them():
    t = topo(link0='ring_capacity = "1GiB"')
    [(field, _)] = shm_problems(t, free=MIB, total=GIB)
    assert field == "links[0].ring_capacity"
    t = topo("key_rate_mbps = 1000")  # 128 MiB each, derived
    [(field, msg)] = shm_problems(t, free=MIB, total=GIB)
    assert field == "links[0].ring_capacity" and "derived from its key rate" in msg


def facts(*present: str):
    have = {Path(p) for p in present}
    return (lambda p: Path(p) in have), (lambda p: Path(p) in have)


def test_a_pki_or_relay_key_dir_the_file_names_must_exist():
    """A typo in [api] pki made a new CA there (every SAE then got 401): now net up
    refuses, pointing to the init commands."""
    t = topo(sections='[api]\npki = "/srv/pki"\n[gkm]\nkeys = "/srv/relay"\n')
    problems = dict(given_dir_problems(t, *facts()))
    assert "/srv/pki does not exist" in problems["api.pki"]
    assert "qkdctl pki init /srv/pki --config /etc/n.toml" in problems["api.pki"]
    assert "/srv/relay does not exist" in problems["gkm.keys"]
    assert "qkdctl keys init /srv/relay --config /etc/n.toml" in problems["gkm.keys"]
    problems = dict(given_dir_problems(t, *facts("/srv/pki", "/srv/relay")))
    assert "/srv/pki holds no CA" in problems["api.pki"]
    assert "/srv/relay holds no relay keys" in problems["gkm.keys"]
    made = facts("/srv/pki", "/srv/pki/ca.crt", "/srv/relay", "/srv/relay/A.key_secret")
    assert given_dir_problems(t, *made) == []


def test_relative_dirs_are_named_resolved_and_left_out_ones_are_made_by_net_up():
    t = topo(sections='[api]\npki = "pki"\n', path="/etc/q/n.toml")
    [(field, msg)] = given_dir_problems(t, *facts())
    assert field == "api.pki" and msg.startswith("/etc/q/pki does not exist")
    assert given_dir_problems(topo(), *facts()) == []  # the run dir's: net up makes them
