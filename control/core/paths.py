"""Where a network's run-time objects live, all derived from its prefix.

Everything an emulated network creates carries the prefix, so two networks and the host
never collide and `qkdctl net down` can find all of it, even after a crash.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

RUN_ROOT = Path(os.environ.get("QKDNET_RUN_DIR", "/run/qkdnet"))
SHM_PREFIX = "qkdnet-"
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{1,7}")


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a network prefix; ValueError otherwise. Every path of a network
    is made from it (and ``net down`` removes its directory), so a prefix given on the
    command line is never a path: '/home' or '../var' are refused here, for everyone."""
    if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not a network prefix (2-8 lowercase letters and "
                         f"digits, starting with a letter)")
    return prefix


def network_dir(prefix: str) -> Path:
    return RUN_ROOT / check_prefix(prefix)


def manifest_path(prefix: str) -> Path:
    return network_dir(prefix) / "net.json"


def node_dir(prefix: str, node: str) -> Path:
    return network_dir(prefix) / "nodes" / node


def state_dir(prefix: str, node: str) -> Path:
    """Durable per-node state (cursor files) in emulation; deployments pass --state-dir."""
    return node_dir(prefix, node) / "state"


def emulator_socket(prefix: str, link: str, node: str) -> Path:
    return network_dir(prefix) / "emu" / f"{link}.{node}.sock"


def link_key_path(prefix: str, link: str) -> Path:
    return network_dir(prefix) / "keys" / f"{link}.key"


def log_dir(prefix: str) -> Path:
    return network_dir(prefix) / "logs"


def netns_name(prefix: str, node: str) -> str:
    return f"{prefix}-{node}"


def ring_name(prefix: str, node: str, link: str, direction: str) -> str:
    """Shared-memory name of the ring for ``direction`` ('ab' or 'ba') at ``node``."""
    return f"{SHM_PREFIX}{prefix}-{node}-{link}-{direction}"


def stats_name(prefix: str, node: str, link: str) -> str:
    """Shared-memory name of a link end's dataplane counters."""
    return f"{SHM_PREFIX}{prefix}-{node}-{link}-stats"


def ring_names_of_network(prefix: str) -> list[str]:
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.glob(f"{SHM_PREFIX}{prefix}-*"))
