"""Tests of the Prometheus metrics (control/node/metrics.py, metrics_server.py): the pure
conversion of a node's status snapshot, and a real node's endpoint scraped from inside its
namespace."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from control.core import paths
from control.core.config import parse_topology
from control.node.metrics import SPECS, families, node_registry
from control.node.status import STALE_AFTER_S
from tests.conftest import two_nodes
from tests.nsutil import ping, run_in_netns, tunnel_state, wait_until
from tests.test_tunnel import addr, make_net, ns

NOW = 1_000_000.0
MIB = 1 << 20


def tunnel_file(updated: float = NOW) -> dict:
    counters = {"tx_pkts": 10, "tx_bytes": 1000, "tx_key": 1320, "rx_pkts": 7,
                "rx_bytes": 700, "rx_key": 924, "claims": 2, "t_tx_read": 5,
                "drop_tx_nokey": 3, "drop_rx_mac": 2, "drop_rx_replay": 0}
    return {"link": "A-B", "node": "A", "peer": "B", "updated": updated, "up": True,
            "reason": "up", "tun": "otp0",
            "workers": [{"lane": 0, "alive": True, "restarts": 1},
                        {"lane": 1, "alive": False, "restarts": 2}],
            "counters": counters, "control_drops": {"mac": 4},
            "guard": {"state": "on", "mode": "native", "interface": "ul0",
                      "counts": {"pass": {"packets": 17, "bytes": 1700},
                                 "source": {"packets": 5, "bytes": 300}}}}


def snapshot() -> dict:
    """A node's snapshot as control.node.status.collect_node gives it (fields trimmed)."""
    return {
        "supervisor": {"node": "A", "updated": NOW, "stopping": False, "modules": [
            {"name": "lkm:A-B", "pid": 1, "alive": True, "restarts": 0, "last_exit": None},
            {"name": "gkm", "pid": None, "alive": False, "restarts": 3, "last_exit": 1}]},
        "links": {"A-B": {
            "node": "A", "link": "A-B", "peer": "B", "updated": NOW,
            "source": {"up": True}, "agreement": {"synced": True},
            "key": {"bytes_in": 5 * MIB, "rate_bps": 1e9, "bytes_stored_ab": 2 * MIB,
                    "bytes_stored_ba": MIB, "bytes_discarded": 2 * MIB},
            "rings": {"ab": {"role": "enc", "fill": MIB, "capacity": 32 * MIB},
                      "ba": {"role": "dec", "fill": 3 * MIB, "capacity": 32 * MIB}},
            "accounting": {
                "source": {"in": 5 * MIB, "discarded": 2 * MIB, "pending": 0,
                           "stored": {"ab": 2 * MIB, "ba": MIB}},
                "ab": {"role": "enc", "key_in": 2 * MIB, "stored": MIB, "used_pad": 900_000,
                       "used_mac": 320, "used_control": 1000, "wasted": 147_256,
                       "released": 0, "balance": 0},
                "ba": {"role": "dec", "key_in": MIB, "stored": 3 * MIB, "used_pad": 10,
                       "used_mac": 0, "used_control": 0, "wasted": 7, "released": 5,
                       "balance": 1}}}},
        "tunnels": {"A-B": tunnel_file()},
        "router": {"node": "A", "updated": NOW, "routes": {"B": {"via": "A-B"}}},
        "gkm": {"node": "A", "updated": NOW, "received_bytes": 64 * MIB,
                "watermarks": {"low": 32 * MIB, "high": 64 * MIB},
                "peers": {"B": {
                    "enc": {"usable": 60 * MIB, "pending": 4 * MIB, "taken_bytes": 96},
                    "dec": {"stored": 64 * MIB, "delivered_bytes": 32},
                    "relay": {"state": "retrying", "connected": True, "rate_bps": 8e8,
                              "acked_bytes": 60 * MIB, "retries": 6,
                              "paths": {"wanted": 2, "up": 1, "using": 1,
                                        "policy": "fewer", "degraded_blocks": 40,
                                        "shares_sent": 100, "links": [["A-B"]]}}}}},
        "api": {"updated": NOW, "state": "degraded", "workers_alive": 1, "workers": 2,
                "restarts": 5, "refused_connections": 7,
                "hands": {"served_keys": 900, "taken_keys": 1200, "given_back_keys": 100,
                          "given_back_bytes": 3200, "held_keys": 150, "held_bytes": 4800,
                          "lost_keys": 50, "lost_bytes": 1600}},
    }


