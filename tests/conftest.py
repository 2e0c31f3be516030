"""Shared fixtures for tests that create real kernel objects.

Every such test gets its own network prefix (unique per run) and removes everything it
made, also when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from bench.topology import line, network, render
from control.core import paths
from control.core.config import Topology, parse_topology
from control.tools import emulation
from dataplane.ring import MAX_LANES, KeyRing, RingError

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the item, so a fixture's teardown knows the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def keep_logs_if_failed(request: pytest.FixtureRequest, base: Path, prefix: str) -> None:
    """A failed test's node logs and status files outlive its network: copied under the
    session's temporary directory (``failed-logs/<prefix>``, printed) for the
    post-mortem, since ``net_down`` removes the network's directory with them."""
    report = getattr(request.node, "report_call", None)
    net = paths.network_dir(prefix)
    if report is None or not report.failed or not net.is_dir():
        return
    dest = base / "failed-logs" / prefix
    for f in [*net.glob("logs/*.log"), *net.glob("nodes/*/*.json")]:
        to = dest / f.relative_to(net)
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, to)
    rings = {name: ring_summary(name) for name in paths.ring_names_of_network(prefix)
             if name.endswith(("-ab", "-ba"))}
    (dest / "rings.json").write_text(json.dumps(rings, indent=1))
    print(f"\n{request.node.nodeid}: the node logs and status files of {prefix} are kept "
          f"in {dest}")


def ring_summary(name: str) -> dict:
    """A ring's cursors, its lanes' chunks, and where the key it still offers (ENC: from
    claim_pos, DEC: from release_pos, to write_pos) is zero in whole 64-byte pieces."""
    try:
        ring = KeyRing.attach(name)
    except RingError as e:
        return {"error": str(e)}
    try:
        return _ring_summary(ring)
    except RingError as e:
        return {"error": str(e)}
    finally:
        ring.close()


def _ring_summary(ring: KeyRing) -> dict:
    c = ring.cursors()
    lo = c.claim_pos if ring.is_enc else c.release_pos
    out = {"enc": ring.is_enc, "write": c.write_pos, "claim": c.claim_pos,
           "release": c.release_pos, "free": ring.free_pos, "capacity": c.capacity,
           "lanes": [(lane, *ring.chunk_of(lane)) for lane in range(MAX_LANES)
                     if ring.chunk_of(lane)[2]]}
    n = (c.write_pos - lo) // 64 * 64
    if n > 0:  # the network still runs: a release may pass lo meanwhile (RingError)
        zero = ~ring.read(lo, n).reshape(-1, 64).any(axis=1)
        idx = np.flatnonzero(zero)
        out.update(zero_pieces=int(idx.size),
                   first_zero=int(lo + 64 * idx[0]) if idx.size else None,
                   last_zero=int(lo + 64 * idx[-1]) if idx.size else None)
    return out


@pytest.fixture
def prefix(request, tmp_path_factory):
    """A unique network prefix; whatever the test made under it is removed afterwards
    (the node logs are kept when the test failed)."""
    p = "t" + uuid.uuid4().hex[:7]
    yield p
    try:
        keep_logs_if_failed(request, tmp_path_factory.getbasetemp(), p)
    except Exception as e:  # noqa: BLE001 - the post-mortem must never stop the cleanup
        print(f"\n{request.node.nodeid}: the logs of {p} could not be kept: {e!r}")
    finally:
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
