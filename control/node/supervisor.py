"""Node supervisor: runs a node's modules as processes and keeps them running.

`qkdctl node run` lands here. Each module is a child process that dies with the supervisor
(PR_SET_PDEATHSIG): per link a local key manager and an OTP tunnel manager (which runs its
own worker pool); per node the router, the Prometheus endpoint, the global key manager
and, when SAEs are attached to the node, the key API (which runs Sanic's worker
processes). A crashed child is restarted with backoff; SIGTERM/SIGINT stops every child
within seconds. No module starts before the namespace is safe for it
(:func:`control.routing.router.prepare_node`); a node whose routes cannot be installed does not
start at all. The state of every module is published in ``state.json`` beside the
modules' own status files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from control.core import paths
from control.core.config import Topology, load_topology
from control.core.lifecycle import die_with_parent, raise_open_files_limit
from control.core.statefile import write_json
from dataplane.private import private_dir, set_private_umask

log = logging.getLogger("qkdnet.node")

STOP_GRACE_S = 3.0
LOCK_NAME = "supervisor.lock"  # in the node's directory: held while a supervisor runs
MAX_BACKOFF_S = 5.0
STABLE_S = 10.0  # a module that ran this long before it exited restarts without delay


def _lkm_main(config_path: str, node: str, link: str, state_dir: str | None) -> None:
    from control.core.logs import setup_logging
    from control.lkm.link_end import EndConfig, LinkKeyManager

    die_with_parent()
    setup_logging()

    topo = load_topology(config_path)
    cfg = EndConfig.from_topology(topo, node, topo.link(link),
                                  Path(state_dir) if state_dir else None)
    LinkKeyManager(cfg).run()


def module_main(name: str, target, *args: object) -> None:
    """A module's process, forked by the supervisor. It starts with the signals' default
    actions, not the supervisor's handlers it was forked with: until the module sets its
    own, a SIGTERM (its parent's death, or net down) ends it, instead of setting a flag
    on a copy of the supervisor nobody reads and leaving an orphan beside the module's
    replacement. Whatever ends it badly goes to the node's structured log, not only to
    stderr (multiprocessing prints it there)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    try:
        target(*args)
    except SystemExit as e:
        if e.code not in (None, 0):
            log.error("%s stopped: %s", name, e.code)
            raise SystemExit(1 if isinstance(e.code, str) else e.code) from None
        raise
    except BaseException:
        log.critical("%s crashed", name, exc_info=True)
        raise SystemExit(1) from None


@dataclass
class Module:
    name: str
    target: object
    args: tuple
    proc: mp.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None
    quick_exits: int = 0  # exits in a row, each soon after its start
    last_restart: float | None = None  # wall clock
    history: list[float] = field(default_factory=list)
    first_to_stop: bool = False  # the key API: stopped (gracefully) before the rest
    stop_grace: float = STOP_GRACE_S


class Supervisor:
    def __init__(self, topo: Topology, node: str, state_dir: Path | None = None):
        self.topo = topo
        self.node = topo.node(node).name
        self.dir = private_dir(paths.node_dir(topo.prefix, node))
        private_dir(state_dir or paths.state_dir(topo.prefix, node))  # rings' cursors, stores
        self.ctx = mp.get_context("fork")
        sd = str(state_dir) if state_dir else None
        from control.routing.router import router_main
        from dataplane.tunnel import tunnel_main

        cfg = str(topo.path)
        links = topo.links_of(node)
        self.modules = [Module(f"lkm:{lk.name}", _lkm_main, (cfg, node, lk.name, sd))
                        for lk in links]
        guard_off = self._guard_off(topo) if links else None
        self.modules += [Module(f"tunnel:{lk.name}", tunnel_main,
                                (cfg, node, lk.name, sd, guard_off)) for lk in links]
        self.modules.append(Module("router", router_main, (cfg, node)))
        if topo.metrics.enabled:
            from control.node.metrics_server import metrics_main

            self.modules.append(Module("metrics", metrics_main, (cfg, node)))
        if topo.gkm.destinations_of(node) or topo.gkm.origins_of(node):
            from control.gkm.manager import gkm_main

            self.modules.append(Module("gkm", gkm_main, (cfg, node, sd)))
            if any(s.node == node for s in topo.saes):
                from api.server import api_main

                self.modules.append(Module("api", api_main, (cfg, node), first_to_stop=True,
                                           stop_grace=api_stop_grace(topo)))
        self.stopping = False

    def _guard_off(self, topo: Topology) -> str | None:
        """Whether this machine can run the XDP guard, found (and said) once for the node."""
        if topo.dataplane.guard == "off":
            return "off in the topology ([dataplane] guard = \"off\")"
        from dataplane.bpf.guard import GuardError, program, support

        reason = support()
        if reason is None:
            try:  # built (or found in the cache) once here, not by every link's manager
                program()
            except GuardError as e:
                reason = str(e)
        if reason is not None:
            log.warning("node %s: running WITHOUT the XDP guard: %s. The workers' own checks "
                        "(source, framing, replay, MAC) still drop bad datagrams; `qkdctl "
                        "doctor` shows how to fix it", self.node, reason)
        return reason

    def _start(self, m: Module) -> None:
        m.proc = self.ctx.Process(target=module_main, args=(m.name, m.target, *m.args),
                                  name=m.name, daemon=False)
        m.proc.start()
        m.started_at = time.monotonic()
        if m.restarts:
            m.last_restart = time.time()
        log.info("node %s: started %s (pid %d)", self.node, m.name, m.proc.pid)

    def _check(self, now: float) -> None:
        for m in self.modules:
            if m.proc is not None and not m.proc.is_alive():
                m.last_exit = m.proc.exitcode
                m.proc = None
                m.restarts += 1
                # Back off only a module that keeps failing at once: one that had been
                # running (the key API killed, say) is back within half a second.
                m.quick_exits = m.quick_exits + 1 if now - m.started_at < STABLE_S else 1
                backoff = 0.0 if m.quick_exits == 1 else \
                    min(MAX_BACKOFF_S, 0.25 * 2 ** min(m.quick_exits - 1, 5))
                m.next_start = now + backoff
                log.warning("node %s: %s exited with %s; restarting in %.1f s", self.node,
                            m.name, m.last_exit, backoff)
            if m.proc is None and now >= m.next_start:
                self._start(m)

    def state(self) -> dict:
        return {
            "node": self.node, "pid": os.getpid(), "updated": time.time(),
            "stopping": self.stopping,
            "modules": [{"name": m.name, "pid": m.proc.pid if m.proc else None,
                         "alive": bool(m.proc and m.proc.is_alive()),
                         "restarts": m.restarts, "last_exit": m.last_exit,
                         "last_restart": m.last_restart}
                        for m in self.modules],
        }

    def _publish(self) -> None:
        write_json(self.dir / "state.json", self.state())

    def run(self) -> None:
        def on_signal(*_: object) -> None:
            self.stopping = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        log.info("node %s: supervising %d module(s)", self.node, len(self.modules))
        try:
            while not self.stopping:
                self._check(time.monotonic())
                self._publish()
                time.sleep(0.2)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """The key API first, with time for the requests in flight (their keys come from
        the global key manager, which must still be running), then everything else."""
        self.stopping = True
        for first in (True, False):
            mods = [m for m in self.modules if m.proc is not None and m.first_to_stop == first]
            for m in mods:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.terminate()
            deadline = time.monotonic() + max((m.stop_grace for m in mods), default=0.0)
            for m in mods:
                m.proc.join(max(0.0, deadline - time.monotonic()))
                if m.proc.is_alive():
                    m.proc.kill()
                    m.proc.join(1.0)
        self._publish()
        log.info("node %s: stopped", self.node)


def api_stop_grace(topo: Topology) -> float:
    """How long the key API's module may take to stop: its manager gives its workers
    graceful_shutdown_s + STOP_EXTRA_S (the drain, then their hands given back), then
    reaps them."""
    from api.server import STOP_EXTRA_S

    return topo.api.graceful_shutdown_s + STOP_EXTRA_S + 2


def stop_budget(topo: Topology) -> float:
    """The longest a node's shutdown may take (``Supervisor.shutdown``): the key API's
    stage, then the other modules' (STOP_GRACE_S), each followed by a kill and a 1 s
    join. Whoever stops a node waits this long before killing its supervisor, or the
    modules it was still stopping would be cut short."""
    api = api_stop_grace(topo) + 1 if topo.saes else 0.0
    return api + STOP_GRACE_S + 1


def secrets_missing(topo: Topology, node: str) -> tuple[list[str], list[str]]:
    """What of the node's secrets cannot be read as its modules will read them, checked
    before any module starts: (the links' agreement keys, which stop the node: without
    them nothing works; the relay's keys and the key API's TLS files, said at once but
    not stopping the links and tunnels, which work without them: a node added to the
    global key pairs before every host has its public key, say)."""
    from control.lkm.link_end import load_link_key

    fatal: list[str] = []
    out: list[str] = []
    for lk in topo.links_of(node):
        try:
            load_link_key(lk.auth_key_file or paths.link_key_path(topo.prefix, lk.name))
        except SystemExit as e:
            fatal.append(str(e.code))
    g = topo.gkm
    peers = [*g.destinations_of(node), *g.origins_of(node)]
    if peers:
        from control.gkm.relay_keys import RelayKeyError, load_relay_keys

        try:
            load_relay_keys(g.keys, node, peers)
        except RelayKeyError as e:
            out.append(str(e))
        if any(s.node == node for s in topo.saes):
            from api.server import server_context

            try:
                server_context(topo.api.pki, node)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                out.append(f"key API: {e}")
    return fatal, out


def hold_node_lock(prefix: str, node: str, wait_s: float) -> int:
    """One node instance at a time: a second supervisor, or one started while the modules
    of a killed one still run, would fight them for the node's TUN queues, ports, XDP
    programs and rings (seen when a restart raced a start still under way). Two locks on
    ``supervisor.lock`` in the node's directory, taken before anything else: a POSIX lock
    (``lockf``), which belongs to the supervisor alone, and an ``flock``, which its
    modules share since they are forked with the descriptor. So the first held means a
    supervisor runs: refused at once, naming its pid; the second held alone means the
    modules of a supervisor that is gone (kill -9) still run: they stop on its death, and
    are waited for up to ``wait_s``. Returns the descriptor, to be kept open (closing any
    descriptor of the file would drop the POSIX lock)."""
    path = private_dir(paths.node_dir(prefix, node)) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = os.pread(fd, 16, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        raise SystemExit(f"node {node}: it runs already (supervisor pid {pid}); stop that "
                         f"one first; this one does not start") from None
    os.ftruncate(fd, 0)  # ours from now on, while we wait too
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise SystemExit(f"node {node}: processes of its previous run (its "
                                 f"supervisor gone) still run after {wait_s:.0f} s; kill "
                                 f"them (ip netns pids <namespace>); this one does not "
                                 f"start") from None
            if not said:
                log.warning("node %s: waiting for the processes of its previous run (its "
                            "supervisor gone) to end", node)
                said = True
            time.sleep(0.1)
    return fd


def run_node(config: Path, node: str, state_dir: Path | None = None,
             netns: str | None = None) -> None:
    set_private_umask()  # whatever the node and its modules make is theirs alone
    # Every module inherits it: each holds connections anyone who reaches the node's
    # address can open (the relay port, the key API), besides its own files (the stores).
    raise_open_files_limit()
    topo = load_topology(config)
    lock = hold_node_lock(topo.prefix, topo.node(node).name, stop_budget(topo) + 60)
    fatal, others = secrets_missing(topo, node)
    if fatal:  # no link could work: found by each key manager alone, they would restart
        for p in fatal:  # every few seconds for good beside a half-started node
            log.error("node %s: %s", node, p)
        raise SystemExit(f"node {node}: {'; '.join(fatal)}; the node does not start")
    for p in others:  # the links work without them: said now, their module restarts
        log.error("node %s: %s; the node starts without it (its module restarts until "
                  "this is fixed)", node, p)
    if netns:
        from pyroute2 import netns as pnetns

        try:  # flags=0: never make a namespace a typo names (pyroute2 would by default)
            pnetns.setns(netns, flags=0)
        except OSError as e:
            raise SystemExit(f"node {node}: no network namespace {netns!r} ({e.strerror}); "
                             f"the node does not start") from None
    from control.routing.router import SetupError, prepare_node

    try:  # before any module: no service may see the node address before this holds
        prepare_node(topo, node)
    except SetupError as e:
        log.error("node %s: %s; the node does not start", node, e)
        raise SystemExit(f"node {node}: {e}; the node does not start") from None
    log.info("node %s: node_net %s unreachable, forwarding off on the underlay, then "
             "address %s: starting the modules", node, topo.node_net, topo.node(node).address)
    Supervisor(topo, node, state_dir).run()
    os.close(lock)  # held till here (and by every module, forked, until it ended)
