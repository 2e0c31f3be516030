"""`qkdctl bench all`: every benchmark of issues 1/6 to 6/6 in one run, one table against
the paper and each bench's ceiling measured in the same run, the raw results as one JSON
and the plots, with a progress bar. A short calibration of the machine (``bench.calibrate``)
runs first and is kept in the JSON, so runs on two machines can be compared.

The benches are the registry ``REGISTRY``: one ``Bench`` entry each (its ``run`` named as
"module:function", imported when it runs; its settings for a full and a quick run; the
rows it gives the table). A bench that fails is one row saying why and the others still
run; Ctrl-C stops the running bench, which removes its network (a second Ctrl-C is
ignored while it does), and nothing after it runs.

While a bench runs, its own console output goes to a log file beside the JSON; the
progress bar shows its latest line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench.summary import (
    Row,
    api_rows,
    calibration_line,
    etsi_rows,
    generic_rows,
    gkm_rows,
    guard_rows,
    keyrate_rows,
    lkm_rows,
    otp_rows,
    relay_rows,
    rich_table,
    rows_of,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"


@dataclass(frozen=True)
class Bench:
    """One benchmark of the run. ``target`` is "module:function", a ``run(**settings,
    console=...)`` returning the bench's result dict; ``plot`` names its PNG (without
    ``.png``), passed as ``plot_path`` in the results directory; ``estimate_s`` (full,
    quick) weighs it in the overall progress bar."""

    name: str
    module: str
    target: str
    rows: Callable[[dict], list[Row]] | None = None
    full: Mapping[str, Any] = field(default_factory=dict)
    quick: Mapping[str, Any] = field(default_factory=dict)
    plot: str | None = None
    estimate_s: tuple[float, float] = (60.0, 20.0)

    def settings(self, quick: bool, out_dir: Path, suffix: str = "") -> dict[str, Any]:
        kw = dict(self.quick if quick else self.full)
        if self.plot:
            kw["plot_path"] = out_dir / f"{self.plot}{suffix}.png"
        return kw

    def table_rows(self, result: dict | None, error: str | None) -> list[Row]:
        return rows_of(self.module, result, error, self.rows or generic_rows(self.module))


MIB = 1 << 20
# Full: about 17 minutes on the 2-core VM, by the quick run's timings, the ceilings
# included (the single commands' defaults take longer: one MTU fewer and 1 s iperf3 runs
# for the OTP tunnel, fewer keys per key API pull, a smaller store for the global key
# manager). Quick (6 minutes on the VM under load): two points per sweep, one short run
# each; a smoke test, not a figure. ``estimate_s`` (full, quick) only weighs the overall
# progress bar.
REGISTRY: tuple[Bench, ...] = (
    Bench("lkm", "local key manager", "bench.lkm:run", lkm_rows,
          full={"seconds": 10.0}, quick={"seconds": 3.0}, estimate_s=(45, 20)),
    Bench("etsi", "ETSI 014 source", "bench.etsi:run", etsi_rows,
          full={"seconds": 8.0, "repeat": 3}, quick={"seconds": 3.0, "repeat": 1},
          estimate_s=(100, 35)),
    Bench("otp", "OTP tunnel", "bench.otp:run", otp_rows,
          full={"mtus": (1500, 9000, 32000, 65449), "repeat": 3, "seconds": 1.0},
          quick={"mtus": (1500, 65449), "repeat": 1, "seconds": 1.0},
          plot="otp-mtu", estimate_s=(280, 115)),
    Bench("gkm", "global key manager", "bench.gkm:run", gkm_rows,
          full={"store": 128 * MIB, "repeat": 3},
          quick={"sizes": (16 << 10, MIB), "store": 64 * MIB, "repeat": 1},
          plot="gkm-size", estimate_s=(175, 50)),
    Bench("api", "key API", "bench.api:run", api_rows,
          full={"keys": 8192, "store_max": 1 << 30, "repeat": 3, "baseline_s": 2.0,
                "ceiling_s": 2.0},
          quick={"sizes": (256, 8 * MIB), "keys": 2048, "store_max": 256 * MIB, "repeat": 1,
                 "baseline_s": 1.0, "ceiling_s": 1.0},
          plot="api-size", estimate_s=(210, 45)),
    Bench("guard", "XDP guard", "bench.guard:run", guard_rows,
          full={"repeat": 3, "seconds": 1.0}, quick={"repeat": 1, "seconds": 1.0},
          estimate_s=(75, 35)),
    Bench("relay", "global key relay", "bench.relay:run", relay_rows,
          quick={"hops": (1, 8), "repeat": 1}, plot="relay-hops", estimate_s=(130, 80)),
    Bench("keyrate", "key economy", "bench.keyrate:run", keyrate_rows,
          full={"rates": (1.0, 10.0, 100.0, 1000.0), "baseline_rate": 10.0},
          quick={"rates": (10.0, 1000.0), "baseline_rate": None},
          plot="keyrate", estimate_s=(330, 110)),
)


def select(names: list[str] | None, registry: tuple[Bench, ...] = REGISTRY) -> list[Bench]:
    """The benches named (in the registry's order), or all; an unknown name is refused."""
    if not names:
        return list(registry)
    known = {b.name for b in registry}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown bench(es) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return [b for b in registry if b.name in names]


def load(target: str) -> Callable[..., dict]:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


@dataclass
class Outcome:
    bench: Bench
    settings: dict[str, Any]
    seconds: float = 0.0
    result: dict | None = None
    error: str | None = None
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"module": self.bench.module, "ok": self.ok, "seconds": round(self.seconds, 1),
                "settings": {k: (list(v) if isinstance(v, tuple) else v)
                             for k, v in self.settings.items()},
                "error": self.error, "interrupted": self.interrupted, "result": self.result}


