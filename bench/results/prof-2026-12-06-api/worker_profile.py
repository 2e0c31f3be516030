"""Where a key API worker's time goes per 256-bit enc_keys, alone: the setup of
worker_alone.py (the real app against a key manager that answers at once, 32 keep-alive
clients), with py-spy sampling the worker's Python threads for one pull; writes the
collapsed stacks, prints the functions by share of samples (inclusive, then as the
innermost Python frame) and each of the worker's threads' CPU per request from /proc
(py-spy does not see ZeroMQ's I/O thread, which has no Python frames).
Run from the repository root:
.venv/bin/python bench/results/prof-2026-12-06-api/worker_profile.py [out-prefix [bare]]
("bare": the same for the bare Sanic endpoint, bench.bare_api, instead of the worker;
PERF=1 in the environment: perf records the same process, kernel stacks too, as OUT.perf)
"""
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from bench import bare_api
from bench.api import ApiNet
from bench.api_load import pull_enc, run_in
from control.core import paths

sys.path.insert(0, str(Path(__file__).parent))
from worker_alone import start  # noqa: E402  (this folder's sibling script)

HERE = Path(__file__).parent
SECONDS = 8.0
HZ = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, by thread name (and id)."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as fh:
            s = fh.read()
        name = s[s.index("(") + 1:s.rindex(")")]
        f = s.rsplit(")", 1)[1].split()
        out[f"{name} {task}"] = (int(f[11]) + int(f[12])) / HZ
    return out


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "worker_profile"
    console = Console()
    net = ApiNet(64 << 20, 1, "64MiB", console)
    procs: list[subprocess.Popen] = []
    try:
        net.up()
        worker, port = start(net, procs)
        bare = len(sys.argv) > 2 and sys.argv[2] == "bare"
        with bare_api.endpoint(net.ns("A"), net.topo.api.pki, "A", net.addr("A"),
                               net.bare_port, 1, paths.log_dir(net.prefix) / "bare.log"):
            time.sleep(3)
            pid, at = worker.pid, port
            if bare:
                at = net.bare_port
                pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and
                           b"bench.bare_api" in Path(f"/proc/{p}/cmdline").read_bytes()
                           and b"netns" not in Path(f"/proc/{p}/cmdline").read_bytes())
                # Sanic's manager forks the process that serves: the busiest of its
                # descendants over a warm-up pull.
                family, todo = [], [pid]
                while todo:
                    p = todo.pop()
                    family.append(p)
                    todo += [int(k) for k in
                             Path(f"/proc/{p}/task/{p}/children").read_text().split()]
                cpu0 = {p: sum(threads(p).values()) for p in family}
                t0 = time.time() + 0.5
                run_in(net.ns("A"), [(pull_enc, (str(net.topo.api.pki), "SAE-A",
                                                 net.addr("A"), at, "SAE-B", 256, 1, t0,
                                                 t0 + 1.0, True))] * 4, 60)
                pid = max(family, key=lambda p: sum(threads(p).values()) - cpu0[p])
            spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record",
                                    "--pid", str(pid), "--rate", "500", "--format", "raw",
                                    "--duration", str(int(SECONDS)), "--nonblocking",
                                    "--output", f"{out}.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if os.environ.get("PERF"):  # also the kernel's share, by call chain
                perf = subprocess.Popen(["perf", "record", "-g", "-F", "999", "-p", str(pid),
                                         "-o", f"{out}.perf", "--", "sleep", str(SECONDS)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            before = threads(pid)
            t0 = time.time() + 0.5
            pulls = run_in(net.ns("A"), [(pull_enc, (str(net.topo.api.pki), "SAE-A",
                                                     net.addr("A"), at, "SAE-B", 256, 1, t0,
                                                     t0 + SECONDS, True))] * 32, 60)
            after = threads(pid)
            spy.wait(60)
            if os.environ.get("PERF"):
                perf.wait(60)
        requests = sum(p.keys for p in pulls)
        console.print(f"{requests / SECONDS:,.0f} requests/s; the server's threads, CPU "
                      f"per request:")
        for name in sorted(after, key=lambda n: before.get(n, 0) - after[n]):
            us = 1e6 * (after[name] - before.get(name, 0)) / requests
            if us >= 0.5:
                console.print(f"  {us:6.1f} us  {name}")
    finally:
        for p in procs:
            p.terminate()
        net.down()
    inclusive: collections.Counter[str] = collections.Counter()
    innermost: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(f"{out}.txt").read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += int(n)
        innermost[frames[-1]] += int(n)
    for title, counts in (("inclusive", inclusive), ("innermost", innermost)):
        console.print(f"{title}:")
        for frame, n in counts.most_common(30):
            console.print(f"{100 * n / total:5.1f}%  {frame}")


main()
