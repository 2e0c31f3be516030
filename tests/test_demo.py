"""The demo's script (`qkdctl demo`), shortened, on the paper's triangle: it must show what
it claims — identical keys at two SAEs before and during a link cut, global key relayed
through the third node while the direct link is down, a TCP stream intact through the cut,
routes back after the restore, and nothing left after teardown. Also the report's own
judgement of failures (pure)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from control.core.config import parse_topology
from control.tools.demo import DemoReport, KeyCheck, Phase, run_demo
from control.tools.demo_stream import StreamResult
from control.tools.emulation import leftovers

TRIANGLE = Path(__file__).resolve().parent.parent / "examples" / "triangle.toml"


def _passing() -> DemoReport:
    def ok() -> KeyCheck:
        return KeyCheck(keys=2, nbytes=64, identical=True, refused_again=True)

    return DemoReport(src="A", dst="C", via="B", direct_link="A-C", detour_link="A-B",
                      key_flow_ok=True, global_key_ok=True, keys_direct=ok(), keys_detour=ok(),
                      restocked_during_cut=1 << 20, stream_on_detour=50, reroute_s=1.2,
                      restore_s=0.5,
                      phases=[Phase("direct", "A-C", 2, 100, 0), Phase("cut", "A-B", 2, 100, 1),
                              Phase("restored", "A-C", 1, 100, 0)],
                      stream=StreamResult(300, 300, True))


def test_a_report_with_every_claim_holding_has_no_problems():
    assert _passing().problems() == []


@pytest.mark.parametrize("spoil, says", [
    (lambda r: setattr(r, "stream", StreamResult(300, 200, False, "")), "not arrive intact"),
    (lambda r: setattr(r.keys_detour, "identical", False), "during the cut"),
    (lambda r: setattr(r.keys_direct, "refused_again", False), "not refused"),
    (lambda r: setattr(r, "reroute_s", None), "did not move"),
    (lambda r: setattr(r, "restore_s", None), "did not return"),
    (lambda r: setattr(r, "restocked_during_cut", 0), "relayed through B"),
    (lambda r: setattr(r.phases[1], "route", "A-C"), "route during the cut was A-C"),
    (lambda r: setattr(r, "stream_on_detour", 0), "carried nothing over B"),
    (lambda r: setattr(r, "leftovers", ["namespace x-A"]), "left behind"),
    (lambda r: setattr(r, "key_flow_ok", False), "local key"),
])
def test_each_broken_claim_is_reported(spoil, says):
    rep = _passing()
    spoil(rep)
    problems = rep.problems()
    assert len(problems) == 1 and says in problems[0]


@pytest.mark.netns
def test_the_demo_shortened_shows_what_it_claims(tmp_path, prefix):
    text = re.sub(r'prefix = "tri"', f'prefix = "{prefix}"', TRIANGLE.read_text())
    path = tmp_path / "triangle.toml"
    path.write_text(text)  # the nodes read it
    topo = parse_topology(text, path)
    buf = io.StringIO()
    code, rep = run_demo(topo, Console(file=buf, width=160), phase_s=2.0, rate_mbps=100)
    out = buf.getvalue()
    assert code == 0, out + "\n".join(rep.problems())
    assert rep.keys_direct.identical and rep.keys_detour.identical
    assert rep.keys_detour.nbytes >= topo.gkm.block_size
    assert [p.name for p in rep.phases] == ["direct", "cut", "restored"]
    assert [p.route for p in rep.phases] == ["A-C", "A-B", "A-C"]
    assert rep.restocked_during_cut > 0 and rep.stream_on_detour > 0
    s = rep.stream
    assert s is not None and s.intact and s.sent == s.received > 0
    assert leftovers(prefix) == []
    assert "demo passed" in out and "nothing left behind" in out


def test_the_demo_at_another_key_rate_runs_every_link_at_it_with_derived_sizes(tmp_path):
    from control.core.config import load_topology
    from control.core.sizing import gkm_sizes, link_sizes
    from control.tools.demo import at_key_rate, num, stream_rate_for

    src = Path(__file__).parent.parent / "examples" / "triangle.toml"
    topo = load_topology(at_key_rate(src, 10, tmp_path))
    original = load_topology(src)
    assert [lk.name for lk in topo.links] == [lk.name for lk in original.links]
    for lk, orig in zip(topo.links, original.links, strict=True):
        assert lk.key_rate_mbps == 10 and lk.ratio == orig.ratio  # (A-C keeps its 3:1)
        assert lk.sizes == link_sizes(10, orig.ratio)
    g = gkm_sizes(10)
    assert (topo.gkm.block_size, topo.gkm.window, topo.gkm.high_watermark) == \
        (g.block_size, g.window, g.high_watermark)
    assert topo.saes == original.saes and topo.prefix == original.prefix
    assert stream_rate_for(10) == 2 and stream_rate_for(0.1) == 0.1
    assert [num(x) for x in (0.04, 0.4, 3.14, 120.6, 1234.0)] == \
        ["0.04", "0.4", "3.1", "121", "1,234"]


@pytest.mark.netns
def test_the_demo_never_takes_down_a_running_network(tmp_path, prefix):
    """The demo's own topology may be up already (someone ran net up on it): the demo
    refuses, and leaves it running, instead of taking it down to start its own."""
    import subprocess

    from pyroute2 import netns as pnetns

    from control.tools import emulation

    text = re.sub(r'prefix = "tri"', f'prefix = "{prefix}"', TRIANGLE.read_text())
    path = tmp_path / "triangle.toml"
    path.write_text(text)
    topo = parse_topology(text, path)
    man = emulation.net_up(topo, start=False)
    node = subprocess.Popen(["sleep", "600"])  # stands for the running node A
    emulation._record(man, "node:A", node.pid)
    try:
        with pytest.raises(ValueError, match=r"is running \(node:A\)"):
            run_demo(topo, Console(file=io.StringIO()), phase_s=2.0, rate_mbps=100)
        assert node.poll() is None and f"{prefix}-A" in pnetns.listnetns()
    finally:
        node.kill()
        node.wait()
