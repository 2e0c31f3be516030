"""Emulated networks: one network namespace per node, a veth underlay per link.

`qkdctl net up` writes a manifest *before* creating anything, so `qkdctl net down` can
remove everything a network made — namespaces, processes, shared-memory rings, sockets,
keys — even when the previous run crashed half way. Every name carries the network's
prefix; both ends of every veth live inside the network's own namespaces, so nothing is
ever added to or changed in the host's namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pnetns

from control.core import paths
from control.core.config import ConfigError, Topology, load_topology
from control.core.procs import is_alive, process_identity, send_signal
from control.lkm.messages import AUTH_KEY_LEN
from dataplane.limits import MAX_UNDERLAY_MTU
from dataplane.private import private_dir, private_umask, write_private
from dataplane.ring import SHM_DIR, KeyRing

STOP_GRACE_S = 5.0


class NetError(Exception):
    pass


def underlay_ifname(link_index: int) -> str:
    return f"ul{link_index}"


@dataclass
class Manifest:
    prefix: str
    config: str
    namespaces: list[str]
    pids: dict[str, int]
    created: float
    # pid and start time of each process in ``pids``: net down signals only those still
    # running, never a later process that got a recorded pid
    idents: dict[str, int] = field(default_factory=dict)

    def save(self) -> None:
        p = paths.manifest_path(self.prefix)
        private_dir(p.parent)
        write_private(p, json.dumps(self.__dict__, indent=1).encode())

    @classmethod
    def load(cls, prefix: str) -> Manifest | None:
        try:
            return cls(**json.loads(paths.manifest_path(prefix).read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None


def claim_namespace(prefix: str, ns: str) -> None:
    """Record ``ns`` in network ``prefix``'s manifest before making it (a bench's extra
    namespace, say), so that ``net down`` removes it too: it removes no other."""
    man = Manifest.load(prefix)
    if man is None:
        raise NetError(f"no network with prefix {prefix!r} to add namespace {ns} to")
    if ns not in man.namespaces:
        man.namespaces.append(ns)
        man.save()


def known_prefixes() -> list[str]:
    found = set()
    if paths.RUN_ROOT.is_dir():  # a stray folder there is no network of ours
        found |= {p.name for p in paths.RUN_ROOT.iterdir()
                  if paths.PREFIX_RE.fullmatch(p.name) and (p / "net.json").exists()}
    return sorted(found)


def _retry(fn, tries: int = 3):
    """pyroute2 works in a namespace through a helper process, which on a loaded machine
    now and then misses its start-up deadline (TimeoutError): try again."""
    for i in range(tries):
        try:
            return fn()
        except TimeoutError:
            if i == tries - 1:
                raise
            time.sleep(0.5 * (i + 1))


def _loopback_up(ns: str) -> None:
    with IPRoute(netns=ns) as ip:
        ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")


def _create_namespaces(topo: Topology, man: Manifest) -> None:
    existing = set(pnetns.listnetns())
    for node in topo.nodes:
        ns = paths.netns_name(topo.prefix, node)
        if ns in existing:
            raise NetError(f"namespace {ns} already exists: run 'qkdctl net down "
                           f"--prefix {topo.prefix}' first")
        pnetns.create(ns)
        _retry(lambda ns=ns: _loopback_up(ns))
    for lk in topo.links:
        ns_a = paths.netns_name(topo.prefix, lk.a)
        ns_b = paths.netns_name(topo.prefix, lk.b)
        name = underlay_ifname(lk.index)
        with IPRoute(netns=ns_a) as ip:
            ip.link("add", ifname=name, kind="veth", peer={"ifname": name, "net_ns_fd": ns_b})
        for ns, iface in ((ns_a, lk.underlay_a), (ns_b, lk.underlay_b)):
            with IPRoute(netns=ns) as ip:
                idx = ip.link_lookup(ifname=name)[0]
                ip.addr("add", index=idx, address=str(iface.ip),
                        prefixlen=iface.network.prefixlen)
                ip.link("set", index=idx, mtu=MAX_UNDERLAY_MTU, state="up")


def _write_link_keys(topo: Topology) -> None:
    for lk in topo.links:
        if lk.auth_key_file is not None:
            continue
        p = paths.link_key_path(topo.prefix, lk.name)
        private_dir(p.parent)
        write_private(p, secrets.token_bytes(AUTH_KEY_LEN))


def _ensure_relay_keys(topo: Topology) -> None:
    """The global key relay's CURVE keys: made in the run dir when the file names no
    ``[gkm] keys`` and there are none there yet; an existing set must cover every node
    that keeps global key."""
    from control.gkm.relay_keys import secret_path, write_relay_keys

    nodes = topo.gkm.nodes()
    if not nodes:
        return
    d = topo.gkm.keys
    if not any(secret_path(d, n).exists() for n in nodes):
        if topo.gkm.keys_given:  # never made where the file points (machine_problems)
            raise NetError(f"{d} holds no relay keys: run 'qkdctl keys init {d} "
                           f"--config {topo.path}'")
        write_relay_keys(d, nodes)
        return
    missing = [str(secret_path(d, n)) for n in nodes if not secret_path(d, n).exists()]
    if missing:
        raise NetError(f"the relay keys in {d} lack {missing[0]} (and {len(missing) - 1} "
                       f"more): run 'qkdctl keys init {d} --config {topo.path}'")


def _ensure_pki(topo: Topology) -> None:
    """The key API's certificates: made in the run dir when the file names no ``[api]
    pki`` and there is no CA there yet; an existing PKI must cover every node with SAEs
    and every SAE."""
    if not topo.saes:
        return
    from api.pki import PkiLayout, init_pki

    layout = PkiLayout(topo.api.pki)
    if not layout.ca_cert.exists():
        if topo.api.pki_given:  # never made where the file points (machine_problems)
            raise NetError(f"{topo.api.pki} holds no CA: run 'qkdctl pki init "
                           f"{topo.api.pki} --config {topo.path}'")
        init_pki(topo.api.pki, topo)
        return
    missing = [str(p) for n in {s.node for s in topo.saes} for p in layout.node(n)
               if not p.exists()]
    missing += [str(p) for s in topo.saes for p in layout.sae(s.id) if not p.exists()]
    if missing:
        raise NetError(f"the PKI in {topo.api.pki} lacks {missing[0]} (and "
                       f"{len(missing) - 1} more): run 'qkdctl pki issue {topo.api.pki} "
                       f"--config {topo.path}' to issue only the missing ones under its CA "
                       f"(every certificate there is kept)")


def _spawn(args: list[str], log: Path) -> int:
    """Start ``qkdctl args`` (a node or an emulator, as root) in its own session. ``-P``:
    ``python -m`` would put the current directory first on the import path, and whoever
    can write there (anyone, in /tmp) would have a ``control`` package of theirs, or any
    module imported later, run as root in every node (a helper's audit did it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "control.tools.cli", *args],
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def machine_problems(topo: Topology) -> list[tuple[str, str]]:
    """What keeps a valid topology from coming up on this machine (control.tools.
    preflight, with this machine's facts): asked before anything is made."""
    from control.tools.preflight import given_dir_problems, shm_problems, wire_problems

    st = os.statvfs(SHM_DIR)
    return (wire_problems(topo)
            + shm_problems(topo, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
            + given_dir_problems(topo, Path.is_dir, Path.exists))


def net_up(topo: Topology, start: bool = True) -> Manifest:
    """Create the network (and start its emulators and nodes unless ``start`` is False).
    Everything it makes (run directory, keys, certificates, logs) is its owner's alone."""
    if paths.manifest_path(topo.prefix).exists():
        raise NetError(f"a network with prefix {topo.prefix!r} exists already: "
                       f"run 'qkdctl net down --prefix {topo.prefix}' first")
    problems = machine_problems(topo)
    if problems:
        raise NetError("\n".join(f"{topo.path}: {field}: {msg}" for field, msg in problems)
                       + "\nnothing was made")
    present = set(pnetns.listnetns())
    foreign = [ns for n in topo.nodes if (ns := paths.netns_name(topo.prefix, n)) in present]
    if foreign:  # not this network's (it has no manifest): never ours to remove
        raise NetError(f"namespace(s) {', '.join(foreign)} exist already and are no qkdnet "
                       f"network's: remove them, or give the network another prefix")
    man = Manifest(prefix=topo.prefix, config=str(topo.path.resolve()),
                   namespaces=[paths.netns_name(topo.prefix, n) for n in topo.nodes],
                   pids={}, created=time.time())
    with private_umask():
        man.save()  # first, so that a crash below is still cleaned up by net down
        try:
            _create_namespaces(topo, man)
            _write_link_keys(topo)
            _ensure_relay_keys(topo)
            _ensure_pki(topo)
            if start:
                start_processes(topo, man)
        except BaseException:
            with contextlib.suppress(NetError):  # said by the next net down, if so
                net_down(topo.prefix)
            raise
    return man


def start_processes(topo: Topology, man: Manifest) -> None:
    cfg = man.config
    logs = paths.log_dir(topo.prefix)
    with private_umask():  # the log files; the processes set their own umask
        for lk in topo.links:
            if lk.source.kind != "emulator":  # a real device or key files feed this link
                continue
            _record(man, f"emulator:{lk.name}", _spawn(
                ["emulator", "run", "--config", cfg, "--link", lk.name],
                logs / f"emulator-{lk.name}.log"))
        for node in topo.nodes:
            _record(man, f"node:{node}", _spawn(
                ["node", "run", "--config", cfg, "--node", node,
                 "--netns", paths.netns_name(topo.prefix, node)],
                logs / f"node-{node}.log"))


def _record(man: Manifest, name: str, pid: int) -> None:
    man.pids[name] = pid
    man.idents[name] = process_identity(pid)
    man.save()


def _recorded(man: Manifest | None) -> list[int]:
    """Identities of the processes the manifest names that still run. A manifest of an
    older version has pids only: those are trusted only if they run qkdnet."""
    out = []
    for name, pid in (man.pids.items() if man else []):
        ident = man.idents.get(name) if man else None
        if ident is None and _is_ours(pid):
            ident = process_identity(pid)
        if ident and is_alive(ident):
            out.append(ident)
    return out


def _pids_in_netns(ns: str) -> list[int]:
    """The processes inside namespace ``ns``."""
    try:
        target = os.stat(f"/run/netns/{ns}").st_ino
    except FileNotFoundError:
        return []
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(p / "ns" / "net").st_ino == target:
                    pids.append(int(p.name))
    return pids


def _pids_of_network(prefix: str, config: str | None) -> list[int]:
    """qkdnet processes started for this network, found by their command line: a process
    spawned just before 'net up' was killed may be in no manifest and not yet inside its
    namespace."""
    pids = []
    cfg = config.encode() if config else None
    ns_prefix = f"{prefix}-".encode()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (p / "cmdline").read_bytes().split(b"\0")
                if b"control.tools.cli" not in cmd:
                    continue
                netns = [cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a == b"--netns"]
                if (cfg and cfg in cmd) or any(n.startswith(ns_prefix) for n in netns):
                    pids.append(int(p.name))
    return pids


def _identities(pids: list[int]) -> list[int]:
    """Identities (pid and start time) of processes just found, so that each is signalled
    only while it is still the one found."""
    return [i for i in (process_identity(p) for p in pids) if i]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child of ours is reaped and counts as gone)."""
    ident = process_identity(pid)
    return bool(ident) and is_alive(ident)


def _is_ours(pid: int) -> bool:
    """Whether a pid from a manifest without identities runs qkdnet at all."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"control.tools.cli" in cmd or b"qkdctl" in cmd or b"multiprocessing" in cmd


def _stop_pids(idents: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM, then after ``grace_s`` SIGKILL, to the identified processes (pid and
    start time) that still run; a pid that now names another process is left alone."""
    idents = [i for i in set(idents) if i & 0xFFFFFF != os.getpid() and is_alive(i)]
    for i in idents:
        send_signal(i, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_alive(i) for i in idents):
        time.sleep(0.05)
    for i in idents:
        if is_alive(i):
            send_signal(i, signal.SIGKILL)


def _grace_of(config: str | None) -> float:
    """How long node supervisors may take to stop (their own budget, and a margin)."""
    from control.node.supervisor import stop_budget

    try:
        return max(STOP_GRACE_S, stop_budget(load_topology(config)) + 2.0) \
            if config else STOP_GRACE_S
    except (ConfigError, OSError):
        return STOP_GRACE_S


def keep_logs(prefix: str, into: Path) -> Path:
    """Copy network ``prefix``'s logs into a new directory of ours (mode 0700, files
    0600: logs name key IDs and SAEs) under ``into``: ``<into>/<prefix>``, or
    ``<prefix>.1`` ... when that exists. Never through a link, never over a file."""
    src = paths.log_dir(prefix)
    into.mkdir(parents=True, exist_ok=True, mode=0o700)  # not narrowed: maybe a home
    dest = into / prefix
    n = 0
    while dest.exists() or dest.is_symlink():
        n += 1
        dest = into / f"{prefix}.{n}"
    private_dir(dest)
    for f in sorted(src.iterdir()) if src.is_dir() else []:
        if not f.is_file() or f.is_symlink():
            continue
        fd = os.open(dest / f.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out, open(f, "rb") as inp:
            shutil.copyfileobj(inp, out)
    return dest


def net_down(prefix: str, keep_logs_in: Path | None = None) -> list[str]:
    """Remove everything of network ``prefix``; returns what was removed. With
    ``keep_logs_in``, its logs are first copied there (``keep_logs``), once every
    process has stopped writing them; if that fails, nothing is removed."""
    paths.check_prefix(prefix)
    removed: list[str] = []
    man = Manifest.load(prefix)
    # The node supervisors and emulators first, each given time to stop its modules in
    # order (the key API lets requests in flight finish); whatever is left, after.
    first = _recorded(man)
    _stop_pids(first, _grace_of(man.config if man else None))
    pids = list(first) + _identities(_pids_of_network(prefix, man.config if man else None))
    # Only the namespaces the manifest names (written before each is made): another
    # namespace whose name merely starts with the prefix (say a container runtime's
    # "cni-...") is not ours, nor are its processes.
    ours = set(man.namespaces) if man else set()
    namespaces = sorted(ours & set(pnetns.listnetns()))
    for ns in namespaces:
        pids += _identities(_pids_in_netns(ns))
    _stop_pids(pids)
    removed += [f"process {i & 0xFFFFFF}" for i in sorted(set(pids))]
    if keep_logs_in is not None and paths.log_dir(prefix).is_dir():
        try:
            removed.append(f"logs kept in {keep_logs(prefix, keep_logs_in)}")
        except OSError as e:
            raise NetError(f"the logs in {paths.log_dir(prefix)} could not be kept in "
                           f"{keep_logs_in} ({e}); its processes are stopped, nothing is "
                           f"removed: run net down again") from None
    for attempt in range(3):
        for ns in namespaces:
            with contextlib.suppress(FileNotFoundError, OSError):
                pnetns.remove(ns)
                removed.append(f"namespace {ns}")
        # A killed 'net up' can leave a namespace helper that finishes late: look again.
        time.sleep(0.1 * attempt)
        namespaces = sorted(ours & set(pnetns.listnetns()))
        if not namespaces:
            break
    for name in paths.ring_names_of_network(prefix):
        KeyRing.unlink(name)
        removed.append(f"ring {name}")
    if namespaces and man is not None:  # still there: the manifest, which alone says
        man.namespaces = namespaces     # they are ours, stays for the next net down
        man.pids, man.idents = {}, {}
        man.save()
        raise NetError(f"namespace(s) {', '.join(namespaces)} could not be removed yet; "
                       f"run 'qkdctl net down --prefix {prefix}' again")
    d = paths.network_dir(prefix)
    if d.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=False)
        removed.append(f"run dir {d}")
    return removed


def leftovers(prefix: str) -> list[str]:
    """What of a network still exists: namespaces, shared-memory rings, its run directory
    (nothing after a clean net down)."""
    out = [f"namespace {ns}" for ns in pnetns.listnetns() if ns.startswith(f"{prefix}-")]
    out += [f"ring {n}" for n in paths.ring_names_of_network(prefix)]
    if paths.network_dir(prefix).exists():
        out.append(f"directory {paths.network_dir(prefix)}")
    return out


def net_status(prefix: str) -> dict:
    man = Manifest.load(prefix)
    present = set(pnetns.listnetns())
    return {
        "prefix": prefix,
        "config": man.config if man else None,
        "namespaces": {ns: ns in present for ns in (man.namespaces if man else [])},
        "processes": {k: is_alive(man.idents.get(k) or process_identity(p))
                      for k, p in (man.pids.items() if man else [])},
        "rings": len(paths.ring_names_of_network(prefix)),
    }
