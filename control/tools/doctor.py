"""qkdctl doctor: can this machine run a node? Each check tries the real thing (a TUN, a
namespace, a veth pair, a BPF map, an XDP attach) rather than guessing from versions, and
says how to fix what fails.

Everything that needs a namespace happens in a scratch namespace with a name unique to
the run (``qkdoc-<8 hex>``), entered only by forked children, and removed afterwards even
when a check fails: the host's interfaces and the caller's namespace are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import multiprocessing as mp
import os
import platform
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from dataplane.bpf.guard import MIN_KERNEL as MIN_XDP_FRAGS_KERNEL
from dataplane.bpf.guard import kernel_version

SCRATCH_PREFIX = "qkdoc"
XDP_PROG = b"int qkdoc(struct xdp_md *ctx) { return XDP_PASS; }"
CHILD_TIMEOUT_S = 30.0

FIX_ROOT = "run as root (sudo)"
FIX_TUN = ("modprobe tun; in a container, run it with --device /dev/net/tun and "
           "--cap-add NET_ADMIN")
FIX_NETNS = ("run as root; in a container, --privileged (CAP_SYS_ADMIN) and a writable "
             "/run/netns; kernel with CONFIG_NET_NS")
FIX_VETH = "modprobe veth (kernel with CONFIG_VETH); run as root"
FIX_BPF = "run as root (CAP_BPF, CAP_SYS_ADMIN); kernel with CONFIG_BPF_SYSCALL"
FIX_HEADERS = ("apt-get install linux-headers-amd64 && scripts/link-kernel-headers.sh "
               "(make setup does both)")
FIX_BCC = ("apt-get install python3-bpfcc && scripts/link-bcc.sh .venv/bin/python "
           "(make setup does both)")
FIX_XDP_KERNEL = "a kernel >= 5.18; until then nodes run without the XDP guard (and say so)"
FIX_XDP = ("nodes run without the XDP guard (and say so); the detail names the kernel's "
           "refusal")
FIX_NO_NS = "fix network namespaces first"
FIX_TOOLS = "apt-get install iperf3 iproute2"
FIX_NFT = ("apt-get install nftables (make setup does it); kernel with CONFIG_NF_TABLES; "
           "nodes do not start without it")

_fork = mp.get_context("fork")


@dataclass
class Check:
    """One probe's verdict; ``fix`` is empty when it passed. ``info`` holds machine-readable
    facts for --json (the XDP mode, the bcc compile time)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    info: dict[str, object] = field(default_factory=dict)


def _fail(name: str, detail: str, fix: str, required: bool = True) -> Check:
    return Check(name, False, detail, fix, required)


def _err(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


# ---- running code inside the scratch namespace --------------------------------------------

def _child(ns: str, fn: Callable, args: tuple, conn) -> None:
    from pyroute2 import netns

    try:
        netns.setns(ns, flags=0)  # never create it (pyroute2 does by default)
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # everything goes back to the parent, as text
        conn.send(("error", _err(e)))
    finally:
        conn.close()


def in_netns(ns: str, fn: Callable, *args, timeout: float = CHILD_TIMEOUT_S):
    """``fn(*args)`` in a forked child that entered ``ns`` (setns changes the whole process,
    so never in the caller); raises RuntimeError with the child's error."""
    parent, child = _fork.Pipe(duplex=False)
    proc = _fork.Process(target=_child, args=(ns, fn, args, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"no answer within {timeout:.0f} s")
        status, value = parent.recv()
    except EOFError:
        raise RuntimeError("the child process died without an answer") from None
    finally:
        if proc.is_alive():
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)
        parent.close()
    if status != "ok":
        raise RuntimeError(value)
    return value


def scratch_name(prefix: str = SCRATCH_PREFIX) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def scratch_netns(prefix: str = SCRATCH_PREFIX) -> Iterator[str]:
    """A fresh namespace, removed on the way out whatever happened inside."""
    from pyroute2 import netns

    name = scratch_name(prefix)
    try:
        netns.create(name)
        yield name
    finally:
        with contextlib.suppress(Exception):
            netns.remove(name)


# ---- the checks ---------------------------------------------------------------------------

def check_root() -> Check:
    uid = os.geteuid()
    if uid == 0:
        return Check("root privileges", True, "effective uid 0")
    return _fail("root privileges", f"effective uid {uid}", FIX_ROOT)


def _make_tun() -> str:
    from dataplane.tun import IFF_NO_PI, IFF_TUN, TUNSETIFF

    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        got = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"qkdoc%d", IFF_TUN | IFF_NO_PI))
        return got[:16].rstrip(b"\0").decode()
    finally:
        os.close(fd)  # not persistent: the device goes with the descriptor


