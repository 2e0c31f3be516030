"""iperf3 TCP between two network namespaces: the one load generator of every bench that
measures a path (through the OTP tunnel, over the bare underlay, over a scratch veth)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time


class IperfError(Exception):
    """iperf3 failed or never answered; the message names the path."""


class IperfHung(IperfError):
    """The client never finished (seen rarely on a loaded machine); worth a retry."""


def parse(out: str, what: str) -> dict:
    """Rate, bytes, time and retransmits from an iperf3 ``-J`` report; its error raised."""
    data = json.loads(out or "{}")
    if "error" in data:
        raise IperfError(f"iperf3 {what}: {data['error']}")
    s = data["end"]["sum_received"]
    return {"gbps": s["bits_per_second"] / 1e9, "bytes": s["bytes"], "seconds": s["seconds"],
            "retransmits": data["end"]["sum_sent"].get("retransmits", 0)}


def once(src_ns: str, src: str, dst_ns: str, dst: str, seconds: float,
         streams: int = 1) -> dict:
    """One run from ``src`` (in ``src_ns``) to ``dst`` (in ``dst_ns``), with a fresh
    one-shot server; raises IperfHung when the client does not finish in time."""
    what = f"{src}->{dst}"
    server = subprocess.Popen(["ip", "netns", "exec", dst_ns, "iperf3", "-s", "-1", "-B", dst],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                res = subprocess.run(["ip", "netns", "exec", src_ns, "iperf3", "-c", dst,
                                      "-B", src, "-t", str(seconds), "-P", str(streams), "-J"],
                                     capture_output=True, text=True, timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                raise IperfHung(f"iperf3 {what} hung") from None
            try:
                return parse(res.stdout, what)
            except IperfError as e:
                if "connect" not in str(e):
                    raise
                time.sleep(0.1)  # the server is not listening yet
        raise IperfError(f"iperf3 server at {dst} in {dst_ns} never answered")
    finally:
        with contextlib.suppress(ProcessLookupError):
            server.kill()
        server.wait(5)


def run(src_ns: str, src: str, dst_ns: str, dst: str, seconds: float, streams: int = 1,
        on_hang=lambda attempt: None) -> dict:
    """:func:`once`, run again with a fresh server when it hangs, three times at most."""
    for attempt in range(3):
        try:
            return once(src_ns, src, dst_ns, dst, seconds, streams)
        except IperfHung:
            on_hang(attempt)
    raise IperfError(f"iperf3 {src}->{dst} hung three times")