def samples(snap: dict, now: float = NOW) -> dict[tuple, float]:
    """{(name, sorted label items): value} of every sample, as exposed."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families("A", snap, now) for s in f.samples}


def value(got: dict, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted({"node": "A", **labels}.items())))]


def names(got: dict) -> set[str]:
    return {n for n, _ in got}


# ---- the pure conversion ---------------------------------------------------------------

def test_rings_and_local_key():
    got = samples(snapshot())
    ring = {"link": "A-B", "direction": "ab", "role": "enc"}
    assert value(got, "qkdnet_ring_fill_bytes", **ring) == MIB
    assert value(got, "qkdnet_ring_capacity_bytes", **ring) == 32 * MIB
    assert value(got, "qkdnet_ring_fill_bytes", link="A-B", direction="ba", role="dec") \
        == 3 * MIB
    peer = {"link": "A-B", "peer": "B"}
    assert value(got, "qkdnet_local_key_received_bytes_total", **peer) == 5 * MIB
    assert value(got, "qkdnet_local_key_rate_bits_per_second", **peer) == 1e9
    assert value(got, "qkdnet_local_key_stored_bytes_total", link="A-B", direction="ba") == MIB
    assert value(got, "qkdnet_agreement_synced", **peer) == 1
    assert value(got, "qkdnet_key_source_up", link="A-B") == 1
    enc = {"link": "A-B", "direction": "ab", "role": "enc"}
    assert value(got, "qkdnet_local_key_ring_in_bytes_total", **enc) == 2 * MIB
    assert value(got, "qkdnet_local_key_ring_stored_bytes", **enc) == MIB
    for use, v in (("pad", 900_000), ("mac", 320), ("control", 1000), ("wasted", 147_256)):
        assert value(got, "qkdnet_local_key_used_bytes_total", **enc, use=use) == v
    dec = {"link": "A-B", "direction": "ba", "role": "dec"}
    assert value(got, "qkdnet_local_key_used_bytes_total", **dec, use="released") == 5
    assert value(got, "qkdnet_local_key_pending_bytes", link="A-B") == 0


def test_tunnel_counters_drops_and_guard():
    got = samples(snapshot())
    assert value(got, "qkdnet_link_up", link="A-B", peer="B") == 1
    assert value(got, "qkdnet_tunnel_packets_total", link="A-B", direction="tx") == 10
    assert value(got, "qkdnet_tunnel_bytes_total", link="A-B", direction="rx") == 700
    assert value(got, "qkdnet_tunnel_key_bytes_total", link="A-B", direction="tx") == 1320
    drop = "qkdnet_tunnel_dropped_packets_total"
    assert value(got, drop, link="A-B", direction="tx", reason="nokey") == 3
    assert value(got, drop, link="A-B", direction="rx", reason="mac") == 2
    assert value(got, drop, link="A-B", direction="rx", reason="replay") == 0
    assert value(got, drop, link="A-B", direction="control", reason="mac") == 4
    assert value(got, "qkdnet_tunnel_workers_alive", link="A-B") == 1
    assert value(got, "qkdnet_tunnel_worker_restarts_total", link="A-B") == 3
    assert value(got, "qkdnet_guard_up", link="A-B", mode="native", interface="ul0") == 1
    assert value(got, "qkdnet_guard_packets_total", link="A-B", reason="source") == 5
    assert value(got, "qkdnet_guard_bytes_total", link="A-B", reason="pass") == 1700
    assert not any("t_tx_read" in n or "claims" in n for n in names(got))


def test_guard_off_is_a_zero_gauge_with_mode_off():
    snap = snapshot()
    snap["tunnels"]["A-B"]["guard"] = {"state": "off", "reason": "no BPF"}
    got = samples(snap)
    assert value(got, "qkdnet_guard_up", link="A-B", mode="off", interface="") == 0
    assert "qkdnet_guard_packets_total" not in names(got)


def test_global_key_relay_and_modules():
    got = samples(snapshot())
    assert value(got, "qkdnet_global_key_enc_usable_bytes", peer="B") == 60 * MIB
    assert value(got, "qkdnet_global_key_enc_pending_bytes", peer="B") == 4 * MIB
    assert value(got, "qkdnet_global_key_dec_stored_bytes", peer="B") == 64 * MIB
    assert value(got, "qkdnet_relay_retries_total", peer="B") == 6
    assert value(got, "qkdnet_relay_rate_bits_per_second", peer="B") == 8e8
    assert value(got, "qkdnet_relay_state", peer="B", state="retrying") == 1
    assert value(got, "qkdnet_relay_state", peer="B", state="ok") == 0
    assert value(got, "qkdnet_global_key_low_watermark_bytes") == 32 * MIB
    assert value(got, "qkdnet_module_up", module="lkm:A-B") == 1
    assert value(got, "qkdnet_module_up", module="gkm") == 0
    assert value(got, "qkdnet_module_restarts_total", module="gkm") == 3
    assert value(got, "qkdnet_routes") == 1


def test_the_key_api_is_serving_only_with_every_worker_and_a_live_manager():
    snap = snapshot()
    got = samples(snap)
    assert value(got, "qkdnet_api_serving") == 0  # one of two workers is being replaced
    assert value(got, "qkdnet_api_workers_alive") == 1
    assert value(got, "qkdnet_api_worker_restarts_total") == 5
    assert value(got, "qkdnet_api_hand_keys") == 150
    assert value(got, "qkdnet_api_hand_served_keys_total") == 900
    assert value(got, "qkdnet_api_hand_given_back_bytes_total") == 3200
    assert value(got, "qkdnet_api_hand_lost_bytes_total") == 1600
    assert value(got, "qkdnet_api_refused_connections_total") == 7
    snap["api"].update(state="serving", workers_alive=2)
    assert value(samples(snap), "qkdnet_api_serving") == 1
    got = samples(snap, NOW + 10)  # its manager stopped publishing: not serving
    assert value(got, "qkdnet_api_serving") == 0
    assert value(got, "qkdnet_status_stale", source="api", link="") == 1


def test_names_units_and_types_in_the_exposition():
    """Every family is declared, prefixed, and exposed under the name it was declared with
    (counters end in _total); the text parses back."""
    fams = families("A", snapshot(), NOW)
    assert {f.name for f in fams} == {n.removesuffix("_total") for n in SPECS}
    for f in fams:
        kind, _ = SPECS[f.name + "_total" if f.type == "counter" else f.name]
        assert f.type == kind and f.name.startswith("qkdnet_")
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed(fams))
    parsed = {f.name for f in text_string_to_metric_families(generate_latest(reg).decode())}
    assert parsed == {f.name for f in fams}


class Fixed:
    """A collector of given families."""

    def __init__(self, fams: list):
        self.fams = fams

    def collect(self):
        return self.fams


def test_fresh_sources_are_not_stale_and_old_ones_are():
    got = samples(snapshot())
    stale = {dict(k[1])["source"] + dict(k[1])["link"]: v for k, v in got.items()
             if k[0] == "qkdnet_status_stale"}
    assert stale == {"supervisor": 0, "lkmA-B": 0, "tunnelA-B": 0, "router": 0, "gkm": 0,
                     "api": 0}
    snap = snapshot()
    snap["tunnels"]["A-B"] = tunnel_file(updated=NOW - STALE_AFTER_S - 1)
    got = samples(snap)
    assert value(got, "qkdnet_status_stale", source="tunnel", link="A-B") == 1
    assert value(got, "qkdnet_status_stale", source="gkm", link="") == 0
    # a tunnel manager that stopped publishing is not up, whatever its last file said
    assert value(got, "qkdnet_link_up", link="A-B", peer="B") == 0
    assert value(got, "qkdnet_tunnel_packets_total", link="A-B", direction="tx") == 10


def test_missing_files_leave_their_metrics_out():
    snap = snapshot()
    snap["tunnels"]["A-B"] = None
    snap["gkm"] = None
    snap["supervisor"] = None
    got = samples(snap)
    assert "qkdnet_ring_fill_bytes" in names(got)
    assert not {n for n in names(got) if n.startswith(("qkdnet_tunnel", "qkdnet_guard",
                                                       "qkdnet_global", "qkdnet_relay",
                                                       "qkdnet_module", "qkdnet_link"))}
    assert families("A", {"supervisor": None, "links": {}, "tunnels": {}, "router": None,
                          "gkm": None}, NOW) == []
    assert families("A", {}, NOW) == []


def test_a_file_of_unexpected_shape_is_left_out_alone():
    snap = snapshot()
    del snap["links"]["A-B"]["rings"]
    snap["gkm"]["peers"]["B"]["relay"] = {"state": "ok"}
    got = samples(snap)
    assert "qkdnet_ring_fill_bytes" not in names(got)
    assert "qkdnet_relay_retries_total" not in names(got)
    assert value(got, "qkdnet_tunnel_packets_total", link="A-B", direction="tx") == 10


def test_the_collector_reads_the_files_at_each_scrape(tmp_path, monkeypatch):
    """No files: nothing; a file written later shows at the next scrape."""
    monkeypatch.setattr(paths, "RUN_ROOT", tmp_path)
    topo = parse_topology(two_nodes("tm", rate=1, capacity="1MiB"), tmp_path / "t.toml")
    reg = node_registry(topo, "A")
    assert b"qkdnet_" not in generate_latest(reg)
    d = paths.node_dir("tm", "A")
    d.mkdir(parents=True)
    (d / "tun-A-B.json").write_text(json.dumps(tunnel_file(updated=time.time())))
    text = generate_latest(reg).decode()
    assert 'qkdnet_tunnel_packets_total{direction="tx",link="A-B",node="A"} 10.0' in text
    assert 'qkdnet_status_stale{link="A-B",node="A",source="tunnel"} 0.0' in text


def test_the_snapshot_is_left_as_it_was():
    snap = snapshot()
    before = copy.deepcopy(snap)
    families("A", snap, NOW)
    assert snap == before


# ---- a real node's endpoint --------------------------------------------------------------

def scrape(url: str) -> dict[tuple, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.netns
def test_a_node_serves_its_metrics_on_its_address(tmp_path, prefix):
    topo, _ = make_net(tmp_path, prefix, two=True, extra="[metrics]\nport = 9465\n")
    url = f"http://{addr(topo, 'A')}:9465/metrics"
    a = ns(prefix, "A")
    tx = ("qkdnet_tunnel_packets_total",
          (("direction", "tx"), ("link", "A-B"), ("node", "A")))
    first = wait_until(lambda: (m := run_in_netns(a, scrape, url)) and tx in m and m, 20,
                       "tunnel metrics at A's endpoint")
    ring = {v for (n, lb), v in first.items() if n == "qkdnet_ring_capacity_bytes"}
    assert ring == {topo.link("A-B").ring_capacity}
    assert first[("qkdnet_link_up", (("link", "A-B"), ("node", "A"), ("peer", "B")))] == 1
    guard = [(dict(lb), v) for (n, lb), v in first.items() if n == "qkdnet_guard_up"]
    assert len(guard) == 1 and guard[0][1] == (guard[0][0]["mode"] != "off")
    if guard[0][1]:
        assert any(n == "qkdnet_guard_packets_total" for n, _ in first)
    assert first[("qkdnet_module_up", (("module", "metrics"), ("node", "A")))] == 1
    assert first[("qkdnet_status_stale", (("link", "A-B"), ("node", "A"),
                                          ("source", "tunnel")))] == 0
    before = tunnel_state(prefix, "A", "A-B")["counters"]["tx_pkts"]
    assert ping(a, addr(topo, "B"), count=5, src=addr(topo, "A"))
    wait_until(lambda: run_in_netns(a, scrape, url)[tx] >= before + 5, 10,
               "tunnel tx packets to grow by the pings")
    # the README's way, from the host
    out = subprocess.run(["ip", "netns", "exec", a, "curl", "-sS", url], capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 0 and "qkdnet_guard_up{" in out.stdout
    # SIGTERM stops the module cleanly (exit 0), well within the supervisor's grace
    pid = metrics_module(prefix)["pid"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: metrics_module(prefix)["last_exit"] is not None, 5, "metrics to stop")
    assert metrics_module(prefix)["last_exit"] == 0 and time.monotonic() - t0 < 2


def metrics_module(prefix: str) -> dict:
    state = json.loads((paths.node_dir(prefix, "A") / "state.json").read_text())
    return next(m for m in state["modules"] if m["name"] == "metrics")


def test_multipath_relay_paths_and_degraded_blocks():
    snap = snapshot()
    got = samples(snap)
    assert value(got, "qkdnet_relay_paths_up", peer="B") == 1
    assert value(got, "qkdnet_relay_paths_wanted", peer="B") == 2
    assert value(got, "qkdnet_relay_paths_used", peer="B") == 1
    assert value(got, "qkdnet_relay_degraded_blocks_total", peer="B") == 40
    snap["gkm"]["peers"]["B"]["relay"]["paths"] = None  # single-path relay: none
    assert "qkdnet_relay_paths_up" not in names(samples(snap))


def test_the_status_table_shows_the_key_api_workers_hands():
    from rich.console import Console

    from control.node.status import render_api

    api = {**snapshot()["api"], "stale": False}
    console = Console(width=120, record=True)
    console.print(render_api({"time": NOW, "nodes": {"A": {"api": api}}}))
    text = console.export_text()
    row = next(line for line in text.splitlines() if line.lstrip().startswith("A "))
    # held, from hands, lost, refused connections
    assert row.split()[-5:] == ["150", "900", "1,600", "B", "7"]
    assert "[api] max_connections_per_address" in " ".join(text.split())  # not markup


def test_a_slow_links_key_shows_in_units_that_suit_it():
    """A 50 kb/s link's figures in kb/s and KiB (columns in fixed Mb/s and MiB showed
    them as 0), and a 1 Gb/s link's beside them in Gb/s and MiB."""
    from rich.console import Console

    from control.node.status import render_global, render_keys, render_tunnels

    fast = snapshot()
    slow = copy.deepcopy(fast)
    link = slow["links"]["A-B"]
    link["key"].update(rate_bps=50_400, bytes_in=268 * 1024, bytes_discarded=0)
    link["rings"]["ab"].update(fill=120 * 1024, capacity=4 * MIB)
    slow["tunnels"]["A-B"]["counters"].update(tx_bytes=142 * 1024, rx_bytes=900, tx_key=0,
                                              rx_key=1536)
    slow["gkm"]["peers"]["B"]["relay"]["rate_bps"] = 22_000
    slow["gkm"]["peers"]["B"]["relay"]["last_fill"] = {"bytes": 48 * 1024, "seconds": 16.0}
    slow["gkm"]["stale"] = False
    for snap in (fast, slow):
        snap["links"]["A-B"].update(stale=False, role="leader",
                                    agreement={"synced": True, "session": 1})
        snap["tunnels"]["A-B"]["stale"] = False
    fast["gkm"]["stale"] = False

    def rows(render, snap):
        console = Console(width=250, record=True)
        console.print(render({"network": "n", "prefix": "p", "time": NOW,
                              "nodes": {"A": snap}}))
        return " ".join(console.export_text().split())

    assert "50.4 kb/s 268 KiB 120 KiB 2%" in rows(render_keys, slow)
    assert "1.00 Gb/s 5.00 MiB 1.00 MiB 3%" in rows(render_keys, fast)
    assert "142 KiB 7 900 B 1.50 KiB" in rows(render_tunnels, slow)
    assert "22.0 kb/s 6 24.6 kb/s" in rows(render_global, slow)
    assert "60.0 MiB 4.00 MiB 64.0 MiB 32.0 MiB-64.0 MiB" in rows(render_global, fast)


