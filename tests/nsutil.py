"""Run test code inside a network namespace: a forked child enters it and runs a function,
so sockets the function opens live in that namespace (the test process stays where it
is). Results come back through a pipe."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import harness
from control.core import paths

_ctx = mp.get_context("fork")
QKDCTL = str(Path(sys.executable).with_name("qkdctl"))  # the venv's command, as users run it
# Routes at every node of a network just (re)started: seconds here, but a machine 2-3x
# slower, its CPU shared with the other test process's network, takes over 40.
ROUTES_S = 120


def _child(ns: str, fn: Callable, args: tuple, conn) -> None:
    """Runs ``fn`` in ``ns``, sends what came of it, and leaves at once (``os._exit``):
    a fork of a test process that has other threads (pytest-xdist's worker has one)
    must not, on the way out, take locks those threads may have held at the fork, as
    multiprocessing's exit does (it flushes the standard streams)."""
    from pyroute2 import netns

    try:
        try:
            netns.setns(ns)
            conn.send(("ok", fn(*args)))
        except BaseException as e:  # report anything, the test decides
            conn.send(("error", f"{e!r}\n{traceback.format_exc()}"))
    finally:
        os._exit(0)


class InNetns:
    """A function running in namespace ``ns`` in a child process."""

    def __init__(self, ns: str, fn: Callable, *args):
        self.parent, child = _ctx.Pipe(duplex=False)
        self.proc = _ctx.Process(target=_child, args=(ns, fn, args, child), daemon=True)
        self.proc.start()

    def result(self, timeout: float = 30.0):
        if not self.parent.poll(timeout):
            self.proc.kill()
            raise TimeoutError("function in namespace did not finish")
        status, value = self.parent.recv()
        self.proc.join(5)
        if status != "ok":
            raise RuntimeError(value)
        return value

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.join(2)


def run_in_netns(ns: str, fn: Callable, *args, timeout: float = 30.0):
    return InNetns(ns, fn, *args).result(timeout)


# ---- functions to run inside namespaces ---------------------------------------------------

def tcp_sink(addr: str, port: int, timeout: float) -> dict:
    """Accept one connection and read it to the end: returns its length and bytes' hash."""
    import hashlib

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    srv.settimeout(timeout)
    conn, peer = srv.accept()
    conn.settimeout(timeout)
    h = hashlib.sha256()
    n = 0
    while chunk := conn.recv(1 << 16):
        h.update(chunk)
        n += len(chunk)
    conn.close()
    srv.close()
    return {"bytes": n, "sha256": h.hexdigest(), "peer": peer[0]}


def tcp_source(src: str, addr: str, port: int, data: bytes, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket()
        s.bind((src, 0))
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
            break
        except ConnectionRefusedError:  # the sink is not listening yet
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    s.sendall(data)
    s.close()
    return len(data)


def udp_collect(addr: str, port: int, seconds: float) -> list[bytes]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    s.settimeout(0.1)
    got = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            got.append(s.recv(65535))
    return got


def udp_send_all(src: str, dst: str, port: int, datagrams: list[bytes], gap: float) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    for d in datagrams:
        s.sendto(d, (dst, port))
        time.sleep(gap)
    return len(datagrams)


def add_address(ifname: str, address: str) -> None:
    """A second address (/32) on an interface of the namespace this runs in."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        ip.addr("add", index=ip.link_lookup(ifname=ifname)[0], address=address, prefixlen=32)


def link_stats(ifname: str) -> dict:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        link = ip.get_links(ifname=ifname)[0]
        st = link.get_attr("IFLA_STATS64")
        return {"rx_packets": st["rx_packets"], "tx_packets": st["tx_packets"]}


def set_link(ifname: str, up: bool) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname=ifname)[0], state="up" if up else "down")


# ---- helpers on the test side -------------------------------------------------------------

def ping(ns: str, addr: str, count: int = 3, src: str | None = None,
         pattern: str | None = None, size: int | None = None) -> bool:
    cmd = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2",
           "-W", "2"]
    if src:
        cmd += ["-I", src]
    if pattern:
        cmd += ["-p", pattern]
    if size:
        cmd += ["-s", str(size)]
    return subprocess.run(cmd + [addr], capture_output=True).returncode == 0


def router_state(prefix: str, node: str) -> dict | None:
    try:
        return json.loads((paths.node_dir(prefix, node) / "router.json").read_text())
    except (OSError, ValueError):
        return None


def tunnel_state(prefix: str, node: str, link: str) -> dict | None:
    try:
        return json.loads((paths.node_dir(prefix, node) / f"tun-{link}.json").read_text())
    except (OSError, ValueError):
        return None


def module_pid(prefix: str, node: str, name: str) -> int | None:
    """The pid of a node's module (``api``, ``gkm``, ``lkm:A-B``, ...) as its supervisor
    last recorded it (a restarted module: the new one's); None if unknown."""
    try:
        st = json.loads((paths.node_dir(prefix, node) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return next((m["pid"] for m in st["modules"] if m["name"] == name), None)


def routes_complete(prefix: str, nodes: list[str]) -> bool:
    for n in nodes:
        r = router_state(prefix, n)
        if not r or len(r.get("routes", {})) != len(nodes) - 1:
            return False
    return True


def wait_until(cond: Callable[[], object], timeout: float, what: str | Callable[[], str],
               step: float = 0.1):
    """The benches' ``wait_until``, failing the test (AssertionError) after ``timeout``."""
    return harness.wait_until(cond, timeout, what, step, error=AssertionError)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
