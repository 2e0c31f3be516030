"""`qkdctl demo` (issue 3/6 stage): the paper's three nodes, local key flowing into every
ring, OTP tunnels and routes, global key filling every pair's stores, and one exchange of
keys through the key API."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live

from control import emulation
from control.config import Topology
from control.status import collect, render


def wait_for_key(topo: Topology, timeout: float) -> bool:
    """True once every link end has agreed and stored key in both directions."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = collect(topo)
        ok = all(st and st["agreement"]["synced"] and st["key"]["bytes_stored_ab"] > 0
                 and st["key"]["bytes_stored_ba"] > 0
                 for n in snap["nodes"].values() for st in n["links"].values())
        if ok:
            return True
        time.sleep(0.2)
    return False


def _usable(snap: dict, origin: str, dest: str) -> int:
    g = snap["nodes"][origin].get("gkm") or {}
    enc = (g.get("peers", {}).get(dest) or {}).get("enc") or {}
    return enc.get("usable", 0)


def run_demo(topo: Topology, seconds: float, console: Console) -> int:
    console.print(f"[bold]qkdnet demo[/bold]: network {topo.name!r} — {len(topo.nodes)} nodes "
                  f"in namespaces, {len(topo.links)} emulated QKD links")
    emulation.net_down(topo.prefix)  # a previous run that crashed leaves nothing behind
    try:
        emulation.net_up(topo)
        console.print("namespaces, veth underlay, emulators and nodes started; waiting for "
                      "key agreement on every link ...")
        if not wait_for_key(topo, 20.0):
            console.print("[red]key did not reach every ring within 20 s[/red]")
            console.print(render(collect(topo)))
            return 1
        end = time.monotonic() + seconds
        with Live(render(collect(topo)), console=console, refresh_per_second=4,
                  transient=True) as live:
            while time.monotonic() < end:
                time.sleep(0.25)
                live.update(render(collect(topo)))
        snap = collect(topo)
        console.print(render(snap))
        total = sum(st["key"]["bytes_stored_ab"] + st["key"]["bytes_stored_ba"]
                    for n in snap["nodes"].values() for st in n["links"].values() if st)
        console.print(f"summary: {total / (1 << 20):,.0f} MiB of local key sorted into rings "
                      f"across {len(topo.links)} links, every link end in agreement")
        pairs = topo.gkm.pairs
        if pairs:
            usable = {(o, d): _usable(snap, o, d) for o, d in pairs}
            filled = sum(1 for v in usable.values() if v > 0)
            console.print(f"global key: {sum(usable.values()) / (1 << 20):,.0f} MiB usable "
                          f"in {filled} of {len(pairs)} ordered pairs (each relayed through "
                          f"the OTP tunnels and acknowledged by its destination)")
            if filled < len(pairs):
                console.print("[red]some pairs hold no global key yet[/red]")
                return 1
        return key_api(topo, console)
    finally:
        removed = emulation.net_down(topo.prefix)
        console.print(f"teardown: removed {len(removed)} objects; nothing left behind")


def _call(pki: str, sae: str, host: str, port: int, method: str, path: str,
          body: bytes = b"") -> tuple[int, dict]:
    import orjson

    from api.client import Conn, client_context

    c = Conn(host, port, client_context(pki, sae))
    try:
        status, data = c.request(method, path, body)
        return status, orjson.loads(data)
    finally:
        c.close()


def key_api(topo: Topology, console: Console) -> int:
    """One master SAE asks its node's KME for keys shared with an SAE at another node,
    which fetches them from its own KME; then asks again (refused: one delivery)."""
    import json

    from api.client import run_in_netns
    from control import paths

    pair = next(((m, s) for m in topo.saes for s in topo.saes if m.node != s.node), None)
    if pair is None:
        return 0
    master, slave = pair
    pki, port = str(topo.api.pki), topo.ports.api

    def call(sae, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        host = str(topo.node(sae.node).address)
        r = run_in_netns(paths.netns_name(topo.prefix, sae.node),
                         [(_call, (pki, sae.id, host, port, method, path, body))], 30)[0]
        return r if isinstance(r, tuple) else (0, {"message": r})

    base = "/api/v1/keys"
    deadline = time.monotonic() + 30
    while (st := call(master, "GET", f"{base}/{slave.id}/status"))[0] != 200:
        if time.monotonic() > deadline:
            console.print(f"[red]key API at {master.node} not answering: {st}[/red]")
            return 1
        time.sleep(0.5)
    status, enc = call(master, "POST", f"{base}/{slave.id}/enc_keys",
                       json.dumps({"number": 2, "size": 256}).encode())
    ids = [k["key_ID"] for k in enc.get("keys", [])]
    dec_path = f"{base}/{master.id}/dec_keys?key_ID={ids[0] if ids else ''}"
    status2, dec = call(slave, "POST", f"{base}/{master.id}/dec_keys",
                        json.dumps({"key_IDs": [{"key_ID": k} for k in ids]}).encode())
    again = call(slave, "GET", dec_path)
    same = status == status2 == 200 and dec.get("keys") == enc.get("keys")
    console.print(f"key API (ETSI GS QKD 014, HTTPS with mutual TLS): {master.id} at "
                  f"{master.node} got {len(ids)} keys of 256 bits for {slave.id} "
                  f"({st[1]['stored_key_count']:,} such keys stored); {slave.id} fetched "
                  f"them from {slave.node}'s KME: "
                  + ("identical" if same else "[red]not identical[/red]")
                  + f"; asking again: {again[0]} ({again[1].get('message', '')})")
    return 0 if same and again[0] == 400 else 1
