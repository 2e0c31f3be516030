"""The one table of `qkdctl bench all`: each bench's result dict turned into rows of
module, the paper's figure, ours, the ratio, the conventional baseline measured in the
same run with its ratio, and the ceiling measured in the same run (what the machine does
at best for the same work) with ours over it and the target for that ratio. Pure: no I/O,
so the table is tested with made-up results, and RESULTS.md is rebuilt from the JSON
through the same rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.ceiling import TARGETS

BPS, KEYS = "b/s", "keys/s"


@dataclass(frozen=True)
class Quantity:
    """A rate and its unit: bits per second (``b/s``) or keys per second (``keys/s``)."""

    value: float
    unit: str = BPS

    def __str__(self) -> str:
        v = self.value
        if self.unit != BPS:
            return f"{v:,.0f} {self.unit}"
        if v >= 1e9:
            return f"{v / 1e9:.2f} Gb/s"
        if v >= 1e6:
            return f"{v / 1e6:.3g} Mb/s"
        return f"{v / 1e3:.3g} kb/s"


def gbps(value: float | None) -> Quantity | None:
    return None if value is None else Quantity(value * 1e9)


def mbps(value: float | None) -> Quantity | None:
    return None if value is None else Quantity(value * 1e6)


def ratio(ours: Quantity | None, other: Quantity | None) -> float | None:
    """ours / other, or None when either is missing, the units differ or other is 0."""
    if ours is None or other is None or ours.unit != other.unit or not other.value:
        return None
    return ours.value / other.value


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


@dataclass(frozen=True)
class Row:
    """One figure of the table. ``baseline`` is ours, measured in the same run the
    conventional way (``baseline_name``); ``paper_baseline`` the paper's own, if any.
    ``ceiling`` is the same work without our code in the way, measured in the same run
    (``ceiling_name``); ``target`` the least ours / ceiling should be. A row without a
    target is judged by ``floor_met`` (the bench's own criterion), if at all."""

    module: str
    figure: str = ""
    paper: Quantity | None = None
    ours: Quantity | None = None
    baseline: Quantity | None = None
    baseline_name: str = ""
    paper_baseline: Quantity | None = None
    floor_met: bool | None = None
    error: str | None = None
    ceiling: Quantity | None = None
    ceiling_name: str = ""
    target: float | None = None

    @property
    def ratio_vs_paper(self) -> float | None:
        return ratio(self.ours, self.paper)

    @property
    def ratio_vs_baseline(self) -> float | None:
        return ratio(self.ours, self.baseline)

    @property
    def ratio_vs_ceiling(self) -> float | None:
        return ratio(self.ours, self.ceiling)

    @property
    def met(self) -> bool | None:
        """The target met (None: no ceiling measured); without one, ``floor_met``."""
        if self.target is None:
            return self.floor_met
        r = self.ratio_vs_ceiling
        return None if r is None else r >= self.target

    def _with_name(self, q: Quantity | None, name: str, sep: str, extra: str = "") -> str:
        text = str(q) if q is not None else "-"
        inside = "; ".join(x for x in (name, extra) if x)
        return text + (f"{sep}({inside})" if inside else "")

    def target_cell(self) -> str:
        if self.target is None:
            return "-" if self.floor_met is None else ("met" if self.floor_met else "not met")
        verdict = {None: "no ceiling", True: "met", False: "not met"}[self.met]
        return f">= {self.target:.2f}x: {verdict}"

    def cells(self, sep: str = " ") -> tuple[str, ...]:
        """module, figure, paper, ours, x paper, conventional baseline, x baseline,
        ceiling, x ceiling, target; ``sep`` goes between a figure and what it is."""
        if self.error is not None:
            return (self.module, f"FAILED: {self.error}", *("-",) * (len(COLUMNS) - 2))
        base = "-"
        if self.baseline is not None or self.paper_baseline is not None:
            paper = f"paper {self.paper_baseline}" if self.paper_baseline else ""
            base = self._with_name(self.baseline, self.baseline_name, sep, paper)
        ceil = "-" if self.ceiling is None else self._with_name(self.ceiling,
                                                                self.ceiling_name, sep)
        return (self.module, self.figure, str(self.paper) if self.paper else "-",
                str(self.ours) if self.ours else "-", fmt_ratio(self.ratio_vs_paper), base,
                fmt_ratio(self.ratio_vs_baseline), ceil, fmt_ratio(self.ratio_vs_ceiling),
                self.target_cell())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(ratio_vs_paper=self.ratio_vs_paper, ratio_vs_baseline=self.ratio_vs_baseline,
                 ratio_vs_ceiling=self.ratio_vs_ceiling, target_met=self.met)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        def q(v: dict | None) -> Quantity | None:
            return None if v is None else Quantity(float(v["value"]), v.get("unit", BPS))

        return cls(module=d["module"], figure=d.get("figure", ""), paper=q(d.get("paper")),
                   ours=q(d.get("ours")), baseline=q(d.get("baseline")),
                   baseline_name=d.get("baseline_name", ""),
                   paper_baseline=q(d.get("paper_baseline")), floor_met=d.get("floor_met"),
                   error=d.get("error"), ceiling=q(d.get("ceiling")),
                   ceiling_name=d.get("ceiling_name", ""), target=d.get("target"))


COLUMNS = ("module", "figure", "paper", "ours", "x paper", "conventional baseline (same run)",
           "x baseline", "ceiling (same run)", "x ceiling", "target (x ceiling)")
# the rich table's narrower headers (the markdown has room for the long ones)
SHORT = ("module", "figure", "paper", "ours", "x paper", "baseline (same run)", "x base",
         "ceiling (same run)", "x ceil", "target")


# ---- rows per bench: the JSON fields each bench documents in bench/README.md ---------------

def lkm_rows(r: dict) -> list[Row]:
    return [Row("local key manager", "key into rings, 1 MiB blocks", mbps(r["paper_mbps"]),
                gbps(r["ours_gbps"]), gbps(r.get("baseline_gbps")), "4 KiB blocks",
                ceiling=gbps(r.get("ceiling_source_gbps")),
                ceiling_name="key source alone", target=TARGETS["lkm"]["ratio_vs_ceiling"])]


def otp_rows(r: dict) -> list[Row]:
    paper = r.get("paper", {})
    mtus = [p["mtu"] for p in r.get("points", []) if p.get("mode") == "proposed"]
    top = f"MTU {max(mtus)}" if mtus else "largest MTU"
    t = TARGETS["otp"]
    return [
        Row("OTP tunnel", f"direct, {top}", mbps(paper.get("direct_mbps", 185.0)),
            gbps(r["direct_gbps"]), gbps(r.get("baseline_gbps")),
            "per-packet removal, MTU 1500", mbps(paper.get("conventional_mbps", 3.92)),
            ceiling=gbps(r.get("ceiling_direct_gbps")), ceiling_name="bare underlay",
            target=t["ratio_direct_vs_ceiling"]),
        Row("OTP tunnel", f"via one relay, {top}", mbps(paper.get("relay_mbps", 123.0)),
            gbps(r["relay_gbps"]), gbps(r.get("baseline_relay_gbps")),
            "per-packet removal, MTU 1500", mbps(3.81),
            ceiling=gbps(r.get("ceiling_relay_gbps")),
            ceiling_name="bare underlay, kernel forwarding", target=t["ratio_relay_vs_ceiling"]),
    ]


def gkm_rows(r: dict) -> list[Row]:
    paper = r.get("paper", {}).get("mbps_at_1MB", 85.0)
    store = gbps(r.get("ceiling_store_gbps"))
    rows = [Row("global key manager", "1 MiB keys, direct", mbps(paper),
                gbps(r["direct_gbps_at_1MiB"]), gbps(r.get("baseline_gbps_at_1MiB")),
                "stop and wait", ceiling=store, ceiling_name="bare RocksDB store",
                target=TARGETS["gkm"]["ratio_vs_ceiling"])]
    if r.get("relay_gbps_at_1MiB") is not None:
        rows.append(Row("global key manager", "1 MiB keys, via one relay",
                        ours=gbps(r["relay_gbps_at_1MiB"]), ceiling=store,
                        ceiling_name="bare RocksDB store"))
    return rows


def api_rows(r: dict) -> list[Row]:
    paper = r.get("paper", {}).get("mbps_at_1MB", 971.0)
    t = TARGETS["api"]
    rows = []
    if r.get("gbps_at_1MiB") is not None:
        rows.append(Row("key API", "enc_keys, 1 MiB keys", mbps(paper), gbps(r["gbps_at_1MiB"]),
                        gbps(r.get("baseline_gbps_at_1MiB")), "new TLS connection per key",
                        ceiling=gbps(r.get("ceiling_gbps_at_1MiB")),
                        ceiling_name="bare Sanic endpoint", target=t["ratio_1MiB_vs_ceiling"]))
    small = next((p for p in r.get("points", []) if p.get("bits") == 256), None)
    if small is not None:
        ceil = small.get("ceiling_keys_per_s")
        rows.append(Row("key API", "enc_keys, 256-bit keys", None,
                        Quantity(small["keys_per_s"], KEYS),
                        Quantity(small["baseline_keys_per_s"], KEYS),
                        "new TLS connection per key",
                        ceiling=None if ceil is None else Quantity(ceil, KEYS),
                        ceiling_name="bare Sanic endpoint, one key a request",
                        target=t["ratio_256bit_vs_ceiling"]))
    return rows or [Row("key API", "no 1 MiB or 256-bit point in this run")]


def guard_rows(r: dict) -> list[Row]:
    rows = [Row("XDP guard", "iperf3 under a forged flood", None,
                gbps(r["flood_gbps_on"]), gbps(r["flood_gbps_off"]), "guard off",
                floor_met=r.get("guard_helps"))]
    if "ahead_gbps" in r:
        rows.append(Row("XDP guard", "iperf3 under a flood naming key ahead", None,
                        gbps(r["ahead_gbps"]), gbps(r["clean_gbps_on"]), "no flood",
                        floor_met=r.get("ahead_holds")))
    return rows


def relay_rows(r: dict) -> list[Row]:
    """The fewest and the most hops: the paper's claim is that relaying keeps the speed,
    so the baseline column holds the one-hop rate of the same run."""
    paper = mbps(r.get("paper", {}).get("mbps_at_1MB", 85.0))
    pts = sorted(r["points"], key=lambda p: p["hops"])
    one = next((p for p in pts if p["hops"] == 1), None)
    where = f" (ring of {r['nodes']})" if r.get("nodes") else ""
    if not pts:
        return [Row("global key relay", error="no hop count measured")]
    rows = []
    for p in [pts[0], pts[-1]] if len(pts) > 1 else pts:
        vs_one = one is not None and p is not one
        rows.append(Row("global key relay", f"1 MiB keys, {p['hops']} hop(s){where}", paper,
                        gbps(p["gbps"]), gbps(one["gbps"]) if vs_one else None,
                        "1 hop, same run" if vs_one else "",
                        floor_met=r.get("keeps_advantage") if p is pts[-1] else None))
    return rows


def etsi_rows(r: dict) -> list[Row]:
    """A link fed by ETSI 014 devices (no paper figure, no target: the devices' speed is
    theirs, the row shows how much of it the link gets)."""
    block = r["block_bytes"]
    size = f"{block >> 10} KiB" if block >= 1024 else f"{block} B"
    return [Row("ETSI 014 source", f"key into rings, {size} blocks of {r['keys_per_call']} "
                                   f"x {r['key_size']}-bit keys",
                None, mbps(r["ours_mbps"]), mbps(r.get("baseline_mbps")),
                "one call per block", ceiling=mbps(r.get("ceiling_devices_mbps")),
                ceiling_name="the two devices alone")]


def keyrate_rows(r: dict) -> list[Row]:
    """Global key fill per QKD key rate: the ceiling is the key the direction gets (a fill
    cannot exceed it); the baseline, at its one rate, the conventional dataplane's fill;
    each row is judged by its own floor (efficiency, the fill at 1 Mb/s, idle spend)."""
    floor = r.get("floor", {})
    base = r.get("baseline") or {}
    rows = []
    for p in sorted(r.get("points", []), key=lambda p: p["rate_mbps"]):
        rate = p["rate_mbps"]
        eff, idle = p.get("efficiency"), p.get("idle_burn_kbps")
        met = idle is not None and idle <= floor.get("idle_burn_kbps", float("inf"))
        if rate in (10.0, 100.0):
            met = met and eff is not None and eff >= floor.get(
                f"efficiency_at_{rate:g}mbps", 0.0)
        if rate == 1.0:
            met = met and p["fill_mbps"] >= floor.get("fill_mbps_at_1mbps", 0.0)
        same = base.get("rate_mbps") == rate
        spread = p.get("efficiency_spread")
        rows.append(Row("key economy", f"global key fill, {rate:g} Mb/s links (efficiency "
                                       f"{eff or 0:.3f}"
                                       + (f" ±{spread:.3f}" if spread else "")
                                       + f", idle {idle or 0:.1f} kb/s/link)",
                        None, mbps(p["fill_mbps"]), mbps(base["fill_mbps"]) if same else None,
                        "conventional dataplane" if same else "", floor_met=met,
                        ceiling=mbps(p.get("ceiling_mbps")),
                        ceiling_name="the direction's key"))
    return rows or [Row("key economy", error="no key rate measured")]


def generic_rows(module: str) -> Callable[[dict], list[Row]]:
    """Rows for a bench without its own: the common field names (``paper_mbps``,
    ``ours_gbps``, ``baseline_gbps``, ``ceiling_gbps``, ``meets_floor``) where it has
    them."""

    def rows(r: dict) -> list[Row]:
        ours = next((r[k] for k in ("ours_gbps", "gbps", "direct_gbps") if k in r), None)
        return [Row(module, r.get("figure", "see the JSON"), mbps(r.get("paper_mbps")),
                    gbps(ours), gbps(r.get("baseline_gbps")), r.get("baseline_name", ""),
                    floor_met=r.get("meets_floor"), ceiling=gbps(r.get("ceiling_gbps")),
                    ceiling_name=r.get("ceiling_name", ""))]

    return rows


def rows_of(module: str, result: dict | None, error: str | None,
            rows: Callable[[dict], list[Row]]) -> list[Row]:
    """A bench's rows; a failed bench (or one whose result lacks a field) is one row
    saying why, so the table always has every bench."""
    if error is not None or result is None:
        return [Row(module, error=error or "no result")]
    try:
        return rows(result)
    except (KeyError, TypeError, ValueError) as e:
        return [Row(module, error=f"result unreadable ({type(e).__name__}: {e})")]


CALIBRATION = (("memcpy_gbps", "memory copy"), ("poly1305_gbps", "Poly1305"),
               ("xor_gbps", "XOR"), ("veth_tcp_gbps", "veth TCP"))


def calibration_line(cal: dict | None) -> str:
    """The machine's calibration of the run in one line (the figures, in the order of
    ``CALIBRATION``; a step that failed says so)."""
    if not cal:
        return "no calibration in this run"
    parts = []
    for key, name in CALIBRATION:
        v = cal.get(key)
        if v is None:
            parts.append(f"{name} failed" if key in cal.get("errors", {}) else f"{name} -")
        else:
            extra = f" ({cal['poly1305_backend']})" if key == "poly1305_gbps" and \
                cal.get("poly1305_backend") else ""
            parts.append(f"{name} {gbps(v)}{extra}")
    load = cal.get("load_before")
    return ", ".join(parts) + (f"; load average {load[0]:.1f}" if load else "")


def markdown_table(rows: list[Row]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def rich_table(rows: list[Row], title: str):
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title)
    for c in SHORT:
        t.add_column(c, justify="right" if c.startswith("x ") else "left",
                     no_wrap=c in ("paper", "ours", "x paper", "x base", "x ceil"))
    for r in rows:
        cells = [Text(c) for c in r.cells(sep="\n")]
        if r.error is not None:
            cells[1].stylize("red")
        elif r.met is False:
            cells[-1].stylize("red")
        t.add_row(*cells)
    return t
