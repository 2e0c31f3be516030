"""qkdctl: start, stop, inspect and benchmark qkdnet nodes and emulated networks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from control.core import paths
from control.core.config import ConfigError, Topology, load_topology
from control.tools import emulation

app = typer.Typer(help="qkdnet: key management for QKD networks.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
net_app = typer.Typer(help="Emulated networks in network namespaces.", no_args_is_help=True)
node_app = typer.Typer(help="Run a key management node.", no_args_is_help=True)
emu_app = typer.Typer(help="QKD link emulator.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks against the paper's figures.", no_args_is_help=True)
pki_app = typer.Typer(help="Certificates for the key API's mutual TLS.", no_args_is_help=True)
keys_app = typer.Typer(help="Keys of the global key managers' relay (CurveZMQ).",
                       no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"qkdctl (qkdnet) {version('qkdnet')}")
        raise typer.Exit()


@app.callback()
def _main(show_version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="print the version (the installed package's) and exit")] = False) -> None:
    """qkdnet: key management for QKD networks."""


app.add_typer(net_app, name="net")
app.add_typer(node_app, name="node")
app.add_typer(emu_app, name="emulator")
app.add_typer(bench_app, name="bench")
app.add_typer(pki_app, name="pki")
app.add_typer(keys_app, name="keys")



@bench_app.callback()
def _bench_signals() -> None:
    """A benchmark stopped by SIGTERM, or by SIGINT when started in the background (where
    the shell ignores it), unwinds like Ctrl-C: its network is taken down, nothing left."""
    main = os.getpid()

    def stop(signum: int, _frame: object) -> None:
        if os.getpid() != main:  # a forked helper (pyroute2's namespace child, ...):
            signal.signal(signum, signal.SIG_DFL)  # the signal does what it always did
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


out = Console()
if not out.is_terminal and not os.environ.get("COLUMNS", "").isdigit():  # logs and
    out = Console(width=160)  # pipes: keep tables whole rather than 80 columns wide
err = Console(stderr=True)
if not err.is_terminal:  # logs and pipes: a message (and the command it suggests) stays on
    err = Console(stderr=True, soft_wrap=True,  # one line; tables as wide as stdout's
                  width=None if os.environ.get("COLUMNS", "").isdigit() else 160)


def say(*objects: object, **kw: object) -> None:
    """A message on stdout: one line however narrow the console (a path or a command in
    it stays whole for whoever copies or greps it); tables go through ``out.print``."""
    kw.setdefault("soft_wrap", True)
    kw.setdefault("highlight", False)
    out.print(*objects, **kw)  # type: ignore[arg-type]


def _fail(message: object, code: int = 1) -> NoReturn:
    """Say why in red and exit with ``code``. The text is not ours to style (it may hold
    brackets rich would take for markup), so it is escaped."""
    err.print(f"[red]{escape(str(message))}[/red]", highlight=False)
    raise typer.Exit(code)


def _os_error(e: OSError, doing: str) -> str:
    """One line for an OS error of an ordinary mistake (a path that is a file, a parent
    that does not exist, no permission): what was being done, the path, and why."""
    import errno

    path = e.filename or "?"
    why = (e.strerror or str(e)).lower()
    if e.errno == errno.EEXIST and not Path(path).is_dir():
        why = "it exists and is not a directory"
    return f"{doing}: {path}: {why}"


@contextlib.contextmanager
def _writing(doing: str) -> Iterator[None]:
    """An OS error while writing files: one clear line and exit status 1 (a refusal of
    our own, NotPrivateError, says why itself and goes to the caller)."""
    from dataplane.private import NotPrivateError

    try:
        yield
    except NotPrivateError:
        raise
    except OSError as e:
        _fail(_os_error(e, doing))


ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="topology TOML file")]


def _check_prefix(value: str | None) -> str | None:
    """A --prefix is a network prefix, never a path (net down removes its directory)."""
    from control.core.paths import check_prefix

    if value is None:
        return None
    try:
        return check_prefix(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


PrefixOpt = Annotated[str | None, typer.Option(help="network prefix", callback=_check_prefix)]


def load(config: Path) -> Topology:
    try:
        return load_topology(config)
    except ConfigError as e:
        err.print(f"[red]configuration refused[/red] ({len(e.problems)} problem(s)); "
                  "nothing was started:", highlight=False)
        for field, msg in e.problems:
            err.print(f"  {e.path}: {field + ': ' if field else ''}{msg}", highlight=False,
                      markup=False)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def _state_readable() -> Iterator[None]:
    """A network's state is its user's alone (0700 directories): say so, not a traceback,
    to anyone else who asks."""
    try:
        yield
    except PermissionError as e:
        err.print(f"[red]cannot read {e.filename}[/red]: a network's state is readable by "
                  f"its user alone; run this as root (or as that user)", highlight=False)
        raise typer.Exit(1) from None


def need_root() -> None:
    import os

    if os.geteuid() != 0:
        err.print("[red]this needs root[/red] (network namespaces, veth and /run/netns)")
        raise typer.Exit(1)


# ---- config ------------------------------------------------------------------------------

@app.command("check")
def check(config: Annotated[Path | None, typer.Argument(help="topology TOML file")] = None,
          reference: Annotated[bool, typer.Option(
              "--reference", help="print the topology file reference (Markdown)")] = False,
          ) -> None:
    """Validate a topology file and summarise it (or print the file format's reference)."""
    if reference:
        from control.tools.config_doc import reference as ref

        print(ref(), end="")
        return
    if config is None:
        err.print("[red]give a topology file[/red] (or --reference)")
        raise typer.Exit(2)
    topo = load(config)
    say(f"{config}: ok — network {topo.name!r}, prefix {topo.prefix!r}, "
              f"{len(topo.nodes)} nodes, {len(topo.links)} links, {len(topo.saes)} SAEs")


# ---- net ---------------------------------------------------------------------------------

@net_app.command("up")
def net_up(config: Annotated[Path, typer.Argument(help="topology TOML file")],
           start: Annotated[bool, typer.Option(help="start emulators and nodes")] = True
           ) -> None:
    """Create one namespace per node and a veth underlay per link, then start everything."""
    need_root()
    topo = load(config)
    try:
        man = emulation.net_up(topo, start=start)
    except emulation.NetError as e:
        _fail(e)
    say(f"network {topo.name!r} up with prefix {topo.prefix!r}: "
              f"{len(man.namespaces)} namespaces, {len(topo.links)} links"
              + (f", {len(man.pids)} processes; logs in {paths.log_dir(topo.prefix)} "
                 f"('net down' removes them; 'net down --keep-logs DIR' keeps a copy)"
                 if start else ""), highlight=False)


@net_app.command("down")
def net_down(config: Annotated[Path | None, typer.Argument(help="topology TOML file")] = None,
             prefix: PrefixOpt = None,
             all_: Annotated[bool, typer.Option("--all", help="every qkdnet network")] = False,
             keep_logs: Annotated[Path | None, typer.Option(
                 "--keep-logs", help="first copy the logs to DIR/<prefix> (mode 0700)",
                 metavar="DIR")] = None
             ) -> None:
    """Stop and remove everything a network made (also after a crashed run), its logs
    too unless --keep-logs."""
    need_root()
    if all_:
        prefixes = emulation.known_prefixes()
    elif prefix:
        prefixes = [prefix]
    elif config:
        prefixes = [load(config).prefix]
    else:
        err.print("name the network: a topology file, --prefix P or --all")
        raise typer.Exit(2)
    failed = False
    for p in prefixes:
        logs = paths.log_dir(p)
        had_logs = logs.is_dir()
        try:
            removed = emulation.net_down(p, keep_logs)
        except emulation.NetError as e:
            err.print(f"[red]{escape(f'{p}: {e}')}[/red]", highlight=False)
            failed = True
            continue
        kept = [r.removeprefix("logs kept in ") for r in removed
                if r.startswith("logs kept in ")]
        gone = len(removed) - len(kept)
        say(f"{p}: removed {gone} object(s)" if gone else f"{p}: nothing left",
                  highlight=False)
        if kept:
            say(f"{p}: its logs ({logs}) are kept in {kept[0]}", highlight=False)
        elif had_logs:
            say(f"{p}: its logs, in {logs}, went with it ('net down --keep-logs DIR' "
                      f"keeps a copy)", highlight=False)
    if failed:
        raise typer.Exit(1)


@net_app.command("status")
def net_status(prefix: PrefixOpt = None) -> None:
    """List emulated networks and what of them exists."""
    with _state_readable():
        _net_status(prefix)


def _net_status(prefix: str | None) -> None:
    prefixes = [prefix] if prefix else emulation.known_prefixes()
    if not prefixes:
        say("no qkdnet networks")
    for p in prefixes:
        st = emulation.net_status(p)
        if st["config"] is None and not st["rings"]:  # (net down leaves nothing)
            _fail(f"{p}: not up (no network with this prefix; qkdctl net status lists "
                  f"those that are)")
        ns = ", ".join(f"{k}{'' if v else ' (missing)'}" for k, v in st["namespaces"].items())
        procs = ", ".join(f"{k}{'' if v else ' (dead)'}" for k, v in st["processes"].items())
        origin = f"from {st['config']}" if st["config"] else "(no manifest: net down removes it)"
        say(f"[bold]{p}[/bold] {escape(origin)}\n  namespaces: {ns or '-'}\n"
                  f"  processes: {procs or '-'}\n  rings: {st['rings']}", highlight=False)


# ---- node and emulator -------------------------------------------------------------------

@node_app.command("run")
def node_run(config: ConfigOpt, node: Annotated[str, typer.Option(help="node name")],
             netns: Annotated[str | None, typer.Option(help="enter this namespace first")] = None,
             state_dir: Annotated[Path | None, typer.Option(help="durable state")] = None
             ) -> None:
    """Run a node's modules; restart crashed ones; stop on SIGTERM/SIGINT."""
    from control.core.logs import setup_logging
    from control.node.supervisor import run_node

    topo = load(config)
    if node not in topo.nodes:
        err.print(f"[red]no node named {node!r}[/red] in {config} "
                  f"(known: {', '.join(topo.nodes)})")
        raise typer.Exit(2)
    os.environ["QKDNET_NODE"] = node  # every module's log lines name the node
    setup_logging()
    run_node(config, node, state_dir, netns)


def _key_rate(value: float | None) -> float | None:
    """A key rate given on the command line is one a topology file may hold: 0 (as fast as
    possible) up to the most; a negative one used to run unthrottled, as 0 does."""
    from control.core.config import MAX_KEY_RATE_MBPS

    if value is not None and not 0 <= value <= MAX_KEY_RATE_MBPS:  # (NaN too)
        raise typer.BadParameter(f"{value:g} is not a key rate: give 0 (as fast as "
                                 f"possible) to {MAX_KEY_RATE_MBPS:,.0f} Mb/s")
    return value


@emu_app.command("run")
def emulator_run(config: ConfigOpt, link: Annotated[str, typer.Option(help="link name")],
                 rate_mbps: Annotated[float | None, typer.Option(
                     help="override key rate, Mb/s; 0 = as fast as possible",
                     callback=_key_rate)] = None
                 ) -> None:
    """Run the QKD link emulator of one link (Unix sockets under the network's run dir)."""
    from control.core.logs import setup_logging
    from control.lkm.emulator import run_emulator
    from dataplane.private import set_private_umask

    topo = load(config)
    try:
        lk = topo.link(link)
    except ConfigError:
        _fail(f"no link named {link!r} in {config} (links: "
              f"{', '.join(lk.name for lk in topo.links)})", 2)
    if lk.source.kind != "emulator":
        err.print(f"[red]link {lk.name} takes its key from {lk.source.kind!r}, "
                  f"not from the emulator[/red]")
        raise typer.Exit(2)
    os.environ["QKDNET_NODE"] = f"emulator {lk.name}"
    set_private_umask()  # its sockets hand out key: its owner's alone
    setup_logging()
    socks = (paths.emulator_socket(topo.prefix, lk.name, lk.a),
             paths.emulator_socket(topo.prefix, lk.name, lk.b))
    rate = lk.key_rate_mbps if rate_mbps is None else rate_mbps
    run_emulator(socks, rate, lk.block_size, lk.source.generator)


# ---- pki ----------------------------------------------------------------------------------

@pki_app.command("init")
def pki_init(directory: Annotated[Path, typer.Argument(help="where to write the PKI")],
             config: ConfigOpt,
             ca_dir: Annotated[Path | None, typer.Option(
                 help="where the CA key goes (no node reads it; default DIR-ca beside DIR)"
             )] = None,
             force: Annotated[bool, typer.Option(
                 help="replace an existing CA and every certificate; narrow the modes of "
                      "what is there (directories 0700, keys 0600)")] = False
             ) -> None:
    """A CA, a server certificate per node, a client certificate per SAE (CN = SAE ID)."""
    from api.pki import PkiError, init_pki

    topo = load(config)
    try:
        with _writing("cannot write the PKI"):
            lay = init_pki(directory, topo, force=force, ca_dir=ca_dir)
    except PkiError as e:
        _fail(e)
    say(f"{lay.root}: CA {lay.ca_cert.name}; {len(topo.nodes)} node certificate(s) in "
              f"nodes/, {len(topo.saes)} SAE certificate(s) in saes/ (keys mode 0600); "
              f"the CA key in {lay.ca_key} (no node needs it: keep it offline)",
              highlight=False)


@pki_app.command("issue")
def pki_issue(directory: Annotated[Path, typer.Argument(help="the PKI made by 'pki init'")],
              config: ConfigOpt,
              ca_dir: Annotated[Path | None, typer.Option(
                  help="where the CA key is (default DIR-ca beside DIR)")] = None
              ) -> None:
    """Certificates for the nodes and SAEs that lack one, under the existing CA; every
    certificate and key already there is left as it is."""
    from api.pki import PkiError, issue_missing

    topo = load(config)
    try:
        nodes, saes = issue_missing(directory, topo, ca_dir=ca_dir)
    except PkiError as e:
        _fail(e)
    kept = len(topo.nodes) + len(topo.saes) - len(nodes) - len(saes)
    new = [f"node {n}" for n in nodes] + [f"SAE {s}" for s in saes]
    say(f"{directory}: new certificates for {', '.join(new) or 'nothing (none missing)'}"
              f"; {kept} kept as they were (keys mode 0600)", highlight=False, soft_wrap=True)


# ---- relay keys ----------------------------------------------------------------------------

@keys_app.command("init")
def keys_init(directory: Annotated[Path, typer.Argument(help="where to write the keys")],
              config: ConfigOpt,
              force: Annotated[bool, typer.Option(
                  help="replace the keys of every node, not only the missing ones")] = False
              ) -> None:
    """A CURVE keypair per node that keeps global key: <node>.key_secret (give it to that
    node alone) and <node>.key (its public key, for every node it exchanges key with)."""
    from control.gkm.relay_keys import RelayKeyError, write_relay_keys
    from dataplane.private import NotPrivateError

    topo = load(config)
    try:
        with _writing("cannot write the relay keys"):
            made = write_relay_keys(directory, topo.gkm.nodes(), force=force)
    except (RelayKeyError, NotPrivateError) as e:
        _fail(e)
    kept = len(topo.gkm.nodes()) - len(made)
    say(f"{directory}: new keys for {', '.join(made) or 'no node'}"
              f"{f', {kept} kept' if kept else ''} (mode 0600); give each node its own "
              f"<node>.key_secret and the others' <node>.key, and set \\[gkm] keys",
              highlight=False)


# ---- status ------------------------------------------------------------------------------

@app.command("status")
def status(config: Annotated[Path | None, typer.Argument(help="topology TOML file")] = None,
           prefix: PrefixOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False
           ) -> None:
    """Per link end: key, agreement, tunnel traffic, XDP guard and drops; routes per node.
    Exit status 0 when every node runs, 1 when one is down, 3 when none runs."""
    from control.node.status import EXIT_NOT_UP, collect, exit_status, render

    with _state_readable():
        snaps = [collect(t) for t in _topologies(config, prefix, EXIT_NOT_UP)]
    if as_json:
        print(json.dumps(snaps[0] if len(snaps) == 1 else snaps, indent=1))
    else:
        for s in snaps:
            out.print(render(s))
    raise typer.Exit(max(exit_status(s) for s in snaps))


def _topologies(config: Path | None, prefix: str | None, not_up: int = 1) -> list[Topology]:
    """The topology given, or those of the running networks (one with --prefix); exit
    status ``not_up`` when there is none."""
    if config is not None:
        return [load(config)]
    prefixes = [prefix] if prefix else emulation.known_prefixes()
    mans = [m for m in (emulation.Manifest.load(p) for p in prefixes) if m]
    if not mans:
        _fail(f"no network with prefix {prefix!r} is up (qkdctl net status lists those "
              f"that are)" if prefix else
              "no network is up here: give a topology file or --prefix", not_up)
    return [load(Path(m.config)) for m in mans]


@app.command("stats")
def stats(config: Annotated[Path | None, typer.Argument(help="topology TOML file")] = None,
          prefix: PrefixOpt = None,
          watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh until Ctrl-C")
                           ] = False,
          interval: Annotated[float, typer.Option(min=0.2, help="seconds between refreshes")
                              ] = 1.0,
          as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False
          ) -> None:
    """Per link end, interface and reason: packets and bytes the XDP guard dropped or
    passed (from its BPF maps), and the OTP workers' own counters."""
    import signal
    import threading

    from rich.console import Group
    from rich.live import Live

    from control.tools.stats import collect, rates, render

    need_root()  # the guard's maps are opened by id: CAP_BPF
    topos = _topologies(config, prefix)
    snaps = [collect(t) for t in topos]
    if as_json:
        print(json.dumps(snaps[0] if len(snaps) == 1 else snaps, indent=1))
        return
    if not watch:
        for s in snaps:
            out.print(render(s))
        return
    # Ctrl-C (or SIGTERM) sets a flag the loop checks between refreshes, rather than
    # raising KeyboardInterrupt wherever the interpreter happens to be (inside rich's
    # rendering or a map read), so the end is always the same clean one.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Live(Group(*(render(s) for s in snaps)), console=out, auto_refresh=False) as live:
        err.print(f"refreshing every {interval:g} s; Ctrl-C to stop", highlight=False)
        while not stop.wait(interval):
            new = [collect(t) for t in topos]
            live.update(Group(*(render(n, rates(o, n))
                                for o, n in zip(snaps, new, strict=True))), refresh=True)
            snaps = new