# ---- the machine --------------------------------------------------------------------------

def parse_machine(cpuinfo: str, meminfo: str, os_release: str) -> dict[str, Any]:
    """CPU model, memory and OS name from /proc/cpuinfo, /proc/meminfo, /etc/os-release."""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.lower().startswith(("model name", "cpu model", "hardware"))), None)
    mem = next((int(ln.split()[1]) * 1024 for ln in meminfo.splitlines()
                if ln.startswith("MemTotal:")), None)
    os_name = next((ln.split("=", 1)[1].strip().strip('"') for ln in os_release.splitlines()
                    if ln.startswith("PRETTY_NAME=")), None)
    return {"cpu_model": model, "memory_bytes": mem, "os": os_name}


def machine() -> dict[str, Any]:
    def read(p: str) -> str:
        try:
            return Path(p).read_text()
        except OSError:
            return ""

    m = parse_machine(read("/proc/cpuinfo"), read("/proc/meminfo"), read("/etc/os-release"))
    m.update(cores=os.cpu_count(), kernel=platform.release(), host=platform.node(),
             python=platform.python_version(), load_before=os.getloadavg())
    return m


# ---- running ------------------------------------------------------------------------------

class _Sink:
    """The file a bench's console writes to: every line goes to the log, the latest one
    to the progress bar."""

    def __init__(self, log: IO[str] | None, on_line: Callable[[str], None]):
        self.log, self.on_line, self.buf = log, on_line, ""

    def write(self, s: str) -> int:
        if self.log is not None:
            self.log.write(s)
        self.buf += s
        *lines, self.buf = self.buf.split("\n")
        for ln in reversed(lines):
            if ln.strip():
                self.on_line(ln.strip())
                break
        return len(s)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _interrupt_once(console: Console) -> Iterator[None]:
    """The first Ctrl-C raises KeyboardInterrupt in the running bench; later ones are
    ignored so that its teardown (in its ``finally``) runs to the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum, frame) -> None:
        nonlocal hits
        hits += 1
        if hits == 1:
            raise KeyboardInterrupt
        console.print("[yellow]stopping: the running bench is removing its network[/yellow]")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def leftover_networks(manifests: list[tuple[str, str, float]], since: float,
                      run_root: Path) -> list[str]:
    """Of (prefix, config path, created) networks, those a bench made since ``since``: its
    config is ``<run root>/bench-<prefix>.toml``, which a bench removes on teardown."""
    return [p for p, cfg, created in manifests
            if created >= since and Path(cfg) == run_root / f"bench-{p}.toml"]


def _remove_leftovers(since: float) -> list[str]:
    """After an interrupt: networks a bench made and did not get to remove."""
    from control.core import paths
    from control.tools import emulation

    mans = [(p, m.config, m.created) for p in emulation.known_prefixes()
            if (m := emulation.Manifest.load(p)) is not None]
    gone = leftover_networks(mans, since, paths.RUN_ROOT)
    for p in gone:
        emulation.net_down(p)
        (paths.RUN_ROOT / f"bench-{p}.toml").unlink(missing_ok=True)
    return gone


def run_one(bench: Bench, settings: dict[str, Any], console: Console,
            loader: Callable[[str], Callable[..., dict]] = load) -> Outcome:
    """Run one bench; its failure (any exception) or an interrupt becomes the outcome."""
    out = Outcome(bench, settings)
    t0 = time.monotonic()
    try:
        out.result = loader(bench.target)(**settings, console=console)
    except KeyboardInterrupt:
        out.error, out.interrupted = "interrupted (Ctrl-C)", True
    except Exception as e:  # noqa: BLE001 - any failure is this bench's, reported in the table
        out.error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
    out.seconds = time.monotonic() - t0
    return out


def run_all(benches: list[Bench], *, quick: bool, out_dir: Path, console: Console,
            log: IO[str] | None = None, suffix: str = "",
            loader: Callable[[str], Callable[..., dict]] = load,
            cleanup: Callable[[float], list[str]] | None = _remove_leftovers) -> list[Outcome]:
    """Each bench in turn under a progress bar on ``console``; stops after an interrupt."""
    weights = [b.estimate_s[1 if quick else 0] for b in benches]
    outcomes: list[Outcome] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
               TaskProgressColumn(), TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=console, transient=False) as bar, \
            _interrupt_once(console):
        overall = bar.add_task(f"bench all (0/{len(benches)})", total=sum(weights), note="")
        current = bar.add_task("", total=None, note="")
        stop = threading.Event()
        state = {"done": 0.0, "w": 0.0, "t0": time.monotonic()}

        def tick() -> None:  # the overall bar moves with time, at most to 95% of a bench
            while not stop.wait(0.5):
                el = time.monotonic() - state["t0"]
                bar.update(overall, completed=state["done"] + min(el, 0.95 * state["w"]))

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            for i, (b, w) in enumerate(zip(benches, weights, strict=True)):
                state.update(w=w, t0=time.monotonic())
                bar.reset(current, total=None, description=f"[bold]{b.name}[/bold] "
                          f"({b.module})", note="starting")
                bar.update(overall, description=f"bench all ({i}/{len(benches)})")
                if log is not None:
                    log.write(f"\n===== {b.name} ({b.module}) {dt.datetime.now():%H:%M:%S}\n")
                sink = _Sink(log, lambda ln: bar.update(current, note=ln[:70]))
                bench_console = Console(file=sink, width=120, color_system=None,
                                        force_terminal=False, force_interactive=False)
                started = time.time()
                o = run_one(b, b.settings(quick, out_dir, suffix), bench_console, loader)
                outcomes.append(o)
                if o.interrupted and cleanup is not None:
                    bar.update(current, note="removing what the bench left")
                    for p in cleanup(started):
                        console.print(f"  removed network {p}")
                state["done"] += w
                state["w"] = 0.0
                bar.update(overall, completed=state["done"])
                console.print(f"{b.name}: [green]done[/green] in {o.seconds:.0f} s" if o.ok
                              else f"{b.name}: [red]failed[/red] after {o.seconds:.0f} s: "
                                   f"{o.error}", highlight=False)
                if o.interrupted:
                    break
            bar.update(overall, description=f"bench all ({len(outcomes)}/{len(benches)})")
        finally:
            stop.set()
            ticker.join(2)
            bar.update(current, visible=False)
    return outcomes


def summary_rows(outcomes: list[Outcome]) -> list[Row]:
    return [r for o in outcomes for r in o.bench.table_rows(o.result, o.error)]


def report(outcomes: list[Outcome], *, quick: bool, started: dt.datetime, seconds: float,
           machine_info: dict, log_path: str | None = None,
           calibration: dict | None = None) -> dict:
    """The JSON of the run: when, where (the machine and its calibration), each bench's
    settings and full result, the table."""
    return {
        "bench": "all", "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "profile": "quick" if quick else "full", "machine": machine_info,
        "calibration": calibration,
        "ok": all(o.ok for o in outcomes),
        "interrupted": any(o.interrupted for o in outcomes), "log": log_path,
        "benches": {o.bench.name: o.to_dict() for o in outcomes},
        "summary": [r.to_dict() for r in summary_rows(outcomes)],
    }


def exit_code(outcomes: list[Outcome]) -> int:
    """0: every bench ran; 130: interrupted; 1: a bench failed."""
    if any(o.interrupted for o in outcomes):
        return 130
    return 0 if outcomes and all(o.ok for o in outcomes) else 1


def calibrate(console: Console) -> dict:
    from bench.calibrate import run

    return run(console)


def main(*, quick: bool, out_dir: Path, only: list[str] | None, record: bool,
         as_json: bool, out: Console, err: Console, results_md: Path = RESULTS_MD,
         registry: tuple[Bench, ...] = REGISTRY,
         loader: Callable[[str], Callable[..., dict]] = load,
         calibration: Callable[[Console], dict] = calibrate) -> int:
    """`qkdctl bench all`: calibrate, run, print the table (or the JSON), write the
    results."""
    benches = select(only, registry)  # refused before anything runs
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now()
    stem = started.date().isoformat() + ("-quick" if quick else "")
    json_path, log_path = out_dir / f"{stem}.json", out_dir / f"{stem}.log"
    info = machine()
    ui = err if as_json else out
    ui.print(f"[bold]bench all[/bold] ({'quick' if quick else 'full'}): "
             f"{', '.join(b.name for b in benches)}; {info['cores']} cores, load "
             f"{info['load_before'][0]:.1f}; bench output in {log_path}", highlight=False)
    t0 = time.monotonic()
    try:
        with _interrupt_once(ui):  # its scratch namespaces go in its own finally
            cal = calibration(ui)
    except KeyboardInterrupt:
        ui.print("[yellow]interrupted while calibrating: nothing written[/yellow]")
        return 130
    ui.print(f"calibration ({cal.get('seconds', 0):.0f} s): {calibration_line(cal)}",
             highlight=False)
    with open(log_path, "w") as log:
        outcomes = run_all(benches, quick=quick, out_dir=out_dir, console=ui, log=log,
                           suffix="-quick" if quick else "", loader=loader)
    data = report(outcomes, quick=quick, started=started, seconds=time.monotonic() - t0,
                  machine_info=info, log_path=str(log_path), calibration=cal)
    interrupted = data["interrupted"]
    if not interrupted:  # a partial run would replace a whole one of the same day
        json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    title = (f"qkdnet against the paper ({data['date']}, {'quick' if quick else 'full'} "
             f"run, {data['seconds'] / 60:.1f} min)")
    ui.print(rich_table(summary_rows(outcomes), title))
    ui.print(f"machine calibration, same run: {calibration_line(cal)}", highlight=False)
    if interrupted:
        ui.print("[yellow]interrupted: nothing written[/yellow]")
    else:
        ui.print(f"results: {json_path}", highlight=False)
        if record:
            from bench.record import record as write_record

            for f in write_record(json_path, results_md, results_md.parent.parent / "README.md"):
                ui.print(f"latest table written to {f}", highlight=False)
    if as_json:
        print(json.dumps(data, default=str))
    return exit_code(outcomes)
