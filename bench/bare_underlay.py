"""The OTP tunnel's ceiling: TCP over the bare underlay between the bench's own namespaces,
no tunnel, directly or through middle nodes with the kernel forwarding.

A node's router closes its underlay interfaces to forwarding (nothing from the untrusted
underlay is routed on), so a path through a middle node opens them for the time of the
measurement only, with one /32 route each way, and puts every setting back after, even
on failure or Ctrl-C. Only the bench network's namespaces are touched.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence

from control.core.config import LinkSpec, Topology
from control.tools.emulation import underlay_ifname


def link_between(topo: Topology, a: str, b: str) -> LinkSpec:
    for lk in topo.links:
        if {lk.a, lk.b} == {a, b}:
            return lk
    raise ValueError(f"no link between {a} and {b}")


def address_on(link: LinkSpec, node: str) -> str:
    """``node``'s underlay address on ``link``."""
    return str(link.underlay_of(node).ip)


def hops(topo: Topology, nodes: Sequence[str]) -> list[tuple[str, str, LinkSpec]]:
    """(from, to, link) for each step of the path ``nodes`` (adjacent nodes linked)."""
    if len(nodes) < 2:
        raise ValueError("a path has at least two nodes")
    return [(x, y, link_between(topo, x, y)) for x, y in zip(nodes, nodes[1:], strict=False)]


def ends(topo: Topology, nodes: Sequence[str]) -> tuple[str, str]:
    """The first node's underlay address on the path's first link, the last node's on its
    last link: what iperf3 binds and targets."""
    steps = hops(topo, nodes)
    return address_on(steps[0][2], nodes[0]), address_on(steps[-1][2], nodes[-1])


def _sysctl(ns: str, name: str, value: str | None = None) -> str:
    """Read (or set) a sysctl inside namespace ``ns``."""
    args = ["ip", "netns", "exec", ns, "sysctl", "-n"]
    args += ["-w", f"{name}={value}"] if value is not None else [name]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def routes(topo: Topology, netns: dict[str, str], nodes: Sequence[str]
           ) -> list[tuple[str, str, str]]:
    """(namespace, destination, gateway) for a /32 route to the far end at every node of
    the path but the last (and back to the first at every node but the first), leaving
    out the ends' own subnets (a route via the destination itself)."""
    steps = hops(topo, nodes)
    src, dst = ends(topo, nodes)
    out = []
    for x, y, lk in steps:
        fwd, back = (netns[x], dst, address_on(lk, y)), (netns[y], src, address_on(lk, x))
        out += [r for r in (fwd, back) if r[1] != r[2]]
    return out


def forwarding(topo: Topology, netns: dict[str, str], nodes: Sequence[str]
               ) -> list[tuple[str, str]]:
    """(namespace, sysctl name) of the forwarding switch of every middle node's underlay
    interface on the path."""
    steps = hops(topo, nodes)
    return [(netns[node], f"net.ipv4.conf.{underlay_ifname(lk.index)}.forwarding")
            for i, node in enumerate(nodes[1:-1], 1)
            for lk in (steps[i - 1][2], steps[i][2])]


@contextlib.contextmanager
def path(topo: Topology, netns: dict[str, str], nodes: Sequence[str],
         mtu: int | None = None) -> Iterator[tuple[str, str]]:
    """The bare underlay path along ``nodes`` (``netns``: node -> namespace), as (source
    address, destination address). For the block's time only: the routes of
    :func:`routes` and forwarding on the middle nodes' underlay interfaces; with ``mtu``,
    the source's route to the destination carries it as its path MTU (TCP then sends
    segments of at most ``mtu`` - 40 bytes), the interfaces keep theirs."""
    from pyroute2 import IPRoute

    src, dst = ends(topo, nodes)
    first = (netns[nodes[0]], dst, address_on(hops(topo, nodes)[0][2], nodes[1]))
    todo = routes(topo, netns, nodes)
    if mtu is not None and first not in todo:
        todo.insert(0, first)  # direct: a route via the destination itself, for its MTU
    opened: list[tuple[str, str, str]] = []  # (namespace, sysctl, old value)
    added: list[tuple[str, str, str]] = []
    try:
        for ns, name in forwarding(topo, netns, nodes):
            opened.append((ns, name, _sysctl(ns, name)))
            _sysctl(ns, name, "1")
        for ns, to, gw in todo:
            extra = {"metrics": {"mtu": mtu}} if mtu is not None and (ns, to, gw) == first \
                else {}
            with IPRoute(netns=ns) as ip:
                ip.route("replace", dst=f"{to}/32", gateway=gw, **extra)
            added.append((ns, to, gw))
        yield src, dst
    finally:
        for ns, to, gw in reversed(added):
            with contextlib.suppress(Exception), IPRoute(netns=ns) as ip:
                ip.route("del", dst=f"{to}/32", gateway=gw)
        for ns, name, old in reversed(opened):
            with contextlib.suppress(Exception):
                _sysctl(ns, name, old)
