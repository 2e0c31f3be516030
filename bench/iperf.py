"""iperf3 TCP between two network namespaces: the one load generator of every bench that
measures a path (through the OTP tunnel, over the bare underlay, over a scratch veth).

One iperf3 process drives all its streams from one thread (iperf3 before 3.16), so on a
machine with many cores one process can be the bottleneck before the path is: ``procs``
runs that many client/server pairs at once, each on its own port with its share of the
streams, and their reports are combined into one (``combine``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

PORT = 5201  # iperf3's own default; parallel pairs take the ports after it


class IperfError(Exception):
    """iperf3 failed or never answered; the message names the path."""


class IperfHung(IperfError):
    """The client never finished (seen rarely on a loaded machine); worth a retry."""


def parse(out: str, what: str) -> dict:
    """Rate, bytes, time and retransmits from an iperf3 ``-J`` report; its error raised.
    The rate and bytes are the receiver's; ``bytes_sent`` also counts what was still in
    flight when the sender stopped (megabytes on a fast path: a run by byte count is
    long enough for that not to matter)."""
    data = json.loads(out or "{}")
    if "error" in data:
        raise IperfError(f"iperf3 {what}: {data['error']}")
    s, sent = data["end"]["sum_received"], data["end"]["sum_sent"]
    return {"gbps": s["bits_per_second"] / 1e9, "bytes": s["bytes"], "seconds": s["seconds"],
            "retransmits": sent.get("retransmits", 0), "bytes_sent": sent.get("bytes", 0)}


def split(streams: int, procs: int) -> list[int]:
    """``streams`` shared among ``procs`` processes as evenly as it goes (the first ones
    take one more); a process never runs without a stream."""
    if streams < 1 or procs < 1:
        raise ValueError("streams and procs must be at least 1")
    procs = min(procs, streams)
    return [streams // procs + (i < streams % procs) for i in range(procs)]


def combine(reports: list[dict]) -> dict:
    """One report of several processes' that ran at once: the bytes summed over the
    longest one's time (a process that finished early does not count its rate over time
    it did not run), retransmits summed; each process's rate kept in ``procs_gbps``."""
    if len(reports) == 1:
        return reports[0]
    nbytes = sum(r["bytes"] for r in reports)
    seconds = max(r["seconds"] for r in reports)
    return {"gbps": nbytes * 8 / seconds / 1e9 if seconds > 0 else 0.0, "bytes": nbytes,
            "seconds": seconds, "retransmits": sum(r["retransmits"] for r in reports),
            "bytes_sent": sum(r.get("bytes_sent", 0) for r in reports),
            "procs_gbps": [round(r["gbps"], 3) for r in reports]}


def _client(src_ns: str, src: str, dst: str, port: int, streams: int, end: list[str],
            timeout: float, what: str) -> dict:
    """One client run against its server on ``port``; retried while that server is not
    listening yet."""
    for _ in range(50):
        try:
            res = subprocess.run(["ip", "netns", "exec", src_ns, "iperf3", "-c", dst,
                                  "-B", src, "-p", str(port), *end, "-P", str(streams),
                                  "-J"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise IperfHung(f"iperf3 {what} hung") from None
        try:
            return parse(res.stdout, what)
        except IperfError as e:
            if "connect" not in str(e):
                raise
            time.sleep(0.1)  # the server is not listening yet
    raise IperfError(f"iperf3 server at {dst} port {port} never answered")


def once(src_ns: str, src: str, dst_ns: str, dst: str, seconds: float,
         streams: int = 1, procs: int = 1, nbytes: int | None = None) -> dict:
    """One run from ``src`` (in ``src_ns``) to ``dst`` (in ``dst_ns``), with fresh one-shot
    servers, ``procs`` client/server pairs at once; for ``seconds``, or until ``nbytes``
    were sent when given (shared among the pairs as the streams are: a run whose path
    spends key then spends a known amount, whatever its rate; ``seconds`` is then only
    what the run may take). Raises IperfHung when a client does not finish within
    ``seconds`` + 30 s."""
    what = f"{src}->{dst}"
    shares = split(streams, procs)
    ports = [PORT + i for i in range(len(shares))]
    servers = [subprocess.Popen(["ip", "netns", "exec", dst_ns, "iperf3", "-s", "-1",
                                 "-B", dst, "-p", str(p)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for p in ports]
    try:
        def go(i: int) -> dict:
            end = (["-n", str(max(1, nbytes * shares[i] // streams))] if nbytes
                   else ["-t", str(seconds)])
            return _client(src_ns, src, dst, ports[i], shares[i], end, seconds + 30, what)

        if len(shares) == 1:
            return go(0)
        with ThreadPoolExecutor(len(shares)) as pool:
            return combine(list(pool.map(go, range(len(shares)))))
    finally:
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                server.kill()
        for server in servers:
            server.wait(5)


def run(src_ns: str, src: str, dst_ns: str, dst: str, seconds: float, streams: int = 1,
        on_hang=lambda attempt: None, procs: int = 1, nbytes: int | None = None) -> dict:
    """:func:`once`, run again with fresh servers when it hangs, three times at most."""
    for attempt in range(3):
        try:
            return once(src_ns, src, dst_ns, dst, seconds, streams, procs, nbytes)
        except IperfHung:
            on_hang(attempt)
    raise IperfError(f"iperf3 {src}->{dst} hung three times")
