"""Where a network's run-time objects live, all derived from its prefix.

Everything an emulated network creates carries the prefix, so two networks and the host
never collide and `qkdctl net down` can find all of it, even after a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

RUN_ROOT = Path(os.environ.get("QKDNET_RUN_DIR", "/run/qkdnet"))
SHM_PREFIX = "qkdnet-"


def network_dir(prefix: str) -> Path:
    return RUN_ROOT / prefix


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