def test_idle_connections_cannot_pin_the_endpoint(monkeypatch):
    """Any process that reaches the node address can connect: beyond MAX_CLIENTS at once a
    new one is closed at once, never queued; and a connection is closed after a deadline
    however it trickles (a byte now and then kept a per-read timeout waiting for days)."""
    import socket
    import threading
    from wsgiref.simple_server import make_server

    from control.node import metrics_server as ms

    monkeypatch.setattr(ms, "MAX_CLIENTS", 2)
    monkeypatch.setattr(ms._QuietHandler, "timeout", 3.0)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]

    srv = make_server("127.0.0.1", 0, app, server_class=ms._Server,
                      handler_class=ms._QuietHandler)
    srv.timeout = 0.1
    stop = threading.Event()
    t = threading.Thread(target=lambda: [srv.handle_request() for _ in iter(stop.is_set,
                                                                              True)])
    t.start()
    port = srv.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        third = socket.create_connection(("127.0.0.1", port))
        third.settimeout(1.0)  # well under the deadline: closed at once, or this fails
        assert third.recv(1) == b""
        third.close()
        held[0].sendall(b"GET /")  # one trickles a byte a second, the other is silent
        t0 = time.monotonic()
        for _ in range(30):
            try:
                held[0].sendall(b"x")
            except OSError:
                break
            held[0].settimeout(1.0)
            try:
                if held[0].recv(1) == b"":
                    break
            except TimeoutError:
                pass
        assert time.monotonic() - t0 < 20, "a trickling client kept its slot"
        for s in held[1:]:
            s.settimeout(30)
            assert s.recv(1) == b""
        deadline = time.monotonic() + 30
        while True:  # their slots free again: a scrape is served
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    assert r.read() == b"ok\n"
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, "the endpoint stayed full"
                time.sleep(0.1)
    finally:
        for s in held:
            s.close()
        stop.set()
        t.join(10)
        srv.server_close()
