"""`qkdctl bench all` without running a benchmark: the table from the benches' recorded
results, the ratios, the RESULTS.md section rewrite, the registry and its arguments, and
the runner with tiny fake benches (one failing, one interrupted)."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from rich.console import Console

from bench import all as ball
from bench import record
from bench.summary import (
    KEYS,
    Quantity,
    Row,
    api_rows,
    calibration_line,
    etsi_rows,
    fmt_ratio,
    gbps,
    gkm_rows,
    guard_rows,
    lkm_rows,
    markdown_table,
    mbps,
    otp_rows,
    ratio,
    relay_rows,
    rows_of,
)

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def recorded(name: str) -> dict:
    """A result a bench wrote in an earlier session (the real field names)."""
    return json.loads((RESULTS / name).read_text())


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


# ---- quantities, ratios and rows -----------------------------------------------------------

def test_quantities_print_in_the_unit_that_reads():
    assert str(mbps(414.0)) == "414 Mb/s"
    assert str(mbps(3.92)) == "3.92 Mb/s"
    assert str(gbps(6.4449)) == "6.44 Gb/s"
    assert str(gbps(0.226)) == "226 Mb/s"
    assert str(Quantity(3212.4, KEYS)) == "3,212 keys/s"
    assert str(Quantity(500.0)) == "0.5 kb/s"


def test_ratios_are_none_where_they_mean_nothing():
    assert ratio(gbps(4.14), mbps(414.0)) == pytest.approx(10.0)
    assert ratio(None, mbps(1)) is None and ratio(gbps(1), None) is None
    assert ratio(gbps(1), Quantity(0.0)) is None
    assert ratio(gbps(1), Quantity(10.0, KEYS)) is None  # different units
    assert fmt_ratio(None) == "-"
    assert fmt_ratio(15.567) == "15.6x"
    assert fmt_ratio(0.973) == "0.97x"


def test_rows_match_what_each_bench_computed_itself():
    lkm = recorded("2026-11-26-lkm.json")  # before ceilings: the target cannot be judged
    (r,) = lkm_rows(lkm)
    assert r.ratio_vs_paper == pytest.approx(lkm["ratio_vs_paper"])
    assert r.ratio_vs_baseline == pytest.approx(lkm["ratio_vs_baseline"])
    assert r.ceiling is None and r.target == 0.5 and r.met is None
    assert r.cells()[-3:] == ("-", "-", ">= 0.50x: no ceiling")

    otp = recorded("2026-11-26-otp.json")
    direct, relay = otp_rows(otp)
    assert direct.ratio_vs_paper == pytest.approx(otp["ratio_direct_vs_paper"])
    assert relay.ratio_vs_paper == pytest.approx(otp["ratio_relay_vs_paper"])
    assert direct.ratio_vs_baseline == pytest.approx(otp["ratio_vs_baseline"])
    assert "MTU 65449" in direct.figure
    assert str(direct.paper_baseline) == "3.92 Mb/s"
    assert "paper 3.92 Mb/s" in direct.cells()[5]

    gkm = recorded("2026-11-27-gkm.json")
    d, via = gkm_rows(gkm)
    assert d.ratio_vs_paper == pytest.approx(gkm["ratio_vs_paper"])
    assert d.ratio_vs_baseline == pytest.approx(gkm["ratio_vs_baseline"])
    assert via.paper is None and via.cells()[4] == "-"

    api = recorded("2026-11-27-api-run2.json")
    big, small = api_rows(api)
    assert big.ratio_vs_paper == pytest.approx(api["ratio_vs_paper"])
    assert big.ratio_vs_baseline == pytest.approx(api["ratio_vs_baseline_at_1MiB"])
    assert big.met is None and big.cells()[-1] == ">= 0.50x: no ceiling"
    assert small.ours == Quantity(api["keys_per_s_at_256bit"], KEYS)
    assert small.ratio_vs_baseline > 1

    guard = recorded("2026-11-27-guard.json")
    (g,) = guard_rows(guard)
    assert g.paper is None
    assert g.ratio_vs_baseline == pytest.approx(guard["ratio_gbps_on_vs_off"])
    assert g.target is None and g.met is True and g.cells()[-1] == "met"  # its own criterion


def test_the_etsi_row_shows_the_link_against_one_call_per_block_and_the_devices():
    etsi = recorded("2026-12-07-etsi.json")
    (r,) = etsi_rows(etsi)
    assert r.ratio_vs_baseline == pytest.approx(etsi["ratio_vs_baseline"])
    assert r.ratio_vs_ceiling == pytest.approx(etsi["ratio_vs_ceiling"])
    assert "1 KiB blocks of 32 x 256-bit keys" in r.figure
    assert r.paper is None and r.target is None and r.met is None


def test_rows_carry_each_ceiling_and_judge_its_target_as_the_bench_did():
    lkm = recorded("2026-12-02-lkm-ceiling.json")
    (r,) = lkm_rows(lkm)
    assert r.ratio_vs_ceiling == pytest.approx(lkm["ratio_vs_ceiling"])
    assert r.met is lkm["meets_floor"]
    assert r.ceiling_name == "key source alone"

    otp = recorded("2026-12-02-otp-ceiling.json")
    direct, relay = otp_rows(otp)
    assert direct.ratio_vs_ceiling == pytest.approx(otp["ratio_direct_vs_ceiling"])
    assert relay.ratio_vs_ceiling == pytest.approx(otp["ratio_relay_vs_ceiling"])
    assert (direct.target, relay.target) == (0.5, 0.25)
    assert (direct.met and relay.met) is otp["meets_floor"]

    gkm = recorded("2026-12-02-gkm-ceiling.json")
    d, via = gkm_rows(gkm)
    assert d.ratio_vs_ceiling == pytest.approx(gkm["ratio_vs_ceiling"])
    assert d.met is gkm["meets_floor"] and d.target == 0.7
    assert via.ceiling == d.ceiling and via.target is None and via.met is None

    api = recorded("2026-12-02-api-ceiling.json")
    big, small = api_rows(api)
    assert big.ratio_vs_ceiling == pytest.approx(api["ratio_1MiB_vs_ceiling"])
    assert small.ratio_vs_ceiling == pytest.approx(api["ratio_256bit_vs_ceiling"])
    assert small.ceiling.unit == KEYS and big.ceiling.unit == "b/s"
    assert (big.met and small.met) is api["meets_floor"]


def test_the_target_cell_says_the_target_and_whether_it_was_met():
    def row(ours: float, ceiling: float | None, target: float | None = 0.5, floor=None):
        return Row("m", "f", ours=gbps(ours), ceiling=gbps(ceiling), ceiling_name="bare",
                   target=target, floor_met=floor)

    assert row(1.0, 2.0).met is True and row(1.0, 2.0).cells()[-1] == ">= 0.50x: met"
    assert row(0.99, 2.0).met is False and row(0.99, 2.0).cells()[-1] == ">= 0.50x: not met"
    assert row(1.0, None).met is None
    assert row(1.0, 2.0, target=None, floor=False).met is False  # no target: its own floor
    assert row(1.0, 2.0, target=None).cells()[-1] == "-"
    assert row(1.0, 4.0).cells()[7:9] == ("4.00 Gb/s (bare)", "0.25x")
    assert row(1.0, 4.0).cells(sep="\n")[7] == "4.00 Gb/s\n(bare)"
    d = row(1.0, 4.0).to_dict()
    assert d["ratio_vs_ceiling"] == 0.25 and d["target_met"] is False
    assert Row("m", error="x").cells() == ("m", "FAILED: x", *("-",) * 8)


def test_relay_rows_compare_the_most_hops_with_one_hop_of_the_same_run():
    result = {"paper": {"mbps_at_1MB": 85.0}, "nodes": 16, "keeps_advantage": True,
              "points": [{"hops": h, "gbps": g} for h, g in ((8, 0.2), (1, 1.6), (4, 0.4))]}
    one, eight = relay_rows(result)
    assert one.figure == "1 MiB keys, 1 hop(s) (ring of 16)" and one.baseline is None
    assert eight.ratio_vs_paper == pytest.approx(200 / 85)
    assert eight.ratio_vs_baseline == pytest.approx(0.125)
    assert eight.baseline_name == "1 hop, same run" and eight.floor_met is True
    (only,) = relay_rows({**result, "points": [{"hops": 2, "gbps": 1.0}]})
    assert only.baseline is None and only.floor_met is True
    (none,) = relay_rows({**result, "points": []})
    assert none.error == "no hop count measured"


def test_a_failed_or_unreadable_result_is_one_row_saying_why():
    (r,) = rows_of("OTP tunnel", None, "iperf3 A->B hung three times", otp_rows)
    assert r.cells()[:2] == ("OTP tunnel", "FAILED: iperf3 A->B hung three times")
    (r,) = rows_of("OTP tunnel", {"bench": "otp"}, None, otp_rows)  # a field missing
    assert r.error is not None and "KeyError" in r.error


def test_rows_survive_the_json_round_trip():
    rows = (otp_rows(recorded("2026-11-26-otp.json"))
            + api_rows(recorded("2026-11-27-api-run2.json"))
            + [Row("x", error="boom")])
    back = [Row.from_dict(json.loads(json.dumps(r.to_dict()))) for r in rows]
    assert back == rows


def test_markdown_table_has_a_cell_per_column_and_escapes_pipes():
    md = markdown_table([Row("a|b", "fig", mbps(1), gbps(1)), Row("c", error="x | y")])
    lines = md.splitlines()
    assert len(lines) == 4
    assert all(ln.replace("\\|", "").count("|") == 11 for ln in lines)
    assert "a\\|b" in lines[2] and "FAILED: x \\| y" in lines[3]


# ---- RESULTS.md ----------------------------------------------------------------------------

CALIBRATION = {"memcpy_gbps": 92.3, "poly1305_gbps": 19.04, "poly1305_backend": "openssl-evp",
               "xor_gbps": 85.6, "veth_tcp_gbps": None, "load_before": [1.25, 1.0, 0.5],
               "errors": {"veth_tcp_gbps": "IperfError: no iperf3"}, "seconds": 4.2}


def test_calibration_line_names_each_figure_and_what_failed():
    line = calibration_line(CALIBRATION)
    assert line == ("memory copy 92.30 Gb/s, Poly1305 19.04 Gb/s (openssl-evp), XOR 85.60 "
                    "Gb/s, veth TCP failed; load average 1.2")
    assert calibration_line(None) == "no calibration in this run"
    assert calibration_line({"memcpy_gbps": 1.5}).startswith("memory copy 1.50 Gb/s, Poly1305 -")


def fake_report(**over) -> dict:
    data = {"date": "2026-11-28", "seconds": 693.0, "profile": "full",
            "machine": {"cpu_model": "AMD EPYC 7B13", "cores": 2, "memory_bytes": 24 << 30,
                        "kernel": "6.18.44", "os": "Debian GNU/Linux 12 (bookworm)",
                        "python": "3.11.7"},
            "calibration": CALIBRATION,
            "benches": {"lkm": {"ok": True, "result": {"plot": None}},
                        "otp": {"ok": True, "result": {"plot": "/x/bench/results/otp-mtu.png"}},
                        "gkm": {"ok": False, "result": None}},
            "summary": [r.to_dict() for r in lkm_rows(recorded("2026-11-26-lkm.json"))]
            + [Row("global key manager", error="store not full").to_dict()]}
    data.update(over)
    return data


def test_section_names_machine_table_failures_and_files():
    s = record.section(fake_report(), "/x/bench/results/2026-11-28.json", Path("/x"))
    assert s.startswith(record.BEGIN) and s.endswith(record.END)
    assert "AMD EPYC 7B13, 2 cores, 24 GiB, kernel 6.18.44" in s
    assert "took 11 min 33 s" in s
    assert "Calibration (same run, best short windows): memory copy 92.30 Gb/s" in s
    assert "| local key manager | key into rings, 1 MiB blocks | 414 Mb/s | 6.44 Gb/s | 15.6x" in s
    assert "FAILED: store not full" in s and "Failed: gkm" in s
    assert "`bench/results/2026-11-28.json`" in s and "`bench/results/otp-mtu.png`" in s
    assert "quick" not in s
    assert "not comparable" in record.section(fake_report(profile="quick"), "r.json")


def test_rewrite_inserts_once_then_replaces_keeping_the_rest():
    text = "# Benchmark results\n\nMachine: old.\n\n## Local key manager\nkeep me\n\n## OTP\n"
    one = record.rewrite(text, f"{record.BEGIN}\nfirst\n{record.END}")
    assert one.index("first") < one.index("## Local key manager")
    assert one.replace(f"{record.BEGIN}\nfirst\n{record.END}\n\n", "") == text
    two = record.rewrite(one, f"{record.BEGIN}\nsecond\n{record.END}")
    assert "first" not in two and two.count(record.BEGIN) == 1
    assert two == one.replace("first", "second")
    assert record.rewrite("# t\n", "S") == "# t\n\nS\n"  # no heading: at the end
    with pytest.raises(ValueError, match="without"):
        record.rewrite(f"x\n{record.BEGIN}\nno end\n", "S")


def test_record_rewrites_a_copy_of_the_real_results_md(tmp_path):
    real = (RESULTS.parent / "RESULTS.md").read_text()
    md, js = tmp_path / "bench" / "RESULTS.md", tmp_path / "bench" / "results" / "r.json"
    js.parent.mkdir(parents=True)
    md.write_text(real)
    js.write_text(json.dumps(fake_report()))
    record.record(js, md)
    once = md.read_text()
    headings = [ln for ln in real.splitlines() if ln.startswith("## ")
                and not ln.startswith("## Latest: `qkdctl bench all`")]
    assert all(h in once for h in headings)  # every hand-written section kept
    assert "`bench/results/r.json`" in once
    record.record(js, md)
    assert md.read_text() == once  # idempotent


def test_record_puts_the_same_table_in_a_readme_with_markers_only(tmp_path):
    md, js = tmp_path / "bench" / "RESULTS.md", tmp_path / "bench" / "results" / "r.json"
    js.parent.mkdir(parents=True)
    md.write_text("# Benchmark results\n")
    js.write_text(json.dumps(fake_report()))
    plain = tmp_path / "README.md"
    plain.write_text("# x\n## Benchmarks\nno markers\n")
    assert record.record(js, md, plain) == [md]
    assert plain.read_text() == "# x\n## Benchmarks\nno markers\n"  # left alone
    plain.write_text(f"# x\n## Benchmarks\n{record.BEGIN}\n{record.END}\nafter\n")
    assert record.record(js, md, plain) == [md, plain]
    text = plain.read_text()
    assert "\n### Latest: `qkdctl bench all`" in text and text.endswith("after\n")
    table = [ln for ln in md.read_text().splitlines() if ln.startswith("| ")]
    assert table and all(ln in text for ln in table)
    assert "`bench/results/r.json`" in text  # paths from the README's directory


# ---- registry and arguments ----------------------------------------------------------------

def test_registry_names_every_bench_once_with_its_rows():
    names = [b.name for b in ball.REGISTRY]
    assert names == ["lkm", "etsi", "otp", "gkm", "api", "guard", "relay", "keyrate"]
    assert len(set(names)) == len(names)
    assert {b.plot for b in ball.REGISTRY} >= {"otp-mtu", "gkm-size", "api-size", "relay-hops",
                                               "keyrate"}
    for b in ball.REGISTRY:
        mod, _, fn = b.target.partition(":")
        assert (RESULTS.parent / f"{mod.split('.')[-1]}.py").exists() and fn == "run"


def test_select_keeps_the_registry_order_and_refuses_unknown_names():
    assert [b.name for b in ball.select(None)] == [b.name for b in ball.REGISTRY]
    assert [b.name for b in ball.select(["guard", "lkm"])] == ["lkm", "guard"]
    with pytest.raises(ValueError, match="unknown bench.*nope.*known: api"):
        ball.select(["lkm", "nope"])


def test_settings_quick_or_full_and_the_plot_in_the_results_dir(tmp_path):
    otp = next(b for b in ball.REGISTRY if b.name == "otp")
    full, quick = otp.settings(False, tmp_path), otp.settings(True, tmp_path, "-quick")
    assert full["plot_path"] == tmp_path / "otp-mtu.png"
    assert quick["plot_path"] == tmp_path / "otp-mtu-quick.png"
    assert quick["repeat"] == 1 and full["repeat"] == 3
    lkm = next(b for b in ball.REGISTRY if b.name == "lkm")
    assert "plot_path" not in lkm.settings(False, tmp_path)


def test_unknown_bench_is_refused_before_anything_runs():
    from typer.testing import CliRunner

    from control.tools.cli import app

    r = CliRunner().invoke(app, ["bench", "all", "--only", "nope"])
    assert r.exit_code == 2
    assert "unknown bench(es) nope" in r.output


# ---- the runner, with fake benches ---------------------------------------------------------

def fake_registry(calls: list[str], fail: str | None = None, interrupt: str | None = None):
    def make(name: str):
        def run(seconds: float, console: Console, plot_path: Path | None = None) -> dict:
            calls.append(name)
            console.print(f"{name}: measuring\n{name}: last line")
            if name == fail:
                raise RuntimeError(f"{name} broke")
            if name == interrupt:
                raise KeyboardInterrupt
            return {"bench": name, "ours_gbps": 2.0, "paper_mbps": 100.0,
                    "baseline_gbps": 0.5, "meets_floor": True,
                    "plot": str(plot_path) if plot_path else None}
        return run

    funcs = {f"fake:{n}": make(n) for n in ("one", "two", "three")}
    registry = (ball.Bench("one", "module one", "fake:one", full={"seconds": 9},
                           quick={"seconds": 1}, plot="one-plot", estimate_s=(0.1, 0.1)),
                ball.Bench("two", "module two", "fake:two", full={"seconds": 9},
                           quick={"seconds": 1}, estimate_s=(0.1, 0.1)),
                ball.Bench("three", "module three", "fake:three", full={"seconds": 9},
                           quick={"seconds": 1}, estimate_s=(0.1, 0.1)))
    return registry, funcs.__getitem__


def test_a_failing_bench_is_reported_and_the_others_still_run(tmp_path):
    calls: list[str] = []
    registry, loader = fake_registry(calls, fail="two")
    log = io.StringIO()
    outs = ball.run_all(list(registry), quick=True, out_dir=tmp_path, console=quiet(),
                        log=log, loader=loader, cleanup=None)
    assert calls == ["one", "two", "three"]
    assert [o.ok for o in outs] == [True, False, True]
    assert outs[1].error == "two broke" and not outs[1].interrupted
    assert outs[0].settings == {"seconds": 1, "plot_path": tmp_path / "one-plot.png"}
    assert ball.exit_code(outs) == 1
    rows = ball.summary_rows(outs)  # generic rows: the fakes use the common field names
    assert [r.cells()[1] for r in rows][1] == "FAILED: two broke"
    assert rows[0].ratio_vs_paper == pytest.approx(20.0)
    assert rows[0].ratio_vs_baseline == pytest.approx(4.0)
    assert "three: last line" in log.getvalue()  # the benches' output is in the log
    data = ball.report(outs, quick=True, started=ball.dt.datetime(2026, 11, 28, 9, 0),
                       seconds=1.0, machine_info={"cores": 2})
    data = json.loads(json.dumps(data, default=str))
    assert data["ok"] is False and data["profile"] == "quick" and data["date"] == "2026-11-28"
    assert data["benches"]["two"] == {"module": "module two", "ok": False, "seconds": 0.0,
                                      "settings": {"seconds": 1}, "error": "two broke",
                                      "interrupted": False, "result": None}
    assert data["benches"]["one"]["result"]["ours_gbps"] == 2.0
    assert len(data["summary"]) == 3


def test_an_interrupt_stops_the_run_and_cleans_up_after_the_bench(tmp_path):
    calls: list[str] = []
    registry, loader = fake_registry(calls, interrupt="two")
    cleaned: list[float] = []
    t0 = time.time()
    outs = ball.run_all(list(registry), quick=False, out_dir=tmp_path, console=quiet(),
                        loader=loader, cleanup=lambda since: cleaned.append(since) or [])
    assert calls == ["one", "two"]  # three never ran
    assert outs[1].interrupted and ball.exit_code(outs) == 130
    assert len(cleaned) == 1 and cleaned[0] >= t0


def test_every_bench_passing_exits_zero_and_main_writes_json_and_records(tmp_path):
    calls: list[str] = []
    registry, loader = fake_registry(calls)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n## Old section\nkept\n")
    code = ball.main(quick=False, out_dir=tmp_path / "res", only=["one", "three"],
                     record=True, as_json=False, out=quiet(), err=quiet(), results_md=md,
                     registry=registry, loader=loader, calibration=lambda c: CALIBRATION)
    assert code == 0 and calls == ["one", "three"]
    (js,) = (tmp_path / "res").glob("*.json")
    data = json.loads(js.read_text())
    assert js.name == f"{data['date']}.json"
    assert set(data["benches"]) == {"one", "three"}
    assert data["machine"]["cores"] == os.cpu_count() and data["machine"]["kernel"]
    assert data["calibration"] == CALIBRATION
    text = md.read_text()
    assert text.index(record.BEGIN) < text.index("## Old section") and "kept" in text
    assert "module one" in text and "module three" in text


def test_quick_run_without_record_leaves_results_md_alone(tmp_path):
    registry, loader = fake_registry([])
    md = tmp_path / "RESULTS.md"
    md.write_text("# r\n")
    code = ball.main(quick=True, out_dir=tmp_path, only=None, record=False, as_json=False,
                     out=quiet(), err=quiet(), results_md=md, registry=registry,
                     loader=loader, calibration=lambda c: CALIBRATION)
    assert code == 0 and md.read_text() == "# r\n"
    assert [p.name.endswith("-quick.json") for p in tmp_path.glob("*.json")] == [True]


def test_an_interrupt_while_calibrating_runs_no_bench_and_writes_nothing(tmp_path):
    calls: list[str] = []
    registry, loader = fake_registry(calls)

    def calibration(console: Console) -> dict:
        raise KeyboardInterrupt

    code = ball.main(quick=True, out_dir=tmp_path, only=None, record=True, as_json=False,
                     out=quiet(), err=quiet(), results_md=tmp_path / "RESULTS.md",
                     registry=registry, loader=loader, calibration=calibration)
    assert code == 130 and calls == []
    assert not list(tmp_path.glob("*.json")) and not (tmp_path / "RESULTS.md").exists()


# ---- pieces ----------------------------------------------------------------------------------

def test_machine_from_proc_files():
    m = ball.parse_machine("processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n",
                           "MemTotal:       24605996 kB\nMemFree: 1 kB\n",
                           'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12"\n')
    assert m == {"cpu_model": "AMD EPYC 7B13 64-Core Processor",
                 "memory_bytes": 24605996 * 1024, "os": "Debian GNU/Linux 12"}
    assert ball.parse_machine("", "", "") == {"cpu_model": None, "memory_bytes": None,
                                              "os": None}


def test_sink_logs_everything_and_shows_the_latest_line():
    shown: list[str] = []
    log = io.StringIO()
    s = ball._Sink(log, shown.append)
    s.write("first line\nsecond ")
    s.write("half\n\n")
    assert shown == ["first line", "second half"]
    assert log.getvalue() == "first line\nsecond half\n\n"


def test_leftovers_are_only_networks_a_bench_made_during_the_run():
    root = Path("/run/qkdnet")
    mans = [("bo1", str(root / "bench-bo1.toml"), 100.0),   # a bench's, during the run
            ("bo0", str(root / "bench-bo0.toml"), 50.0),    # a bench's, before the run
            ("t123", "/tmp/x/net.toml", 100.0),             # someone's test network
            ("tri", "/work/main/examples/triangle.toml", 120.0)]
    assert ball.leftover_networks(mans, 99.0, root) == ["bo1"]


def test_median_run_picks_the_middle_and_lists_every_run_in_rank_order():
    from bench.runs import median_run

    runs = [{"gbps": 3.0, "keys_per_s": 30, "n": 1}, {"gbps": 1.0, "keys_per_s": 50, "n": 2},
            {"gbps": 2.0, "keys_per_s": 10, "n": 3}]
    by_rate = median_run(runs)
    assert by_rate["n"] == 3 and by_rate["runs_gbps"] == [1.0, 2.0, 3.0]
    by_keys = median_run(runs, "keys_per_s")
    assert by_keys["n"] == 1 and by_keys["runs_keys_per_s"] == [10, 30, 50]
    assert by_keys["runs_gbps"] == [2.0, 3.0, 1.0]
    assert "runs_gbps" not in runs[0]  # the runs themselves are left as they were


def test_keyrate_rows_judge_each_rate_by_its_floor():
    from bench.summary import keyrate_rows

    floor = {"efficiency_at_10mbps": 0.8, "efficiency_at_100mbps": 0.8,
             "fill_mbps_at_1mbps": 0.3, "idle_burn_kbps": 16.0}

    def pt(rate, fill, eff, idle):
        return {"rate_mbps": rate, "fill_mbps": fill, "efficiency": eff,
                "idle_burn_kbps": idle, "ceiling_mbps": rate / 2}

    r = {"floor": floor, "baseline": {"rate_mbps": 10.0, "fill_mbps": 3.0},
         "points": [pt(10.0, 4.4, 0.95, 10.1), pt(1.0, 0.2, 0.9, 9.0),
                    pt(100.0, 40.0, 0.7, 10.0), pt(1000.0, 600.0, 0.99, 30.0)]}
    rows = keyrate_rows(r)
    assert [row.figure.split(",")[1].strip().split(" ")[0] for row in rows] == \
        ["1", "10", "100", "1000"]
    assert [row.met for row in rows] == [False, True, False, False]  # fill, -, eff, idle
    ten = rows[1]
    assert ten.ratio_vs_baseline == pytest.approx(4.4 / 3.0)
    assert ten.ratio_vs_ceiling == pytest.approx(4.4 / 5.0)
    assert rows[0].baseline is None
    assert "efficiency 0.950," in ten.figure  # no spread measured: none shown
    r["points"][0]["efficiency_spread"] = 0.0123
    assert "efficiency 0.950 ±0.012," in keyrate_rows(r)[1].figure
    assert keyrate_rows({"points": []})[0].error


def test_keyrate_takes_each_counter_as_a_rate_between_its_own_publications():
    from bench.harness import BenchError
    from bench.keyrate import Sample, rate_between

    # Global key at 90 B/s, published at 0.0 and 10.5; the link's key at 100 B/s,
    # published at 0.8 and 10.0: read at one moment, 945 / 920 would be above 1.
    acked = rate_between(Sample(0.0, 0), Sample(10.5, 945))
    spent = rate_between(Sample(0.8, 80), Sample(10.0, 1000))
    assert acked == pytest.approx(90.0)
    assert acked / spent == pytest.approx(0.9)
    with pytest.raises(BenchError, match="not republished"):
        rate_between(Sample(3.0, 5), Sample(3.0, 5))


def test_keyrate_efficiency_spread_is_the_key_unacknowledged_over_the_key_spent():
    from bench.keyrate import spread

    assert spread(16 << 20, 800 << 20) == pytest.approx(0.02)
    assert spread(16 << 20, 0) is None
