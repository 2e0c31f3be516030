"""Checks of a valid topology against facts of the machine it is brought up on (pure: the
facts are passed in; ``emulation.machine_problems`` asks them). `qkdctl check` cannot know
them; `qkdctl net up` asks before it creates anything, and reports in the topology's own
terms (file, field, what is wrong)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from control.core.config import Topology, underlay_address_problem
from control.core.units import size
from dataplane.limits import RING_HEADER_SIZE

RINGS_PER_LINK = 4  # each end holds a ring per direction


def ring_bytes(topo: Topology) -> int:
    """What the network's key rings take in /dev/shm once full: they are sparse files
    that grow as key arrives, and a write to one past tmpfs's end is a SIGBUS."""
    return sum(RINGS_PER_LINK * (RING_HEADER_SIZE + lk.ring_capacity) for lk in topo.links)


def wire_problems(topo: Topology) -> list[tuple[str, str]]:
    """Underlay addresses ``net up`` cannot put on a veth (loopback, which the topology
    check allows for two link ends on one host)."""
    return [(f"links[{lk.index}].underlay[{j}]", why)
            for lk in topo.links for j, iface in enumerate((lk.underlay_a, lk.underlay_b))
            if (why := underlay_address_problem(iface, on_a_wire=True)) is not None]


def shm_problems(topo: Topology, free: int, total: int) -> list[tuple[str, str]]:
    """The rings must fit what /dev/shm has free (``free`` of ``total`` bytes); reported
    at the field that sets the largest rings (where to start), or where to set them."""
    need = ring_bytes(topo)
    if need <= free:
        return []
    big = max(topo.links, key=lambda lk: lk.ring_capacity)
    field = big.ring_capacity_set_in or f"links[{big.index}].ring_capacity"
    how = "" if big.ring_capacity_set_in else ", derived from its key rate"
    return [(field, f"the network's rings need {size(need)} of /dev/shm together "
                    f"({len(topo.links)} links x {RINGS_PER_LINK} rings; link {big.name}'s "
                    f"are {size(big.ring_capacity)} each{how}), and /dev/shm has "
                    f"{size(free)} free of {size(total)}: a ring filling past it would "
                    f"kill its node (SIGBUS); set a smaller ring_capacity, or give /dev/shm "
                    f"more room")]


def given_dir_problems(topo: Topology, is_dir: Callable[[Path], bool],
                       exists: Callable[[Path], bool]) -> list[tuple[str, str]]:
    """A PKI or relay key directory the file names must be one made by ``qkdctl pki
    init`` / ``keys init``: net up makes them only where the file names none (in the
    run dir). Made anywhere else, a typo in the path would give a new CA that no SAE's
    certificate chains to (every SAE then gets 401), and keys no other host holds."""
    from control.gkm.relay_keys import secret_path

    out = []
    pki, keys = topo.api.pki, topo.gkm.keys
    if topo.saes and topo.api.pki_given and not exists(pki / "ca.crt"):
        what = "holds no CA (ca.crt)" if is_dir(pki) else "does not exist"
        out.append(("api.pki", f"{pki} {what}: make the network's certificates with "
                               f"'qkdctl pki init {pki} --config {topo.path}' (or fix the "
                               f"path; net up makes them only when [api] pki is left out)"))
    nodes = topo.gkm.nodes()
    if nodes and topo.gkm.keys_given and \
            not any(exists(secret_path(keys, n)) for n in nodes):
        what = "holds no relay keys" if is_dir(keys) else "does not exist"
        out.append(("gkm.keys", f"{keys} {what}: make them with 'qkdctl keys init {keys} "
                                f"--config {topo.path}' (or fix the path; net up makes them "
                                f"only when [gkm] keys is left out)"))
    return out
