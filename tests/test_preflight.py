"""Tests of control/tools/preflight.py: what keeps a valid topology from coming up on a
machine, driven with the machine's facts given (no I/O)."""

from __future__ import annotations

from control.core.config import parse_topology
from control.tools.preflight import ring_bytes, shm_problems
from dataplane.limits import RING_HEADER_SIZE

GIB, MIB = 1 << 30, 1 << 20

BASE = """\
[network]
name = "t"
prefix = "tt"
{defaults}
{sections}
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
{link0}
[[links]]
a = "B"
b = "C"
underlay = ["10.9.2.1/30", "10.9.2.2/30"]

[[saes]]
id = "S1"
node = "A"
"""


def topo(defaults: str = "", link0: str = "", sections: str = "", path: str = "/etc/n.toml"):
    text = BASE.format(defaults=f"[defaults]\n{defaults}\n" if defaults else "",
                       link0=link0, sections=sections)
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