def check_tun(ns: str | None) -> Check:
    name = "TUN"
    if not os.path.exists("/dev/net/tun"):
        return _fail(name, "/dev/net/tun missing", FIX_TUN)
    if ns is None:
        return _fail(name, "not tried: no scratch namespace", FIX_NO_NS)
    try:
        dev = in_netns(ns, _make_tun)
    except RuntimeError as e:
        return _fail(name, f"creating a TUN failed: {e}", FIX_TUN)
    return Check(name, True, f"created and removed {dev} in a scratch namespace")


def check_netns(prefix: str = SCRATCH_PREFIX) -> Check:
    from pyroute2 import netns

    name, ns = "network namespaces", scratch_name(prefix)
    try:
        netns.create(ns)
    except Exception as e:
        with contextlib.suppress(Exception):
            netns.remove(ns)  # whatever half of it was made
        return _fail(name, f"creating {ns} failed: {_err(e)}", FIX_NETNS)
    try:
        netns.remove(ns)
    except Exception as e:
        return _fail(name, f"removing {ns} failed: {_err(e)}", FIX_NETNS)
    return Check(name, True, f"created and removed {ns}")


def _make_veth(a: str, b: str, mtu: int | None = None) -> int:
    """A veth pair, both ends up, in the current (scratch) namespace; returns ``a``'s
    ifindex in it (/sys/class/net would still show the host's after setns)."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        ip.link("add", ifname=a, kind="veth", peer={"ifname": b})
        for dev in (b, a):
            idx = ip.link_lookup(ifname=dev)[0]
            ip.link("set", index=idx, state="up", **({"mtu": mtu} if mtu else {}))
        return idx


def check_veth(ns: str | None) -> Check:
    name = "veth"
    if ns is None:
        return _fail(name, "not tried: no scratch namespace", FIX_NO_NS)
    try:
        in_netns(ns, _make_veth, "qkdoc-v0", "qkdoc-v1")
    except RuntimeError as e:
        return _fail(name, f"creating a veth pair failed: {e}", FIX_VETH)
    return Check(name, True, "created a veth pair in a scratch namespace")


def check_bpf() -> Check:
    from dataplane.bpf import syscall

    name = "BPF syscall"
    try:
        fd = syscall.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, 8, 1, name=b"qkdoc")
    except OSError as e:
        return _fail(name, f"creating an array map failed: {_err(e)}", FIX_BPF)
    os.close(fd)
    return Check(name, True, "created and closed an array map")


def check_headers(modules_dir: Path | None = None) -> Check:
    """bcc needs build/ (generated headers, .config) and the kernel's own include/, which
    Debian keeps in source/ when build/ is the -amd64 tree."""
    name = "kernel headers"
    mod = modules_dir or Path("/lib/modules") / platform.release()
    build, source = mod / "build", mod / "source"
    if not (build / "Makefile").exists():
        return _fail(name, f"{build}/Makefile missing", FIX_HEADERS)
    kconfig = [d / "include/linux/kconfig.h" for d in (source, build)]
    found = next((p for p in kconfig if p.exists()), None)
    if found is None:
        return _fail(name, f"no include/linux/kconfig.h under {source} or {build}",
                     FIX_HEADERS)
    detail = f"{build} -> {build.resolve()}"
    built_for = headers_release(build)
    if built_for and built_for != mod.name:
        detail += (f" (headers of {built_for}, not of the running {mod.name}: enough, as "
                   f"qkdnet's XDP guard and profile probes read no kernel structure)")
    return Check(name, True, detail)


def headers_release(build: Path) -> str | None:
    """The kernel release the headers at ``build`` were made for (UTS_RELEASE), if said."""
    try:
        text = (build / "include/generated/utsrelease.h").read_text()
    except OSError:
        return None
    m = re.search(r'UTS_RELEASE\s+"([^"]+)"', text)
    return m[1] if m else None


@functools.cache  # the bcc and XDP checks both need it: one clang run
def _compile_xdp() -> tuple[bytes, float]:
    """bcc compiles and loads a trivial XDP program; returns its instructions and the
    seconds that took."""
    import bcc

    t = time.monotonic()
    b = bcc.BPF(text=XDP_PROG)
    try:
        b.load_func(b"qkdoc", bcc.BPF.XDP)
        return b.dump_func(b"qkdoc"), time.monotonic() - t
    finally:
        b.cleanup()


def check_bcc() -> Check:
    name = "bcc"
    try:
        import bcc  # noqa: F401 (slow and maybe missing: only here)
    except ImportError as e:
        return _fail(name, f"import bcc failed: {e}", FIX_BCC)
    try:
        _, secs = _compile_xdp()
    except Exception as e:  # imported, so the package is there: privileges or headers
        fix = FIX_ROOT if os.geteuid() else f"fix kernel headers first; else {FIX_BCC}"
        return _fail(name, f"compiling an XDP program failed: {_err(e)}", fix)
    c = Check(name, True, f"compiled and loaded an XDP program in {secs * 1000:.0f} ms")
    c.info["compile_ms"] = round(secs * 1000, 1)
    return c


def _attach_xdp(insns: bytes, mtu: int) -> str:
    """Load with BPF_F_XDP_HAS_FRAGS and attach through a link to a fresh large-MTU veth in
    the current namespace: native (driver) mode if the kernel takes it, else generic."""
    from dataplane.bpf import syscall

    ifindex = _make_veth("qkdoc-x0", "qkdoc-x1", mtu)
    prog = syscall.prog_load(insns, name=b"qkdoc", flags=syscall.BPF_F_XDP_HAS_FRAGS)
    try:
        for mode, label in ((syscall.XDP_FLAGS_DRV_MODE, "native"),
                            (syscall.XDP_FLAGS_SKB_MODE, "generic")):
            try:
                link = syscall.link_create_xdp(prog, ifindex, mode)
            except OSError as e:
                error = e
                continue
            os.close(link)
            return label
        raise error
    finally:
        os.close(prog)


def check_xdp(ns: str | None, mtu: int = 65535) -> Check:
    name = "XDP multi-buffer"
    kv = kernel_version()
    if kv < MIN_XDP_FRAGS_KERNEL:
        return _fail(name, f"kernel {platform.release()} < 5.18: no XDP multi-buffer",
                     FIX_XDP_KERNEL, required=False)
    if ns is None:
        return _fail(name, "not tried: no scratch namespace", FIX_NO_NS, required=False)
    try:
        insns, _ = _compile_xdp()
    except Exception as e:
        return _fail(name, f"not tried: bcc cannot compile ({_err(e)})", "fix bcc first",
                     required=False)
    try:
        mode = in_netns(ns, _attach_xdp, insns, mtu)
    except RuntimeError as e:
        return _fail(name, f"attaching to a veth (MTU {mtu}) failed: {e}", FIX_XDP,
                     required=False)
    c = Check(name, True, f"{mode} XDP with frags on a veth of MTU {mtu} (kernel "
              f"{kv[0]}.{kv[1]})", required=False)
    c.info["mode"] = mode
    return c


def check_nft(ns: str | None) -> Check:
    """A node closes its tunnels to other users with an nftables table in its namespace
    (control.routing.router) and does not start without it."""
    name = "nftables"
    nft = shutil.which("nft")
    if nft is None:
        return _fail(name, "nft not on PATH", FIX_NFT)
    if ns is None:
        return _fail(name, "not tried: no scratch namespace", FIX_NO_NS)
    from control.routing.router import tunnel_owner_filter

    script = tunnel_owner_filter(["qkdoc0"], {0, 65534}, table="qkdoc")  # a node's, whole
    res = subprocess.run(["ip", "netns", "exec", ns, nft, "-f", "-"], capture_output=True,
                         text=True, timeout=30,
                         input=f"{script}delete table inet qkdoc\n")
    if res.returncode != 0:
        return _fail(name, f"a node's filter refused: {res.stderr.strip()}", FIX_NFT)
    return Check(name, True, f"{nft}: a node's filter made and removed in a scratch "
                             f"namespace")


def check_tools(tools: tuple[str, ...] = ("iperf3", "ip")) -> Check:
    name = "iperf3 and ip"
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return _fail(name, f"not on PATH: {', '.join(missing)}", FIX_TOOLS, required=False)
    return Check(name, True, ", ".join(shutil.which(t) or t for t in tools), required=False)


def run_checks(prefix: str | None = None) -> list[Check]:
    """Every check, in order; ``prefix`` names the scratch namespaces (default qkdoc)."""
    prefix = prefix or SCRATCH_PREFIX
    root, netns_check = check_root(), check_netns(prefix)
    with contextlib.ExitStack() as stack:
        try:
            ns: str | None = stack.enter_context(scratch_netns(prefix))
        except Exception:
            ns = None  # check_netns already says why
        return [root, check_tun(ns), netns_check, check_veth(ns), check_bpf(),
                check_headers(), check_bcc(), check_xdp(ns), check_nft(ns), check_tools()]


# ---- output -------------------------------------------------------------------------------

def passed(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.required)


def render(checks: list[Check]) -> Table:
    table = Table(title="qkdctl doctor", title_justify="left")
    for col in ("check", "result", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for c in checks:
        mark = "[green]✓[/green]" if c.ok else (
            "[red]✗[/red]" if c.required else "[yellow]✗[/yellow] (optional)")
        table.add_row(c.name, mark, Text(c.detail), Text(c.fix))  # errors are not markup
    return table


def summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.required and not c.ok]
    optional = [c.name for c in checks if not c.required and not c.ok]
    line = ("[green]all required checks pass[/green]" if not failed else
            f"[red]{len(failed)} required check(s) failed:[/red] {', '.join(failed)}")
    if optional:
        line += f"; optional missing: {', '.join(optional)}"
    if any(c.name == "XDP multi-buffer" and not c.ok for c in checks):
        line += " (nodes run without the XDP guard)"
    return line