# ---- bench and demo ----------------------------------------------------------------------

def _bench(run, **kwargs) -> dict:
    """Run a benchmark; its own failures become one clear line and exit status 1 (the
    benchmark has removed its network by then)."""
    from bench.harness import BenchError

    try:
        return run(**kwargs)
    except BenchError as e:
        err.print(f"[red]benchmark failed:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from None


def _bench_and_report(run, report, as_json: bool, verdict: str | None = None,
                      **kwargs) -> None:
    """A bench with its own report: JSON on stdout, or the report; exit status 1 when
    ``verdict`` names a result field that is false."""
    result = _bench(run, console=err if as_json else out, **kwargs)
    if as_json:
        print(json.dumps(result))
    else:
        report(result, out)
    if verdict is not None and not result[verdict]:
        raise typer.Exit(1)


@bench_app.command("lkm")
def bench_lkm(seconds: Annotated[float, typer.Option(help="measuring time")] = 10.0,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Local key manager: sustained key processing per link, emulator unthrottled."""
    need_root()
    from bench.lkm import run

    result = run(seconds=seconds, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("etsi")
def bench_etsi(seconds: Annotated[float, typer.Option(help="measuring time per run")] = 8.0,
               repeat: Annotated[int, typer.Option(min=1, help="runs per mode")] = 3,
               keys: Annotated[int, typer.Option(help="keys per block")] = 32,
               bits: Annotated[int, typer.Option(help="bits per key")] = 256,
               as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A link fed by ETSI GS QKD 014 devices (qkdnet's key API stands in for them)."""
    need_root()
    from bench.etsi import run

    result = run(seconds=seconds, repeat=repeat, keys=keys, bits=bits,
                 console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("otp")
def bench_otp(
    seconds: Annotated[float, typer.Option(help="iperf3 time per point")] = 1.5,
    mtu: Annotated[list[int] | None, typer.Option(help="MTUs to sweep (repeat the option)")]
    = None,
    workers: Annotated[int, typer.Option(help="workers per link end; 0 = cores")] = 0,
    repeat: Annotated[int, typer.Option(min=1, help="runs per point; the median counts")] = 3,
    streams: Annotated[int, typer.Option(min=1, help="parallel iperf3 TCP streams")] = 1,
    mode: Annotated[list[str] | None, typer.Option(help="proposed and/or conventional")] = None,
    ring: Annotated[str, typer.Option(help="ring capacity per link direction")] = "1GiB",
    plot: Annotated[Path, typer.Option(help="PNG plot of the sweep")] = Path(
        "bench/results/otp-mtu.png"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """OTP tunnel: iperf3 TCP through it, direct and via a relay, MTU sweep, both modes."""
    need_root()
    from bench.otp import DEFAULT_MTUS, run

    modes = tuple(mode or ("proposed", "conventional"))
    bad = [m for m in modes if m not in ("proposed", "conventional")]
    if bad:
        raise typer.BadParameter(f"unknown mode(s) {', '.join(bad)}", param_hint="--mode")
    result = _bench(run, mtus=tuple(mtu or DEFAULT_MTUS), seconds=seconds, workers=workers,
                    repeat=repeat, streams=streams, capacity=ring, modes=modes,
                    plot_path=plot, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("scaling")
def bench_scaling(
    workers: Annotated[list[int] | None, typer.Option(
        help="pool sizes, workers per link end (repeat the option); default 1 2 4 8 16")]
    = None,
    seconds: Annotated[float, typer.Option(min=0.5, help="iperf3 time per bare-underlay "
                                                         "run (tunnel runs send a share "
                                                         "of their rings' key)")] = 2.0,
    repeat: Annotated[int, typer.Option(min=1, help="runs per point; the median counts")] = 3,
    ring: Annotated[str, typer.Option(help="ring capacity per link direction")] = "4GiB",
    plot: Annotated[Path, typer.Option(help="PNG plot of the curve")] = Path(
        "bench/results/otp-scaling.png"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """OTP worker pool scaling: direct throughput with 1..16 workers per link end, 2
    iperf3 streams per worker, beside the bare underlay under the same load."""
    need_root()
    from bench.scaling import DEFAULT_WORKERS, run
    from control.core.config import parse_size
    from dataplane.limits import MAX_WORKERS

    sizes = tuple(workers or DEFAULT_WORKERS)
    bad = [w for w in sizes if not 1 <= w <= MAX_WORKERS]
    if bad:
        raise typer.BadParameter(f"must be 1 to {MAX_WORKERS}, not {bad}",
                                 param_hint="--workers")
    try:
        if parse_size(ring) < 64 << 20:
            raise ValueError("at least 64MiB")
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--ring") from None
    result = _bench(run, workers=sizes, seconds=seconds, repeat=repeat, capacity=ring,
                    plot_path=plot, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("guard")
def bench_guard(
    seconds: Annotated[float, typer.Option(help="iperf3 time per run")] = 1.5,
    repeat: Annotated[int, typer.Option(min=1, help="runs per point; the median counts")] = 3,
    size: Annotated[int, typer.Option(min=1, max=1400, help="forged datagram payload bytes")
                    ] = 128,
    workers: Annotated[int, typer.Option(help="workers per link end; 0 = cores")] = 0,
    ring: Annotated[str, typer.Option(help="ring capacity per link direction (holds a "
                                           "whole run's key)")] = "2GiB",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """XDP guard: legitimate iperf3 through the tunnel under a forged-datagram flood from
    another namespace, guard on and off in one run: throughput and workers' CPU."""
    need_root()
    from bench.guard import run

    result = _bench(run, seconds=seconds, repeat=repeat, size=size, workers=workers,
                    capacity=ring, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("gkm")
def bench_gkm(
    size: Annotated[list[str] | None, typer.Option(
        help="global key sizes (repeat the option); default 1KiB 16KiB 256KiB 1MiB")] = None,
    store: Annotated[str, typer.Option(help="store maximum (high watermark) to fill")]
    = "256MiB",
    window: Annotated[str, typer.Option(help="bytes in flight per pair")] = "16MiB",
    repeat: Annotated[int, typer.Option(min=1, help="fills per point; the median counts")]
    = 3,
    baseline: Annotated[list[str] | None, typer.Option(
        help="sizes to measure stop-and-wait at too; default 1MiB")] = None,
    plot: Annotated[Path, typer.Option(help="PNG plot")] = Path("bench/results/gkm-size.png"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Global key manager: time to fill a store, per key size, direct and via a relay."""
    need_root()
    from bench.gkm import DEFAULT_SIZES, run
    from control.core.config import parse_size
    from dataplane.limits import MAX_GLOBAL_BLOCK, MIN_GLOBAL_BLOCK

    def sizes(values: list[str], name: str) -> tuple[int, ...]:
        try:
            out = tuple(parse_size(v) for v in values)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=name) from None
        bad = [v for v in out if not MIN_GLOBAL_BLOCK <= v <= MAX_GLOBAL_BLOCK]
        if bad:
            raise typer.BadParameter(f"sizes must be {MIN_GLOBAL_BLOCK} B to 16 MiB",
                                     param_hint=name)
        return out

    def amount(value: str, name: str) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=name) from None

    sz = sizes(size, "--size") if size else DEFAULT_SIZES
    base = sizes(baseline, "--baseline") if baseline else (1 << 20,)
    store_b, window_b = amount(store, "--store"), amount(window, "--window")
    if not max(sz + base) <= store_b <= 4 << 30:
        raise typer.BadParameter("must hold at least one key of each size, at most 4 GiB",
                                 param_hint="--store")
    if window_b < max(sz):
        raise typer.BadParameter("must hold at least one key of each size",
                                 param_hint="--window")
    result = _bench(run, sizes=sz, store=store_b, window=window_b, baseline_sizes=base,
                    repeat=repeat, plot_path=plot, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("api")
def bench_api(
    size: Annotated[list[str] | None, typer.Option(
        help="key sizes (repeat): bits like 256, or sizes like 1KiB; default 256 1KiB 64KiB "
             "1MiB")] = None,
    keys: Annotated[int, typer.Option(min=1, help="keys stored per size (capped by --store)")]
    = 32768,
    store: Annotated[str, typer.Option(help="most key stored for one size")] = "2GiB",
    clients: Annotated[int, typer.Option(min=1, max=64, help="client processes, each one "
                                                             "keep-alive connection")] = 32,
    workers: Annotated[int, typer.Option(min=1, max=32, help="Sanic worker processes (the "
                                                             "clients share the cores)")] = 1,
    baseline_seconds: Annotated[float, typer.Option(help="conventional pull time per size")]
    = 3.0,
    repeat: Annotated[int, typer.Option(min=1, help="pulls per size; the median counts")] = 3,
    ceiling_seconds: Annotated[float, typer.Option(
        help="pull time per size from the bare Sanic endpoint (the ceiling)")] = 3.0,
    plot: Annotated[Path, typer.Option(help="PNG plot")] = Path("bench/results/api-size.png"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Key API: keys pulled over HTTPS (mutual TLS) until the store is empty, per size."""
    need_root()
    from bench.api import DEFAULT_SIZES, run
    from control.core.config import parse_size

    def bits(value: str) -> int:
        try:
            n = int(value) if value.isdigit() else 8 * parse_size(value)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--size") from None
        if n % 8 or not 8 <= n <= 8 << 20:
            raise typer.BadParameter(f"{value}: key sizes are multiples of 8 bits, 8 bit to "
                                     f"1 MiB", param_hint="--size")
        return n

    try:
        store_b = parse_size(store)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--store") from None
    if not 1 << 20 <= store_b <= 4 << 30:
        raise typer.BadParameter("must be 1 MiB to 4 GiB", param_hint="--store")
    sz = tuple(bits(v) for v in size) if size else DEFAULT_SIZES
    result = _bench(run, sizes=sz, keys=keys, store_max=store_b, clients=clients,
                    workers=workers, baseline_s=baseline_seconds, repeat=repeat,
                    ceiling_s=ceiling_seconds, plot_path=plot, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("relay")
def bench_relay(
    hops: Annotated[list[int] | None, typer.Option(
        help="hop counts to measure (repeat the option); default 1 2 4 8")] = None,
    nodes: Annotated[int, typer.Option(min=3, max=64, help="nodes in the ring")] = 16,
    store: Annotated[str, typer.Option(help="global key filled per point (1 MiB blocks)")]
    = "32MiB",
    ring: Annotated[str, typer.Option(help="ring capacity per link direction of the "
                                           "measured links (a kept range can pin half a "
                                           "ring: hold a point's key in half)")] = "96MiB",
    workers: Annotated[int, typer.Option(min=1, help="OTP workers per link end")] = 1,
    repeat: Annotated[int, typer.Option(min=1, help="fills per point; the median counts")]
    = 3,
    plot: Annotated[Path, typer.Option(help="PNG plot")] = Path("bench/results/relay-hops.png"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Relay: global key over 1, 2, 4, 8 hops of a 16-node ring, against hop count."""
    need_root()
    from bench.harness import BenchError
    from bench.relay import DEFAULT_HOPS, check, run
    from control.core.config import parse_size

    try:
        store_b, ring_b = parse_size(store), parse_size(ring)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--store/--ring") from None
    if not 1 << 20 <= store_b <= 1 << 30:
        raise typer.BadParameter("must be 1 MiB to 1 GiB", param_hint="--store")
    if ring_b < store_b + store_b // 4:
        raise typer.BadParameter("must hold a point's key: at least 1.25 x --store",
                                 param_hint="--ring")
    h = tuple(hops or DEFAULT_HOPS)
    try:
        check(h, nodes)
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="--hops") from None
    result = _bench(run, hops=h, nodes=nodes, store=store_b, ring=ring, workers=workers,
                    repeat=repeat, plot_path=plot, console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("soak")
def bench_soak(
    minutes: Annotated[float, typer.Option(help="how long the triangle runs")] = 60.0,
    key_rate: Annotated[float, typer.Option(help="QKD key rate per link, Mb/s")] = 100.0,
    sample: Annotated[float, typer.Option(help="seconds between samples")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The triangle under a steady tunnel stream, key pulls and restocking for MINUTES,
    sampling every process's memory and descriptors and the key stores' disk use."""
    need_root()
    from bench.soak import report, run

    _bench_and_report(run, report, as_json, minutes=minutes, rate=key_rate, sample_s=sample)


@bench_app.command("fuzz")
def bench_fuzz(
    requests: Annotated[int, typer.Option(min=1, help="requests to send")] = 100_000,
    clients: Annotated[int, typer.Option(min=1, max=64, help="client processes")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the request generator")] = 1,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The running key API under fuzzed requests (methods, paths, queries, bodies,
    headers, slow and cut connections): only 200, 400, 401 and 503, no restart, and the
    store drops by exactly the keys handed out."""
    need_root()
    from bench.fuzz import report, run

    _bench_and_report(run, report, as_json, "meets", requests=requests, clients=clients,
                      seed=seed)


@bench_app.command("scale")
def bench_scale(
    config: Annotated[Path, typer.Argument(help="topology TOML file (examples/ring32.toml)")],
    timeout: Annotated[float, typer.Option(help="seconds each stage may take")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """A shipped network comes up here, relays global key between its first key pair's
    SAEs through the key API, and goes down leaving nothing; each stage timed."""
    need_root()
    from bench.scale import report, run

    load(config)  # a clear error for a bad file, before anything starts
    _bench_and_report(run, report, as_json, "ok", config=config, timeout=timeout)


@bench_app.command("chaos")
def bench_chaos(
    injections: Annotated[int, typer.Option(min=1, help="faults to inject")] = 1000,
    key_rate: Annotated[float, typer.Option(help="QKD key rate per link, Mb/s")] = 100.0,
    seed: Annotated[int, typer.Option(help="seed of the fault sequence")] = 1,
    kinds: Annotated[str, typer.Option(help="fault kinds to draw from, comma-separated "
                                            "(default: all of them)")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Faults at random into the triangle (kill -9 of every module kind, SIGSTOP stalls,
    link cuts) while SAEs take keys at A and fetch them at C; a ledger of every key."""
    need_root()
    from bench.chaos import KINDS, report, run

    chosen = tuple(k.strip() for k in kinds.split(",") if k.strip()) or KINDS
    if unknown := [k for k in chosen if k not in KINDS]:
        raise typer.BadParameter(f"unknown fault kind(s) {', '.join(unknown)}; the kinds: "
                                 f"{', '.join(KINDS)}", param_hint="--kinds")
    _bench_and_report(run, report, as_json, injections=injections, rate=key_rate, seed=seed,
                      kinds=chosen)


@bench_app.command("reroute")
def bench_reroute(
    cuts: Annotated[int, typer.Option(min=1, help="times link A-B is cut")] = 20,
    key_rate: Annotated[float, typer.Option(help="QKD key rate per link, Mb/s")] = 100.0,
    settle: Annotated[bool, typer.Option(help="before each cut, wait for the link's "
                                              "keepalive timeout to settle")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """How fast routes move off a cut link, and back: the triangle, link A-B cut again
    and again; floor 2 s to reroute on an idle machine."""
    need_root()
    from bench.reroute import report, run

    _bench_and_report(run, report, as_json, cuts=cuts, rate=key_rate, settle=settle)


@bench_app.command("routing")
def bench_routing(
    key_rate: Annotated[float, typer.Option(help="key rate of A-B and B-C, Mb/s; A-C gets "
                                                 "a tenth")] = 80.0,
    store: Annotated[int, typer.Option(min=2, help="A's store for C, MiB (the fill)")] = 16,
    repeat: Annotated[int, typer.Option(min=1, help="runs per metric")] = 3,
    grid_store: Annotated[int, typer.Option(min=2, help="A1's store for C3 on the grid, "
                                                        "MiB (the multipath fill)")] = 16,
    parts: Annotated[str, typer.Option(help="triangle (key-aware routing), grid "
                                            "(multipath relay), or both")] = "triangle,grid",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Global key over a slow link: the triangle with A-C at a tenth of the others' key
    rate, A's store for C filled while routing by hops, then by key (target: key at least
    1.5x hops); and multipath relay: the 3x3 grid's opposite corners filled over one path,
    then as two XOR shares over two node-disjoint paths (target: at least 0.4x)."""
    need_root()
    from bench.routing import report, run

    _bench_and_report(run, report, as_json, rate=key_rate, store_mib=store, repeat=repeat,
                      grid_store_mib=grid_store, parts=parts)


@bench_app.command("calibrate")
def bench_calibrate(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The machine's calibration (memory copy, Poly1305, XOR, veth TCP between two scratch
    namespaces), as 'bench all' records it: to compare runs on two machines."""
    need_root()
    from bench.calibrate import run
    from bench.summary import calibration_line

    result = run(err if as_json else out)
    if as_json:
        print(json.dumps(result))
    else:
        out.print(calibration_line(result), highlight=False)


@bench_app.command("keyrate")
def bench_keyrate(
    rates: Annotated[str, typer.Option(help="QKD key rates per link, Mb/s, comma-separated")]
    = "1,10,100,1000",
    baseline: Annotated[float | None, typer.Option(
        help="rate at which the conventional dataplane is measured too; 0: none")] = 10.0,
    plot: Annotated[Path, typer.Option(help="PNG plot")] = Path("bench/results/keyrate.png"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Key economy: per QKD key rate, global key fill, its efficiency (global key over the
    link's key spent for it), idle key spent per link and time to first global key."""
    need_root()
    from bench.harness import BenchError
    from bench.keyrate import parse_rates, run

    try:
        r = parse_rates(rates)
    except BenchError as e:
        raise typer.BadParameter(str(e), param_hint="--rates") from None
    result = _bench(run, rates=r, baseline_rate=baseline or None, plot_path=plot,
                    console=err if as_json else out)
    if as_json:
        print(json.dumps(result))


@bench_app.command("all")
def bench_all(
    quick: Annotated[bool, typer.Option(help="a smoke run of a few minutes: short runs, "
                                             "two points per sweep")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="results directory (JSON, plots, log); default bench/results")] = None,
    only: Annotated[list[str] | None, typer.Option(
        help="run only this bench (repeat): lkm, etsi, otp, gkm, api, guard, relay, "
             "keyrate")]
    = None,
    record: Annotated[bool | None, typer.Option(
        help="rewrite the latest table in bench/RESULTS.md (default: yes, but not for "
             "--quick)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the run's JSON; progress "
                                                         "and table to stderr")] = False,
) -> None:
    """Every benchmark in one run: one table against the paper and the conventional
    baseline, bench/results/<date>.json and the plots; exit 1 if a bench failed."""
    from bench import all as bench_all_mod

    try:
        bench_all_mod.select(only)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--only") from None
    need_root()
    code = bench_all_mod.main(quick=quick, out_dir=out_dir or bench_all_mod.RESULTS_DIR,
                              only=only, record=(not quick) if record is None else record,
                              as_json=as_json, out=out, err=err)
    raise typer.Exit(code)


@bench_app.command("record")
def bench_record(
    json_file: Annotated[Path, typer.Argument(help="a JSON written by 'qkdctl bench all'")],
) -> None:
    """Rewrite the latest table in bench/RESULTS.md (and the README's) from a 'bench all'
    JSON."""
    from bench.all import RESULTS_MD
    from bench.record import record

    try:
        written = record(json_file, RESULTS_MD, RESULTS_MD.parent.parent / "README.md")
    except (OSError, ValueError, KeyError) as e:
        err.print(f"[red]cannot record {escape(str(json_file))}:[/red] {escape(str(e))}",
                  highlight=False)
        raise typer.Exit(1) from None
    for f in written:
        say(f"latest table written to {f}", highlight=False)


@app.command("doctor")
def doctor(as_json: Annotated[bool, typer.Option("--json", help="a JSON list")] = False
           ) -> None:
    """Can this machine run a node? TUN, namespaces, veth, BPF, kernel headers, bcc, XDP,
    each with its fix; exit status 1 if a required check fails."""
    from dataclasses import asdict  # no need_root(): without root it runs and says so

    from control.tools.doctor import passed, render, run_checks, summary

    checks = run_checks()
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        out.print(render(checks))
        out.print(summary(checks), highlight=False)
    raise typer.Exit(0 if passed(checks) else 1)


@app.command("profile")
def profile(
    node: Annotated[str, typer.Option(help="node name")],
    seconds: Annotated[float, typer.Option(min=0.1, help="probing time")] = 5.0,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="topology TOML file; default: the running network with "
                               "the node")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """Per-stage syscall latency of a running node's OTP workers (bcc probes, no restart),
    the paper's Table I from their counters, and where their time goes."""
    need_root()
    from control.tools.profile import NotRunning, profile_node, render, running_topology
    from dataplane.bpf.profile import ProfileError

    try:
        topo = load(config) if config else running_topology(node)
        report = profile_node(topo, node, seconds, console=err if as_json else out)
    except (NotRunning, ProfileError) as e:
        _fail(e)
    if as_json:
        print(json.dumps(report))
    else:
        out.print(render(report))


@app.command("demo")
def demo(config: Annotated[Path, typer.Option(help="topology")] = Path("examples/triangle.toml"),
         phase: Annotated[float, typer.Option(min=1.0, max=600.0,
                                              help="seconds of each stream phase")] = 8.0,
         rate: Annotated[float | None, typer.Option(
             min=0.1, max=100_000.0, help="TCP stream rate, Mb/s (default: 200, or a fifth "
                                          "of --key-rate)")] = None,
         key_rate: Annotated[float | None, typer.Option(
             min=0.5, max=100_000.0, help="every link's QKD key rate, Mb/s, sizes derived "
                                          "from it (default: the file's)")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="the report as JSON")] = False,
         ) -> None:
    """The paper's three nodes: keys through the key API, a TCP stream through the OTP
    tunnels, the direct link cut and restored; exit 0 when every claim held."""
    need_root()
    import shutil
    import tempfile

    from control.tools.demo import at_key_rate, report_json, run_demo, stream_rate_for

    tmp = Path(tempfile.mkdtemp(prefix="qkdnet-demo-"))
    try:
        if key_rate is not None:
            config = at_key_rate(config, key_rate, tmp)
        if rate is None:
            rate = 200.0 if key_rate is None else stream_rate_for(key_rate)
        code, rep = run_demo(load(config), err if as_json else out, phase_s=phase,
                             rate_mbps=rate)
    except ValueError as e:
        _fail(e, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        print(report_json(rep))
    raise typer.Exit(code)


def _one_line_summaries(*apps: typer.Typer) -> None:
    """Each command's summary in its group's help is the first paragraph of its docstring
    as one flowing line: typer's rich help kept the docstring's line breaks there, so a
    summary broke mid-sentence wherever the source did."""
    import inspect

    for a in apps:
        for c in a.registered_commands:
            doc = c.help or inspect.getdoc(c.callback) or ""
            if c.short_help is None and doc:
                c.short_help = " ".join(doc.split("\n\n")[0].split())


_one_line_summaries(app, net_app, node_app, emu_app, bench_app, pki_app, keys_app)


def main() -> None:  # pragma: no cover
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
