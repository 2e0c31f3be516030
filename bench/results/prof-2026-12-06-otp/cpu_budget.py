"""Where the OTP tunnel's CPU goes, per 64 KiB packet, beside the bare underlay's.

Brings up bench otp's network (A - B - C, 2 workers per link end, rings 1 GiB, key paused
during runs), then per round: one iperf3 run A -> B through the tunnel, one over the bare
underlay (the ceiling). For each run: the whole machine's busy CPU (/proc/stat), and for
the tunnel each process's user and system time (/proc/<pid>/stat), per data packet, and
the two iperf3 processes' (this process's children: getrusage).
Then the C work a packet needs at least, timed alone on one core: the sender's XOR,
Poly1305 and wipe, the receiver's Poly1305 and XOR (the workers' own calls).
Run from the repository root: .venv/bin/python bench/results/prof-2026-12-06-otp/cpu_budget.py
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from rich.console import Console

from bench.otp import OtpNet
from dataplane import poly1305, wire
from dataplane.tun import MAX_MTU

HZ = os.sysconf("SC_CLK_TCK")
PKT = 64 * 1024


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / HZ, sum(f[:8]) / HZ


def proc_cpu(pid: str) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return int(f[11]) / HZ, int(f[12]) / HZ


def c_work(n: int = 2000) -> dict:
    """The library calls of one 64 KiB packet, each end, pads read from a 256 MiB array
    (cold, as from a ring)."""
    size = MAX_MTU + wire.MAC_KEY_LEN
    ring = np.random.default_rng(1).integers(0, 256, 256 << 20, dtype=np.uint8)
    buf = np.zeros(wire.MAX_DATAGRAM + 64, np.uint8)
    body = buf[32:32 + MAX_MTU]
    out = {}
    for side in ("sender", "receiver"):
        t = time.perf_counter()
        for i in range(n):
            off = (i * size) % (len(ring) - size)
            pad = ring[off:off + size]
            if side == "sender":
                np.bitwise_xor(body, pad[32:], out=body)
                poly1305.tag_into(pad.ctypes.data, buf.ctypes.data, 32 + MAX_MTU,
                                  buf.ctypes.data + 32 + MAX_MTU)
                pad[:] = 0
            else:
                poly1305.tag_into(pad.ctypes.data, buf.ctypes.data, 32 + MAX_MTU,
                                  buf.ctypes.data + 32 + MAX_MTU + 16)
                np.bitwise_xor(body, pad[32:], out=body)
        out[side] = (time.perf_counter() - t) / n * 1e6
    return out


def main(rounds: int = 3) -> dict:
    net = OtpNet(Console(stderr=True), capacity="1GiB", mode="proposed", workers=2)
    res = {"rounds": [], "c_work_us": None}
    try:
        net.up()
        net.set_mtu(MAX_MTU)
        pids = {p: n for n in "AB" for p in subprocess.run(
            ["ip", "netns", "pids", net.ns(n)], capture_output=True, text=True).stdout.split()}
        for _ in range(rounds):
            net.fill()
            m0, p0, c0 = machine_busy(), {p: proc_cpu(p) for p in pids}, net.counters()
            k0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = net.iperf("A", "B", 1.5)
            k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            m1, p1, c1 = machine_busy(), {p: proc_cpu(p) for p in pids}, net.counters()
            pk = c1[("A", "A-B")]["tx_pkts"] - c0[("A", "A-B")]["tx_pkts"]
            acks = c1[("B", "A-B")]["tx_pkts"] - c0[("B", "A-B")]["tx_pkts"]
            procs = {f"{pids[p]}:{p}": {"user_us": round((p1[p][0] - p0[p][0]) / pk * 1e6, 1),
                                        "sys_us": round((p1[p][1] - p0[p][1]) / pk * 1e6, 1)}
                     for p in pids if sum(p1[p]) - sum(p0[p]) > 0.05}
            tunnel = {"gbps": r["gbps"], "packets": pk, "acks": acks,
                      "machine_busy_us_per_packet": round((m1[0] - m0[0]) / pk * 1e6, 1),
                      "workers": procs,
                      "iperf3_user_us": round((k1.ru_utime - k0.ru_utime) / pk * 1e6, 1),
                      "iperf3_sys_us": round((k1.ru_stime - k0.ru_stime) / pk * 1e6, 1)}
            b0, k0 = machine_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
            b = net.iperf_bare(("A", "B"), 1.5, 1, MAX_MTU)
            b1, k1 = machine_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
            bpk = b["bytes"] / PKT
            bare = {"gbps": b["gbps"],
                    "machine_busy_us_per_64KiB": round((b1[0] - b0[0]) / bpk * 1e6, 1),
                    "iperf3_us_per_64KiB": round((k1.ru_utime + k1.ru_stime - k0.ru_utime
                                                  - k0.ru_stime) / bpk * 1e6, 1)}
            res["rounds"].append({"tunnel": tunnel, "bare": bare})
            print(json.dumps(res["rounds"][-1]), file=sys.stderr)
    finally:
        net.down()
    res["c_work_us"] = {k: round(v, 1) for k, v in c_work().items()}
    return res


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3), indent=1))
