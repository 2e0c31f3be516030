"""The benches' ceilings without measuring anything: the targets and how a result is
judged against them, the bare underlay path's routes and forwarding switches, iperf3's
report, and the calibration's rate helper."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bench import bare_underlay, ceiling, iperf
from bench.calibrate import best_rate
from bench.otp import TEMPLATE
from control.core.config import parse_topology

# ---- targets --------------------------------------------------------------------------------

def test_targets_are_the_issues_ratios_on_the_fields_the_benches_write():
    assert ceiling.TARGETS == {
        "otp": {"ratio_direct_vs_ceiling": 0.5, "ratio_relay_vs_ceiling": 0.25},
        "api": {"ratio_256bit_vs_ceiling": 0.5, "ratio_1MiB_vs_ceiling": 0.5},
        "gkm": {"ratio_vs_ceiling": 0.7},
        "lkm": {"ratio_vs_ceiling": 0.5},
    }


def test_vs_is_none_without_both_figures_or_a_positive_ceiling():
    assert ceiling.vs(2.0, 8.0) == 0.25
    assert ceiling.vs(None, 8.0) is None and ceiling.vs(2.0, None) is None
    assert ceiling.vs(2.0, 0.0) is None and ceiling.vs(2.0, -1.0) is None
    assert ceiling.vs(0.0, 8.0) == 0.0


def test_meets_every_target_and_a_missing_ratio_fails():
    ok = {"ratio_direct_vs_ceiling": 0.5, "ratio_relay_vs_ceiling": 0.3}
    assert ceiling.meets(ok, "otp")
    assert not ceiling.meets({**ok, "ratio_relay_vs_ceiling": 0.2499}, "otp")
    assert not ceiling.meets({**ok, "ratio_relay_vs_ceiling": None}, "otp")
    assert not ceiling.meets({"ratio_direct_vs_ceiling": 0.9}, "otp")
    assert ceiling.meets({"ratio_vs_ceiling": 0.7}, "gkm")


def test_shortfalls_say_how_far_below_each_missed_target():
    r = {"ratio_256bit_vs_ceiling": 0.6, "ratio_1MiB_vs_ceiling": 0.2}
    assert ceiling.shortfalls(r, "api") == {"ratio_1MiB_vs_ceiling": pytest.approx(0.6)}
    assert ceiling.shortfalls({}, "lkm") == {"ratio_vs_ceiling": None}
    assert ceiling.shortfalls({"ratio_vs_ceiling": 0.8}, "gkm") == {}


def test_verdict_line_names_each_target_with_its_ratio():
    line = ceiling.verdict_line({"ratio_direct_vs_ceiling": 0.62,
                                 "ratio_relay_vs_ceiling": 0.1}, "otp")
    assert "direct 0.62 of the ceiling (target 0.50): [green]met" in line
    assert "relay 0.10 of the ceiling (target 0.25): [red]not met" in line
    assert "not measured" in ceiling.verdict_line({}, "lkm")
    assert ceiling.verdict_line({"ratio_vs_ceiling": 0.5}, "lkm").startswith("targets: ours 0.50")


# ---- the bare underlay path -----------------------------------------------------------------

@pytest.fixture
def line_abc():
    text = TEMPLATE.format(prefix="bx000000", mode="proposed", workers=1, capacity="64MiB")
    return parse_topology(text, Path("/tmp/bench-bx000000.toml"))


NS = {"A": "nsA", "B": "nsB", "C": "nsC"}


def test_a_direct_path_is_the_link_itself_and_changes_nothing(line_abc):
    assert bare_underlay.ends(line_abc, "AB") == ("10.204.1.1", "10.204.1.2")
    assert bare_underlay.ends(line_abc, "BA") == ("10.204.1.2", "10.204.1.1")
    assert bare_underlay.routes(line_abc, NS, "AB") == []
    assert bare_underlay.forwarding(line_abc, NS, "AB") == []


def test_a_relayed_path_routes_both_ends_and_opens_only_the_middle_nodes_underlay(line_abc):
    assert bare_underlay.ends(line_abc, "ABC") == ("10.204.1.1", "10.204.2.2")
    assert bare_underlay.routes(line_abc, NS, "ABC") == [
        ("nsA", "10.204.2.2", "10.204.1.2"),  # A: to C via B on A-B
        ("nsC", "10.204.1.1", "10.204.2.1"),  # C: back to A via B on B-C
    ]
    assert bare_underlay.forwarding(line_abc, NS, "ABC") == [
        ("nsB", "net.ipv4.conf.ul0.forwarding"), ("nsB", "net.ipv4.conf.ul1.forwarding")]


def test_paths_need_links_and_two_nodes(line_abc):
    with pytest.raises(ValueError, match="no link between A and C"):
        bare_underlay.hops(line_abc, "AC")
    with pytest.raises(ValueError, match="at least two"):
        bare_underlay.hops(line_abc, "A")


# ---- iperf3's report ------------------------------------------------------------------------

def test_iperf_report_gives_the_received_rate_and_raises_its_error():
    report = {"end": {"sum_received": {"bits_per_second": 4.5e9, "bytes": 562500000,
                                       "seconds": 1.0},
                      "sum_sent": {"retransmits": 3, "bytes": 563000000}}}
    assert iperf.parse(json.dumps(report), "a->b") == {"gbps": 4.5, "bytes": 562500000,
                                                       "seconds": 1.0, "retransmits": 3,
                                                       "bytes_sent": 563000000}
    with pytest.raises(iperf.IperfError, match="iperf3 a->b: unable to connect"):
        iperf.parse(json.dumps({"error": "unable to connect to server"}), "a->b")
    with pytest.raises(json.JSONDecodeError):
        iperf.parse("not json", "a->b")


# ---- calibration ----------------------------------------------------------------------------

def test_best_rate_takes_the_fastest_window():
    now = [0.0]
    costs = iter([0.25] * 4 + [0.125] * 8 + [0.5] * 2)  # seconds a step, window by window

    def step() -> None:
        now[0] += next(costs)

    # 1000 bytes a step; windows of 1 s at 4, 8 and 2 steps a second: the best is 8
    rate = best_rate(step, 1000, window=1.0, windows=3, clock=lambda: now[0])
    assert rate == pytest.approx(8 * 1000 * 8 / 1e9)
    assert next(costs, None) is None  # every window ended as soon as it was full


def test_calibration_records_each_figure_and_a_failed_step_without_stopping(monkeypatch):
    from bench import calibrate

    def no_iperf(seconds: float) -> float:
        raise iperf.IperfError("iperf3 a->b: no iperf3")

    monkeypatch.setattr(calibrate, "memcpy_gbps", lambda: 50.0)
    monkeypatch.setattr(calibrate, "poly1305_gbps", lambda: (20.0, "openssl-evp"))
    monkeypatch.setattr(calibrate, "xor_gbps", lambda: 80.0)
    monkeypatch.setattr(calibrate, "veth_tcp_gbps", no_iperf)
    out = calibrate.run()
    assert (out["memcpy_gbps"], out["poly1305_gbps"], out["xor_gbps"]) == (50.0, 20.0, 80.0)
    assert out["poly1305_backend"] == "openssl-evp" and out["veth_tcp_gbps"] is None
    assert out["errors"] == {"veth_tcp_gbps": "IperfError: iperf3 a->b: no iperf3"}
    assert len(out["load_before"]) == 3 and out["seconds"] >= 0


def test_a_failed_bench_keeps_its_networks_logs_and_a_clean_one_does_not(tmp_path,
                                                                         monkeypatch):
    """Taking a bench network down removes its run directory with the logs; when the
    bench is failing (an exception on its way out), the logs are copied out first."""
    from rich.console import Console

    from bench import harness, otp
    from control.core import paths

    monkeypatch.setattr(harness, "KEPT_LOGS", tmp_path / "kept")
    for failing in (False, True):
        net = otp.OtpNet(Console(file=io.StringIO()), mode="proposed", workers=1,
                      capacity="1MiB")
        logs = paths.log_dir(net.prefix)
        logs.mkdir(parents=True)
        (logs / "node-A.log").write_text("what went wrong\n")
        if failing:
            with pytest.raises(RuntimeError):
                try:
                    raise RuntimeError("the bench failed")
                finally:
                    net.down()
        else:
            net.down()
        assert not logs.exists()
        kept = tmp_path / "kept" / net.prefix / "node-A.log"
        assert kept.exists() == failing
        if failing:
            assert kept.read_text() == "what went wrong\n"


def test_an_otp_run_that_spends_all_its_key_is_refilled_and_run_again():
    """A full ring may offer only half its capacity (a kept range pins its release
    point), so a fast run can spend it all: the point refills and runs again, and fails
    only when every attempt ran dry."""
    from rich.console import Console

    from bench import otp
    from bench.harness import KeyDry

    class Net:  # the calls run_point makes, recorded; iperf runs dry ``dry`` times
        def __init__(self, dry: int):
            self.dry, self.fills = dry, 0
            self.console = Console(file=io.StringIO())

        def set_mtu(self, mtu):
            pass

        def fill(self):
            self.fills += 1
            return 0.5

        def counters(self):
            return {k: {f: 0 for f in ("tx_pkts", "rx_pkts", "tx_key", "drop_tx_nokey",
                                      *otp.STEPS_TX, *otp.STEPS_RX)}
                    for k in (("A", "A-B"), ("B", "A-B"))}

        def iperf(self, src, dst, seconds, streams):
            if self.dry:
                self.dry -= 1
                raise KeyDry("no key left")
            return {"gbps": 5.0, "bytes": 1, "seconds": 1.0, "retransmits": 0}

    net = Net(dry=otp.DRY_RETRIES)
    p = otp.run_point(net, "direct", 65449, 1.0)
    assert p["gbps"] == 5.0 and p["dry_retries"] == otp.DRY_RETRIES
    assert net.fills == otp.DRY_RETRIES + 1  # a refill before every attempt
    with pytest.raises(KeyDry):
        otp.run_point(Net(dry=otp.DRY_RETRIES + 1), "direct", 65449, 1.0)


def test_two_bare_stores_are_written_at_once_each_with_all_the_bytes(tmp_path):
    """The reference for a fill, whose bytes are made durable at both ends: two stores
    written in two processes at the same time; the rate counts the bytes once, over the
    span from the first start to the last end, and nothing is left in the scratch root."""
    from bench import bare_store

    r = bare_store.store_write_pair(8 << 20, 1 << 20, 4 << 20, root=tmp_path)
    assert r["bytes"] == 8 << 20 and len(r["stores_gbps"]) == 2
    (s0, e0), (s1, e1) = r["spans"]
    assert r["seconds"] == pytest.approx(max(e0, e1) - min(s0, s1))
    for (s, e), g in zip(r["spans"], r["stores_gbps"], strict=True):  # each wrote it all
        assert (e - s) == pytest.approx(r["bytes"] * 8 / g / 1e9, rel=1e-3, abs=1e-3)
    assert list(tmp_path.iterdir()) == []


def test_bench_gkm_reports_a_run_without_1_mib_keys(tmp_path):
    from rich.console import Console

    from bench.gkm import summarize

    out = io.StringIO()
    points = [{"path": p, "block": 4096, "method": "proposed", "gbps": 0.3, "seconds": 1.0}
              for p in ("direct", "relay")]
    ceilings = {name: {"gbps": g} for name, g in (("store", 3.0), ("two_stores", 1.8),
                                                  ("disk", 10.0))}
    r = summarize(points, (4096,), 64 << 20, 16 << 20, None, Console(file=out), ceilings)
    assert r["ratio_vs_ceiling"] is None and r["ratio_vs_two_stores"] is None
    assert "4 KiB" in out.getvalue() and "1 MiB keys, direct" not in out.getvalue()
