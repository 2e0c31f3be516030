"""A short calibration of the machine, run by `qkdctl bench all` before the benches and
kept in its JSON, so that runs on two machines can be compared: what the machine does at
best for the dataplane's elementary work, in about ten seconds.

- ``memcpy_gbps``: numpy copying 64 MiB from one buffer to another (memory bandwidth);
- ``poly1305_gbps``: one-time Poly1305 tags of 64 KiB through ``dataplane.poly1305`` (the
  workers' MAC, its backend named in ``poly1305_backend``);
- ``xor_gbps``: numpy XOR of 64 KiB (a packet with its pad), in cache;
- ``veth_tcp_gbps``: iperf3 TCP over a veth pair of the underlay's MTU between two
  scratch namespaces (``qkcal<hex>-a``/``-b``, removed even on failure), no XDP guard.

Each CPU figure is the best of several short windows: the machine is often shared, and
the best window is the closest to what it can do. A step that fails is named in
``errors`` and the others still run.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np

from bench import iperf
from dataplane.limits import MAX_UNDERLAY_MTU

WINDOWS = 5
PACKET = 64 << 10


def best_rate(step: Callable[[], None], nbytes: int, window: float = 0.1,
              windows: int = WINDOWS, clock: Callable[[], float] = time.perf_counter
              ) -> float:
    """Gb/s of ``step`` (which handles ``nbytes`` each call): the best of ``windows``
    windows of about ``window`` seconds each (each runs the step at least once)."""
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, clock()
        while n == 0 or (el := clock() - t0) < window:
            step()
            n += 1
        best = max(best, n * nbytes * 8 / el / 1e9)
    return best


def memcpy_gbps(size: int = 64 << 20) -> float:
    src = np.frombuffer(os.urandom(size), dtype=np.uint8)
    dst = np.empty_like(src)
    return best_rate(lambda: np.copyto(dst, src), size)


def poly1305_gbps(size: int = PACKET) -> tuple[float, str]:
    from dataplane import poly1305

    key = np.frombuffer(os.urandom(poly1305.KEY_LEN), dtype=np.uint8)
    data = np.frombuffer(os.urandom(size), dtype=np.uint8)
    return best_rate(lambda: poly1305.tag(key, data), size), poly1305.BACKEND


def xor_gbps(size: int = PACKET) -> float:
    a = np.frombuffer(os.urandom(size), dtype=np.uint8)
    b = np.frombuffer(os.urandom(size), dtype=np.uint8)
    out = np.empty_like(a)
    return best_rate(lambda: np.bitwise_xor(a, b, out=out), size)


def _retry(fn: Callable[[], None], tries: int = 3) -> None:
    """pyroute2 reaches into a namespace through a helper process, which on a loaded
    machine now and then misses its start-up deadline."""
    for i in range(tries):
        try:
            fn()
            return
        except TimeoutError:
            if i == tries - 1:
                raise
            time.sleep(0.5 * (i + 1))


@contextlib.contextmanager
def scratch_pair(mtu: int = MAX_UNDERLAY_MTU) -> Iterator[tuple[str, str, str, str]]:
    """Two fresh namespaces joined by a veth pair of ``mtu``, as (namespace, address) of
    each end; both removed (with the veth) when the block ends."""
    from pyroute2 import IPRoute
    from pyroute2 import netns as pnetns

    tag = uuid.uuid4().hex[:6]
    ends = ((f"qkcal{tag}-a", "10.255.0.1"), (f"qkcal{tag}-b", "10.255.0.2"))
    made: list[str] = []
    try:
        for ns, _ in ends:
            pnetns.create(ns)
            made.append(ns)

        def veth() -> None:
            with IPRoute(netns=ends[0][0]) as ip:
                ip.link("add", ifname="cal0", kind="veth",
                        peer={"ifname": "cal0", "net_ns_fd": ends[1][0]})

        _retry(veth)
        for ns, addr in ends:
            def up(ns: str = ns, addr: str = addr) -> None:
                with IPRoute(netns=ns) as ip:
                    ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
                    idx = ip.link_lookup(ifname="cal0")[0]
                    if not ip.get_addr(index=idx, address=addr):
                        ip.addr("add", index=idx, address=addr, prefixlen=30)
                    ip.link("set", index=idx, mtu=mtu, state="up")

            _retry(up)
        yield ends[0][0], ends[0][1], ends[1][0], ends[1][1]
    finally:
        for ns in reversed(made):
            with contextlib.suppress(Exception):
                pnetns.remove(ns)


def veth_tcp_gbps(seconds: float = 2.0) -> float:
    with scratch_pair() as (ns_a, a, ns_b, b):
        return iperf.run(ns_a, a, ns_b, b, seconds)["gbps"]


def run(console=None, tcp_seconds: float = 2.0) -> dict:
    """Every calibration figure, the load average and how long it took."""
    t0 = time.monotonic()
    out: dict = {"load_before": list(os.getloadavg()), "errors": {}}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("memcpy_gbps", memcpy_gbps), ("poly1305_gbps", poly1305_gbps),
        ("xor_gbps", xor_gbps), ("veth_tcp_gbps", lambda: veth_tcp_gbps(tcp_seconds))]
    for name, fn in steps:
        if console is not None:
            console.print(f"  calibrating: {name.removesuffix('_gbps')} ...")
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - one step's failure is recorded, not fatal
            out[name] = None
            out["errors"][name] = f"{type(e).__name__}: {e}"[:300]
            continue
        if isinstance(value, tuple):
            out[name], out["poly1305_backend"] = value
        else:
            out[name] = value
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out
