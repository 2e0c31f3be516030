"""Per-stage syscall latency of running OTP workers, from bcc probes (`qkdctl profile`).

The workers' own counters (dataplane/stats.py) say how long each step of a packet takes
on average; these probes say why: which syscall waits, how its latency is spread, and how
much of a worker's time is spent outside syscalls or switched out. The probes attach to
running processes by pid, so a node is profiled as it runs, with no restart.

Only :class:`Profiler` needs bcc (imported when it runs); the rest is pure.
"""

from __future__ import annotations

import ctypes as ct
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path

SOURCE = Path(__file__).with_name("profile.c")
STAGES = ("other_syscalls", "tun_read", "tun_write", "udp_send", "udp_recv", "poll_wait",
          "key_wait")  # index = stage id in the BPF program; 0 is the default
USER_STAGE = len(STAGES)  # histogram of the gaps between syscalls (user space)
SYSCALL_STAGES = {  # syscall number -> stage, per architecture (what the worker calls)
    "x86_64": {19: "tun_read", 1: "tun_write", 44: "udp_send", 45: "udp_recv",
               7: "poll_wait", 271: "poll_wait", 230: "key_wait"},
    "aarch64": {65: "tun_read", 64: "tun_write", 206: "udp_send", 207: "udp_recv",
                73: "poll_wait", 115: "key_wait"},
}
TOTALS = ("user_ns", "user_count", "offcpu_ns", "offcpu_in_syscall_ns", "offcpu_in_user_ns",
          "offcpu_runnable_ns", "oncpu_ns")  # the C's T_* indices, in order
TICK_S = 0.1


class ProfileError(RuntimeError):
    pass


def slot_range(slot: int) -> tuple[int, int]:
    """Inclusive µs range of a log2 slot (bcc's bpf_log2l of whole µs): slot 0 holds
    latencies under 1 µs, slot s >= 1 holds [2^(s-1), 2^s - 1] µs."""
    return (0, 0) if slot == 0 else (1 << (slot - 1), (1 << slot) - 1)


def log2_buckets(slots: dict[int, int]) -> list[list[int]]:
    """[[lo_us, hi_us, count], ...] from the first to the last non-empty slot, empty slots
    between them included (as bcc's print_log2_hist shows them)."""
    used = [s for s, n in slots.items() if n]
    if not used:
        return []
    return [[*slot_range(s), slots.get(s, 0)] for s in range(min(used), max(used) + 1)]


def stage_table(machine: str | None = None) -> dict[int, int]:
    """Syscall number -> stage id for this machine's syscall numbers."""
    arch = machine or platform.machine()
    if arch not in SYSCALL_STAGES:
        raise ProfileError(f"no syscall table for {arch} (known: {', '.join(SYSCALL_STAGES)})")
    return {nr: STAGES.index(st) for nr, st in SYSCALL_STAGES[arch].items()}


class Profiler:
    """bcc probes on the syscalls and context switches of a set of processes (tgids)."""

    def __init__(self, pids: Iterable[int]):
        self.pids = sorted(set(pids))
        if not self.pids:
            raise ProfileError("no worker processes to profile")

    def _load(self):
        try:
            from bcc import BPF
        except ImportError as e:
            raise ProfileError(f"bcc is not importable ({e}): install python3-bpfcc and "
                               "link it into the venv (scripts/link-bcc.sh)") from None
        cflags = [f"-DNSTAGES={len(STAGES)}", f"-DUSER_STAGE={USER_STAGE}"]
        try:
            return BPF(text=SOURCE.read_text(), cflags=cflags)
        except Exception as e:  # bcc raises bare Exception on compile/load failure
            raise ProfileError(f"could not load the probe program: {e}") from None

    def run(self, seconds: float, on_start: Callable[[], None] | None = None,
            tick: Callable[[float], None] | None = None) -> dict:
        """Probe for ``seconds``; ``on_start`` runs once the probes are attached (the
        window opens), ``tick(elapsed)`` every TICK_S. Always detaches."""
        b = self._load()
        try:
            for nr, stage in stage_table().items():
                b["stage_of"][ct.c_uint32(nr)] = ct.c_uint32(stage)
            for pid in self.pids:
                b["workers"][ct.c_uint32(pid)] = ct.c_uint8(1)
            for tp in ("sys_enter", "sys_exit", "sched_switch"):
                b.attach_raw_tracepoint(tp=tp, fn_name=f"on_{tp}")
            t0 = time.monotonic()
            if on_start:
                on_start()
            while (elapsed := time.monotonic() - t0) < seconds:
                if tick:
                    tick(elapsed)
                time.sleep(min(TICK_S, max(0.0, seconds - elapsed)))
            for tp in ("sys_enter", "sys_exit", "sched_switch"):  # freeze the maps
                b.detach_raw_tracepoint(tp=tp)
            window = time.monotonic() - t0
            return self._read(b, window)
        finally:
            b.cleanup()

    def _read(self, b, window: float) -> dict:
        def per_cpu_sums(name: str, n: int) -> list[int]:
            t = b[name]
            return [int(sum(t[ct.c_int(i)])) for i in range(n)]

        ns = per_cpu_sums("stage_ns", len(STAGES))
        cnt = per_cpu_sums("stage_cnt", len(STAGES))
        slots: dict[int, dict[int, int]] = {}
        for k, v in b["hist"].items():
            slots.setdefault(k.stage, {})[k.slot] = int(v.value)
        totals = dict(zip(TOTALS, per_cpu_sums("totals", len(TOTALS)), strict=True))
        per_worker = {int(k.value): {"oncpu_ns": int(v.on_ns), "offcpu_ns": int(v.off_ns)}
                      for k, v in b["cpu_time"].items()}
        return {
            "seconds": window, "pids": self.pids,
            "stages": {st: {"count": cnt[i], "total_ns": ns[i],
                            "hist": log2_buckets(slots.get(i, {}))}
                       for i, st in enumerate(STAGES)},
            "user": {"count": totals["user_count"], "total_ns": totals["user_ns"],
                     "hist": log2_buckets(slots.get(USER_STAGE, {}))},
            **{k: totals[k] for k in TOTALS if k not in ("user_ns", "user_count")},
            "per_worker": per_worker,
        }
