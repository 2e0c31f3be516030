"""Checks of a valid topology against facts of the machine it is brought up on (pure: the
facts are passed in; ``emulation.machine_problems`` asks them). `qkdctl check` cannot know
them; `qkdctl net up` asks before it creates anything, and reports in the topology's own
terms (file, field, what is wrong)."""

from __future__ import annotations

from control.core.config import Topology
from control.core.units import size
from dataplane.limits import RING_HEADER_SIZE

RINGS_PER_LINK = 4  # each end holds a ring per direction


def ring_bytes(topo: Topology) -> int:
    """What the network's key rings take in /dev/shm once full: they are sparse files
    that grow as key arrives, and a write to one past tmpfs's end is a SIGBUS."""
    return sum(RINGS_PER_LINK * (RING_HEADER_SIZE + lk.ring_capacity) for lk in topo.links)


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

