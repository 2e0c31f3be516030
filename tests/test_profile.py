"""`qkdctl profile`: the pure report (Table I rows, histogram buckets, time shares) and,
against a real two-node network carrying traffic, the bcc probes on node A's workers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from control.tools import profile as prof
from control.tools.profile import NotRunning
from dataplane.bpf.profile import STAGES, ProfileError, log2_buckets, slot_range, stage_table
from tests.conftest import write_topology
from tests.nsutil import QKDCTL

ROOT = Path(__file__).parents[1]


def fake_probes(**stage_ns: int) -> dict:
    """A Profiler.run result: one call per named stage, with that many ns."""
    stages = {s: {"count": 1 if s in stage_ns else 0, "total_ns": stage_ns.get(s, 0),
                  "hist": [[2, 3, 1]] if s in stage_ns else []} for s in STAGES}
    return {"seconds": 2.0, "pids": [11, 12], "stages": stages,
            "user": {"count": 4, "total_ns": 400_000, "hist": [[64, 127, 4]]},
            "offcpu_ns": 900_000, "offcpu_in_syscall_ns": 800_000,
            "offcpu_in_user_ns": 100_000, "offcpu_runnable_ns": 50_000,
            "oncpu_ns": 500_000, "per_worker": {11: {"oncpu_ns": 1, "offcpu_ns": 2}}}


# ---- pure parts ------------------------------------------------------------------------

def test_log2_slots_become_bcc_style_microsecond_buckets():
    assert slot_range(0) == (0, 0)  # under 1 µs
    assert slot_range(1) == (1, 1)
    assert slot_range(4) == (8, 15)
    assert log2_buckets({}) == []
    assert log2_buckets({0: 0, 5: 0}) == []
    # empty slots between the first and last used ones are shown, outside them not
    assert log2_buckets({3: 5, 1: 2, 9: 0}) == [[1, 1, 2], [2, 3, 0], [4, 7, 5]]


def test_syscall_numbers_map_to_the_worker_stages():
    x86 = {nr: STAGES[i] for nr, i in stage_table("x86_64").items()}
    assert x86[19] == "tun_read" and x86[1] == "tun_write"
    assert x86[44] == "udp_send" and x86[45] == "udp_recv"
    assert x86[7] == "poll_wait" and x86[230] == "key_wait"
    assert STAGES[0] == "other_syscalls"  # what the BPF program counts by default
    with pytest.raises(ProfileError):
        stage_table("mips")


def test_table_one_from_counter_deltas():
    before = {"tx_pkts": 100, "t_tx_read": 1_000, "t_tx_key": 0, "t_tx_crypto": 0,
              "t_tx_send": 0, "rx_pkts": 5, "t_rx_recv": 0, "t_rx_key": 0,
              "t_rx_crypto": 0, "t_rx_write": 0}
    after = {**before, "tx_pkts": 110, "t_tx_read": 51_000, "t_tx_key": 20_000,
             "t_tx_crypto": 30_000, "t_tx_send": 40_000}
    d = prof.counter_deltas(before, after)
    assert d["tx_pkts"] == 10 and d["rx_pkts"] == 0
    assert prof.counter_deltas({"x": 9}, {"x": 2}) == {"x": 0}  # a restarted lane
    rows = prof.table_one({"A-B": d})
    assert len(rows) == 8  # four steps, two directions
    eg = {r["step"]: r for r in rows if r["direction"] == "egress"}
    assert eg["1. receive data"]["us_per_pkt"] == pytest.approx(5.0)
    assert eg["4. send data"]["us_per_pkt"] == pytest.approx(4.0)
    assert eg["1. receive data"]["paper_proposed_us"] == pytest.approx(4869)
    assert eg["1. receive data"]["x_proposed"] == pytest.approx(4869 / 5)
    assert eg["2. read and remove used key"]["x_conventional"] == pytest.approx(208431 / 2)
    ing = [r for r in rows if r["direction"] == "ingress"]
    assert all(r["us_per_pkt"] is None and r["x_proposed"] is None for r in ing)


def test_worker_pids_only_from_fresh_status_and_live_workers():
    now = 1000.0
    st = {"A-B": {"updated": now - 0.5, "workers": [
              {"lane": 0, "pid": 11, "alive": True}, {"lane": 1, "pid": 12, "alive": False},
              {"lane": 2, "pid": None, "alive": False}]},
          "A-C": {"updated": now - 60, "workers": [{"lane": 0, "pid": 13, "alive": True}]},
          "A-D": None}
    assert prof.worker_pids(st, now) == {"A-B": [11]}


def test_time_shares_add_up_and_off_cpu_is_not_counted_twice():
    t = prof.time_shares(fake_probes(udp_send=600_000, poll_wait=1_000_000))
    assert t["syscall_ns"] == 1_600_000 and t["user_ns"] == 400_000
    assert t["observed_ns"] == 2_000_000
    assert t["parts_ns"] == {"syscalls_on_cpu": 800_000, "user_on_cpu": 300_000,
                             "off_cpu": 900_000}
    assert sum(t["shares"].values()) == pytest.approx(1.0)
    assert t["stage_shares"]["poll_wait"] == pytest.approx(0.5)
    assert t["stage_shares"]["user_space"] == pytest.approx(0.2)
    assert sum(t["stage_shares"].values()) == pytest.approx(1.0)


def test_report_renders_histograms_table_one_and_shares():
    d = {"tx_pkts": 10, "t_tx_read": 50_000, "t_tx_key": 1, "t_tx_crypto": 1,
         "t_tx_send": 1, "rx_pkts": 0, "t_rx_recv": 0, "t_rx_key": 0, "t_rx_crypto": 0,
         "t_rx_write": 0}
    rep = prof.build_report("net", "p", "A", {"A-B": [11, 12]},
                            fake_probes(tun_read=3_000, udp_send=2_000), {"A-B": d})
    assert rep["stages"]["tun_read"]["mean_us"] == pytest.approx(3.0)
    assert rep["stages"]["tun_write"]["mean_us"] is None
    json.dumps(rep)  # --json prints it as it is
    c = Console(record=True, width=200)
    c.print(prof.render(rep))
    text = c.export_text()
    assert "tun_read (readv, TUN): 1 calls, mean 3.0 µs" in text
    assert "2 -> 3" in text and "|****" in text
    assert "tun_write" not in text  # no calls: no histogram, no share
    assert "Table I" in text and "1. receive data" in text and "4,869" in text
    assert "off CPU" in text


def test_a_node_that_is_not_running_is_named(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix)
    with pytest.raises(NotRunning, match=r"node A is not running \(no tunnel status under "):
        prof.find_workers(topo, "A")
    with pytest.raises(NotRunning, match="no node named 'Z'"):
        prof.profile_node(topo, "Z", 1.0)


# ---- against a running network -----------------------------------------------------------

def _bcc_ok() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.netns
@pytest.mark.skipif(not _bcc_ok(), reason="bcc is not importable")
def test_profile_a_running_node_under_traffic(tmp_path, prefix):
    from tests.test_tunnel import addr, make_net, ns

    topo, _ = make_net(tmp_path, prefix, two=True)
    flood = subprocess.Popen(["ip", "netns", "exec", ns(prefix, "A"), "ping", "-f", "-q",
                              "-s", "1200", "-w", "30", "-I", addr(topo, "A"),
                              addr(topo, "B")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        res = subprocess.run([QKDCTL, "profile", "--node", "A",
                              "--config", str(topo.path), "--seconds", "2", "--json"],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert res.returncode == 0, res.stderr
        rep = json.loads(res.stdout)
    finally:
        flood.kill()
        flood.wait(5)
    assert rep["node"] == "A" and len(rep["workers"]["A-B"]) == 2
    assert 1.9 < rep["seconds"] < 3.0
    # A sends echo requests (TUN read, UDP send) and gets the replies (UDP recv, TUN write)
    for stage in ("tun_read", "udp_send", "udp_recv", "tun_write"):
        st = rep["stages"][stage]
        assert st["count"] > 50 and st["hist"], stage
        assert sum(c for _, _, c in st["hist"]) == st["count"], stage
        assert st["mean_us"] > 0
    assert rep["user"]["count"] > 0 and rep["time"]["oncpu_ns"] > 0
    rows = [r for r in rep["table_i"] if r["link"] == "A-B"]
    assert len(rows) == 8 and all(r["pkts"] > 50 for r in rows)
    assert all(r["us_per_pkt"] > 0 and r["x_proposed"] > 0 for r in rows)
    assert sum(rep["time"]["shares"].values()) == pytest.approx(1.0)


@pytest.mark.netns
def test_cli_says_when_the_node_is_not_running(tmp_path, prefix):
    topo = write_topology(tmp_path, prefix)
    res = subprocess.run([QKDCTL, "profile", "--node", "A",
                          "--config", str(topo.path), "--seconds", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, "COLUMNS": "300"})
    assert res.returncode == 1
    assert "node A is not running (no tunnel status under" in res.stderr
