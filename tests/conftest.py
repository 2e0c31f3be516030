"""Shared fixtures for tests that create real kernel objects.

Every such test gets its own network prefix (unique per run) and removes everything it
made, also when it fails.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from bench.topology import line, network, render
from control.core.config import Topology, parse_topology
from control.tools import emulation

# Property tests run on busy and slow machines too (CI, a fresh VM 2-3x slower than a
# developer's): no per-example deadline, and no health check that times input generation.
# The number of examples, which is what makes a property test thorough, stays as set.
settings.register_profile("qkdnet", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "qkdnet"))


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0 and shutil.which("ip"):
        return
    skip = pytest.mark.skip(reason="needs root and iproute2 for namespaces and veth")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def prefix():
    """A unique network prefix; whatever the test made under it is removed afterwards."""
    p = "t" + uuid.uuid4().hex[:7]
    yield p
    emulation.net_down(p)


def two_nodes(prefix: str, *, rate: float = 200, block: str = "64KiB",
              capacity: str = "4MiB", ratio: str = "1:1") -> str:
    """TOML of A - B (underlay 10.209.1.0/30, the default key source), no global key."""
    return render(network("test-two", prefix,
                          defaults={"key_rate_mbps": rate, "block_size": block,
                                    "ring_capacity": capacity, "ratio": ratio},
                          ports={"agreement": 7301},
                          gkm={"pairs": []}),  # this network tests other modules
                  line("AB", 209, source=None))


def write_topology(tmp_path: Path, prefix: str, *, rate: float = 200, block: str = "64KiB",
                   capacity: str = "4MiB", ratio: str = "1:1") -> Topology:
    """``two_nodes`` written to ``tmp_path`` and parsed."""
    path = tmp_path / f"{prefix}.toml"
    path.write_text(two_nodes(prefix, rate=rate, block=block, capacity=capacity, ratio=ratio))
    return parse_topology(path.read_text(), path)


@pytest.fixture
def opened():
    """Close every key ring a test opened, even when it fails."""
    rings: list = []
    yield rings
    for r in rings:
        r.close()


def key(n: int, seed: int = 0) -> bytes:
    """Distinct, non-zero key bytes (so a wipe is visible)."""
    return bytes((seed + i) % 255 + 1 for i in range(n))
