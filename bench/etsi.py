"""`qkdctl bench etsi`: a link fed by QKD devices speaking ETSI GS QKD 014.

qkdnet's own key API stands in for the two devices: a network A - B (emulated link,
global key managers, key APIs over HTTPS with mutual TLS) whose nodes serve the SAEs
"la" and "lb". The link under test, E, runs its two key managers inside those nodes'
namespaces, as nodes would, with ETSI 014 sources calling them: ``keys_per_call`` keys of
``key_size`` bits per block (the source's defaults: 32 of 256 bits). Speed = key stored
into E's rings per second at one end, after a warm-up; each mode runs ``repeat`` times,
the median counts.

Baseline in the same run: one enc_keys and one dec_keys call per block
(``blocks_per_call = 1``), the way the source fetched before 2026-12-07 (it also waited
50 ms after each fetch that found nothing then, which no mode here does: the old code
measured 0.9 Mb/s where this baseline gives 2.0).

Ceiling in the same run: the two devices alone, as fast as one client each can ask:
enc_keys at A's key API for ``blocks_per_call`` blocks' keys, the IDs handed to a client
in B's namespace that calls dec_keys at B's, the two pipelined (what the link's two ends
do, without the link's agreement and rings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import signal
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.harness import BenchError, Net, wait_until
from bench.runs import median_run
from bench.topology import line, network, render, template
from control.core import paths
from control.core.config import Topology
from control.tools import emulation

_fork = mp.get_context("fork")
DEFAULT_KEYS, DEFAULT_BITS, DEFAULT_BATCH = 32, 256, 8
TEMPLATE = """
[network]
name = "bench-etsi"
prefix = "{prefix}"
[defaults]
key_rate_mbps = 0
block_size = "1MiB"
ring_capacity = "256MiB"
[gkm]
block_size = "1MiB"
low_watermark = "96MiB"
high_watermark = "128MiB"
window = "16MiB"
pairs = [["A", "B"]]
[api]
workers = 1
[[saes]]
id = "la"
node = "A"
[[saes]]
id = "lb"
node = "B"
""" + template(line("AB", 211))


class DeviceNet(Net):
    """A - B with key APIs: the two QKD devices of the link under test."""

    TEMPLATE = TEMPLATE
    TAG = "be"


# ---- the link's two ends, each in its device's namespace -----------------------------------

def link_config(prefix: str, devices: Topology, key_file: Path, *, keys: int, bits: int,
                batch: int = DEFAULT_BATCH, ring: str = "256MiB", poll_ms: int = 20) -> str:
    """The topology of link E between the device nodes A and B of ``devices`` (on their
    underlay addresses), fed by their key APIs (also tests/test_keysource_etsi.py's)."""
    lk, pki = devices.links[0], devices.api.pki

    def device(node: str, sae: str) -> dict[str, str]:
        return {"kme": f"https://{devices.node(node).address}:{devices.ports.api}",
                "sae_id": sae, "cert": f"{pki}/saes/{sae}.crt",
                "key": f"{pki}/saes/{sae}.key", "ca": f"{pki}/ca.crt"}

    source = {"kind": "etsi014", "keys_per_call": keys, "key_size": bits,
              "blocks_per_call": batch, "poll_interval_ms": poll_ms,
              "a": device("A", "la"), "b": device("B", "lb")}
    link = {"a": "A", "b": "B", "name": "E", "underlay": [str(lk.underlay_a),
                                                          str(lk.underlay_b)],
            "auth_key_file": str(key_file), "source": source}
    return render(network("bench-etsi-link", prefix, defaults={"ring_capacity": ring},
                          ports={"agreement": 7551}, gkm={"pairs": []},
                          metrics={"enabled": False}),
                  {"nodes": [{"name": "A"}, {"name": "B"}], "links": [link]})


def serve_link_end(config: str, node: str, state_dir: str, log_file: str) -> None:
    """One end of link E: its key manager, as a node runs it (the caller is in the device
    node's namespace), logging to ``log_file``."""
    from control.core.config import load_topology
    from control.lkm.link_end import EndConfig, LinkKeyManager

    logging.basicConfig(filename=log_file, level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    topo = load_topology(config)
    LinkKeyManager(EndConfig.from_topology(topo, node, topo.link("E"),
                                           Path(state_dir))).run()


def _in_netns(ns: str) -> None:
    from pyroute2 import netns

    netns.setns(ns, flags=0)  # never create it


def _link_end(ns: str, *args: str) -> None:
    _in_netns(ns)
    serve_link_end(*args)


def _stored(prefix: str) -> int:
    """Key bytes node B's end of E has stored into its rings (0 before its first status)."""
    try:
        st = json.loads((paths.node_dir(prefix, "B") / "lkm-E.json").read_text())
    except (OSError, ValueError):
        return 0
    return st["key"]["bytes_stored_ab"] + st["key"]["bytes_stored_ba"]


def measure_link(dev: DeviceNet, workdir: Path, keys: int, bits: int, batch: int,
                 seconds: float) -> dict:
    """Key stored per second by link E fed by ``dev``'s key APIs, one run."""
    prefix = "bl" + secrets.token_hex(3)
    cfg = workdir / f"{prefix}.toml"
    cfg.write_text(link_config(prefix, dev.topo, workdir / "link.key", keys=keys, bits=bits,
                               batch=batch))
    ends: list = []
    try:
        for node in ("A", "B"):
            state = workdir / f"{prefix}-{node}"
            state.mkdir()
            p = _fork.Process(target=_link_end, args=(dev.ns(node), str(cfg), node, str(state),
                                                      str(workdir / f"{prefix}-{node}.log")),
                              daemon=True)
            p.start()
            ends.append(p)
        block = keys * bits // 8
        wait_until(lambda: _stored(prefix) >= 2 * block, 60,
                   f"link E's first key (logs in {workdir})")
        time.sleep(2.0)  # warm-up
        s0, t0 = _stored(prefix), time.monotonic()
        time.sleep(seconds)
        s1, t1 = _stored(prefix), time.monotonic()
        return {"blocks_per_call": batch, "seconds": t1 - t0, "bytes": s1 - s0,
                "gbps": (s1 - s0) * 8 / (t1 - t0) / 1e9}
    finally:
        for p in ends:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        for p in ends:
            p.join(20)
            if p.is_alive():
                p.kill()
                p.join(5)
        emulation.net_down(prefix)


# ---- the ceiling: the two devices alone ---------------------------------------------------

def _client(pki: str, sae: str, url: str):
    from api.client import KmeClient, client_context

    return KmeClient(url, client_context(pki, sae), 10.0)


def _enc_side(ns: str, pki: str, url: str, number: int, bits: int, ids: mp.Queue,
              stop: float) -> None:
    from api import etsi

    _in_netns(ns)
    c = _client(pki, "la", url)
    while time.monotonic() < stop:
        status, body = c.call(etsi.enc_keys_call("lb", number, bits))
        try:
            keys = etsi.parse_enc_keys(status, body, number, bits // 8)
        except etsi.NotEnoughKey:
            time.sleep(0.02)
            continue
        ids.put([k for k, _ in keys])
    ids.put(None)


def _dec_side(ns: str, pki: str, url: str, bits: int, ids: mp.Queue, got: mp.Queue,
              start: float) -> None:
    from api import etsi

    _in_netns(ns)
    c = _client(pki, "lb", url)
    total, first = 0, None
    while (batch := ids.get()) is not None:
        status, body = c.call(etsi.dec_keys_call("la", batch))
        total += sum(len(k) for k in etsi.parse_dec_keys(status, body, batch, bits // 8))
        if first is None and time.monotonic() >= start:
            first = (time.monotonic(), total)
    end = time.monotonic()
    got.put((first, end, total))


def measure_devices(dev: DeviceNet, keys: int, bits: int, batch: int,
                    seconds: float) -> dict:
    """Key bytes per second the two devices serve to one client each, pipelined."""
    ids: mp.Queue = _fork.Queue(maxsize=8)
    got: mp.Queue = _fork.Queue()
    now = time.monotonic()
    start, stop = now + 2.0, now + 2.0 + seconds  # the first 2 s warm up
    pki, port = str(dev.topo.api.pki), dev.topo.ports.api
    procs = [_fork.Process(target=_enc_side, args=(dev.ns("A"), pki,
                                                   f"https://{dev.addr('A')}:{port}",
                                                   keys * batch, bits, ids, stop), daemon=True),
             _fork.Process(target=_dec_side, args=(dev.ns("B"), pki,
                                                   f"https://{dev.addr('B')}:{port}", bits,
                                                   ids, got, start), daemon=True)]
    for p in procs:
        p.start()
    try:
        first, end, total = got.get(timeout=seconds + 60)
    except queue.Empty:
        raise BenchError("the devices' clients gave no result") from None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    if first is None:
        raise BenchError("the devices served nothing")
    t0, b0 = first
    return {"blocks_per_call": batch, "seconds": end - t0, "bytes": total - b0,
            "gbps": (total - b0) * 8 / (end - t0) / 1e9}


# ---- the bench ---------------------------------------------------------------------------

def run(seconds: float = 8.0, repeat: int = 3, keys: int = DEFAULT_KEYS,
        bits: int = DEFAULT_BITS, batch: int = DEFAULT_BATCH,
        console: Console | None = None) -> dict:
    console = console or Console()
    block = keys * bits // 8
    console.print(f"[bold]bench etsi[/bold]: link E fed by two ETSI 014 devices (qkdnet's "
                  f"key API), blocks of {keys} x {bits}-bit keys ({block} B), {seconds:.0f} s "
                  f"per run, {repeat} run(s) per mode, on {os.cpu_count()} cores")
    dev = DeviceNet(console)
    workdir = paths.RUN_ROOT / f"bench-{dev.prefix}-work"
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = workdir / "link.key"
    key.write_bytes(secrets.token_bytes(32))
    key.chmod(0o600)
    runs: dict[str, list[dict]] = {"proposed": [], "conventional": [], "devices": []}
    done = False
    try:
        dev.up()
        for i in range(repeat):  # the modes alternate, so drift hits them alike
            for mode, n in (("proposed", batch), ("conventional", 1)):
                r = measure_link(dev, workdir, keys, bits, n, seconds)
                runs[mode].append(r)
                console.print(f"  run {i + 1}, {mode} ({n} block(s) per call): "
                              f"{r['gbps'] * 1000:.2f} Mb/s")
            r = measure_devices(dev, keys, bits, batch, seconds)
            runs["devices"].append(r)
            console.print(f"  run {i + 1}, ceiling (the devices alone): "
                          f"{r['gbps'] * 1000:.2f} Mb/s")
        done = True
    finally:
        dev.down()
        if done:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"  the link ends' logs are kept in {workdir}")
    ours, base, ceil = (median_run(runs[m]) for m in ("proposed", "conventional", "devices"))
    result = {
        "bench": "etsi", "machine": f"{os.uname().nodename} {os.cpu_count()} cores",
        "keys_per_call": keys, "key_size": bits, "block_bytes": block,
        "blocks_per_call": batch, "ours_mbps": ours["gbps"] * 1000,
        "baseline_mbps": base["gbps"] * 1000, "ceiling_devices_mbps": ceil["gbps"] * 1000,
        "ratio_vs_baseline": ours["gbps"] / base["gbps"] if base["gbps"] else None,
        "ratio_vs_ceiling": ours["gbps"] / ceil["gbps"] if ceil["gbps"] else None,
        "runs": runs,
    }
    t = Table(title=f"ETSI 014 source: key stored per second, blocks of {keys} x {bits} bit")
    for c in ("mode", "Mb/s (median)", "runs", "x baseline", "x ceiling"):
        t.add_column(c)
    for name, mode, r in (("proposed", "proposed", ours),
                          ("conventional: a call per block", "conventional", base),
                          ("ceiling: the devices alone", "devices", ceil)):
        t.add_row(name, f"{r['gbps'] * 1000:.2f}",
                  ", ".join(f"{x['gbps'] * 1000:.2f}" for x in runs[mode]),
                  f"{r['gbps'] / base['gbps']:.2f}" if base["gbps"] else "-",
                  f"{r['gbps'] / ceil['gbps']:.2f}" if ceil["gbps"] else "-")
    console.print(t)
    return result
