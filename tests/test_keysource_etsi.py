"""The ETSI GS QKD 014 key source (control/lkm/source_etsi.py).

Pure parts driven directly: the config, the KeyIds note on the authenticated channel, the
Status check, the follower's note queue, the backoff (the requests and the answers' checks
are api.etsi's: tests/test_api_etsi.py). Then end to end:
a qkdnet network (two nodes, emulated link, global key managers, key APIs over HTTPS
with mutual TLS) stands in for the two QKD devices, and the two ends of a second link run
their key managers inside the device nodes' namespaces with ETSI sources pointing at
those key APIs; both rings agree byte for byte, also across a device API killed mid-run.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from api.etsi import BadAnswer, key_container
from bench.etsi import link_config, serve_link_end
from control.core import paths
from control.core.config import ConfigError, EmulatorSource, Etsi014Source, parse_topology
from control.lkm.messages import (
    MAX_KEYS_PER_NOTE,
    FrameCodec,
    KeyIds,
    ProtocolError,
    decode,
    encode,
)
from control.lkm.source_etsi import (
    GROW_AFTER,
    WINDOW_BLOCKS,
    Backoff,
    BatchSize,
    EtsiLeaderSource,
    NoteQueue,
    RecentIds,
    Refusal,
    batch_blocks,
    check_status,
    device_max_per_request,
    join_keys,
    on_refusal,
    split_blocks,
)
from control.tools import emulation
from dataplane.ring import KeyRing
from tests.nsutil import InNetns, wait_until

# ---- config ---------------------------------------------------------------------------

TOPO = """
[network]
name = "etsi"
prefix = "et"
[[nodes]]
name = "A"
[[nodes]]
name = "B"
[[links]]
a = "A"
b = "B"
underlay = ["10.9.1.1/30", "10.9.1.2/30"]
{extra}
"""
SOURCE = ('source = {{ kind = "etsi014", keys_per_call = {n}, key_size = {size}, '
          'a = {{ kme = "{kme}", sae_id = "{sa}", cert = "a.crt", key = "a.key", '
          'ca = "ca.crt" }}, b = {{ kme = "https://10.0.0.2:8443", sae_id = "lb", '
          'cert = "/etc/b.crt", key = "/etc/b.key", ca = "/etc/ca.crt" }} }}')


def _topo(extra: str = "", *, n: int = 16, size: int = 8192, kme: str = "https://kme-a:443",
          sa: str = "la"):
    return parse_topology(TOPO.format(extra=SOURCE.format(n=n, size=size, kme=kme, sa=sa)
                                      + "\n" + extra), "/cfg/etsi.toml")


def _problems(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        _topo(**kw)
    return str(e.value)


def test_config_an_etsi_link_with_its_block_from_its_keys():
    lk = _topo().links[0]
    assert isinstance(lk.source, Etsi014Source)
    assert lk.block_size == 16 * 8192 // 8  # keys_per_call keys are one block
    assert lk.source.a.kme == "https://kme-a:443" and lk.source.b.sae_id == "lb"
    assert lk.source.poll_interval_ms == 100 and lk.source.timeout_s == 10
    # A table without a kind is still the emulator (older files), an explicit one too.
    plain = parse_topology(TOPO.format(extra='source = { generator = "aes-ctr" }'))
    assert isinstance(plain.links[0].source, EmulatorSource)


@pytest.mark.parametrize("kw,words", [
    ({"kme": "http://kme-a:80"}, "must be an https:// URL"),
    ({"kme": "https://kme-a:443/x?y=1"}, "must not have a query"),
    ({"kme": "https://:443"}, "must be an https:// URL with a host"),
    ({"kme": "https://kme-a:99999"}, "not a URL"),
    ({"sa": "lb"}, "each end is its own SAE"),
    ({"sa": "l b"}, "links[0].source.etsi014.a.sae_id"),
    ({"size": 100}, "multiple of 8 bits"),
    ({"n": 0}, "greater than or equal to 1"),
    ({"n": MAX_KEYS_PER_NOTE + 1}, f"less than or equal to {MAX_KEYS_PER_NOTE}"),
    ({"n": 1, "size": 8}, "1 B per block, must be between 32 B and 16 MiB"),
    ({"n": 1024, "size": 8 * (1 << 20)}, "must be between 32 B and 16 MiB"),
    ({"extra": 'block_size = "64KiB"'}, "links[0].block_size: 65536 B, but each enc_keys"),
])
def test_config_mistakes_are_refused_with_the_field(kw, words):
    assert words in _problems(**kw)


def test_the_readme_example_is_a_valid_link_source():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme[readme.index("[links.source]\n"):]
    topo = parse_topology(TOPO.format(extra=block[:block.index("```")]))
    src = topo.links[0].source
    assert isinstance(src, Etsi014Source) and topo.links[0].block_size == 32 * 256 // 8
    assert src.b.kme.startswith("https://") and src.a.ca == Path("pki/device-ca.crt")


def test_config_unknown_kind_and_missing_end():
    text = TOPO.format(extra='source = { kind = "usb" }')
    with pytest.raises(ConfigError, match="unknown key source kind"):
        parse_topology(text)
    text = TOPO.format(extra='source = { kind = "etsi014", a = { kme = "https://x", '
                             'sae_id = "s", cert = "c", key = "k", ca = "ca" } }')
    with pytest.raises(ConfigError, match=r"source\.etsi014\.b: required field is missing"):
        parse_topology(text)


# ---- the note on the agreement channel --------------------------------------------------

def test_key_ids_travel_authenticated_and_bad_ones_are_refused():
    auth = secrets.token_bytes(32)
    n1, n2 = secrets.token_bytes(16), secrets.token_bytes(16)
    leader, follower = FrameCodec(auth, b"L", n1, n2), FrameCodec(auth, b"F", n2, n1)
    ids = tuple(str(uuid.uuid4()) for _ in range(MAX_KEYS_PER_NOTE))
    note = KeyIds((2**63 - 1, 7), ids)
    wire = leader.seal(note)
    assert follower.feed(wire[:100]) == [] and follower.feed(wire[100:]) == [note]
    tampered = bytearray(leader.seal(KeyIds((1, 8), ids[:1])))
    tampered[30] ^= 1  # inside a key ID
    with pytest.raises(ProtocolError, match="authentication"):
        follower.feed(bytes(tampered))
    mtype, payload = encode(KeyIds((1, 2), ids[:2]))
    for bad, words in [(payload[:-1], "length"), (payload + b"x", "length"),
                       (payload[:16] + b"\x00\x00", "0 keys"),
                       (payload[:-36] + b"z" * 36, "not a UUID"),
                       (payload[:-36] + "é".encode() * 18, "malformed")]:
        with pytest.raises(ProtocolError, match=words):
            decode(mtype, bad)
    with pytest.raises(ValueError):
        encode(KeyIds((1, 2), ("not-a-uuid",)))
    with pytest.raises(ValueError):
        encode(KeyIds((1, 2), ()))


# ---- the device's Status, one block from the keys -------------------------------------

def test_status_limits_against_the_config():
    doc = {"max_key_per_request": 128, "max_key_size": 1024, "min_key_size": 64}
    assert check_status(doc, 128, 256) == []
    assert check_status({"stored_key_count": 3}, 4096, 8) == []  # limits not given
    problems = check_status(doc, 129, 2048)
    assert len(problems) == 2 and "at most 128 keys" in problems[0]
    assert "smallest is 64" in check_status(doc, 1, 8)[0]
    assert check_status([], 1, 8) == ["the device's Status answer is not a JSON object"]


def test_a_block_is_its_keys_one_after_the_other():
    assert join_keys([b"ab", b"", b"cde"]) == bytearray(b"abcde")


def test_one_call_fetches_as_many_whole_blocks_as_window_and_device_allow():
    assert batch_blocks(8, 32, 32, 1024) == 8        # the window's room
    assert batch_blocks(3, 32, 32, 1024) == 3        # what is wanted
    assert batch_blocks(min(8, 2), 32, 32, 1024) == 2  # the config's most
    assert batch_blocks(8, 32, 32, 100) == 3         # whole blocks the device allows
    assert batch_blocks(8, 32, 32, None) == 1        # limit unknown: one block
    assert batch_blocks(8, 16, 1 << 16, 1024) == 8   # 8 MiB a call
    assert batch_blocks(8, 16, 1 << 18, 1024) == 4   # 16 MiB a call at most
    assert batch_blocks(8, 32, 1 << 20, 1024) == 1   # a block of 32 MiB alone
    assert batch_blocks(8, 32, 32, 31) == batch_blocks(0, 32, 32, 1024) == 1
    assert device_max_per_request({"max_key_per_request": 128}) == 128
    assert [device_max_per_request(d) for d in ({}, [], {"max_key_per_request": True},
                                                 {"max_key_per_request": 0})] == [None] * 4
    keys = [bytes([i]) * 2 for i in range(6)]
    assert split_blocks(keys, 3) == [bytearray(b"\0\0\1\1\2\2"), bytearray(b"\3\3\4\4\5\5")]


# ---- follower's notes, backoff, repeated IDs ---------------------------------------------

def _note(epoch: int, seq: int) -> KeyIds:
    return KeyIds((epoch, seq), (str(uuid.uuid4()),))


def test_note_queue_in_order_once_and_not_too_old():
    q = NoteQueue(max_age=5.0, size=3)
    assert q.add(_note(1, 0), 0.0) and q.add(_note(1, 2), 0.0)
    assert not q.add(_note(1, 2), 0.1) and not q.add(_note(1, 1), 0.1)  # repeats, old
    assert q.refused == 2
    assert q.add(_note(9, 0), 1.0)  # the leader restarted: a new epoch
    head = q.head(1.0)
    assert head.note.block == (1, 0)
    q.pop(head)
    assert q.head(5.5).note.block == (9, 0)  # (1, 2) was older than 5 s: dropped
    assert q.expired == 1
    for s in range(1, 5):
        q.add(_note(9, s), 6.0)
    assert len(q) == 3 and q.overflow == 2 and q.head(6.0).note.block == (9, 2)


def test_a_batch_is_the_notes_in_order_up_to_one_whose_keys_may_be_gone():
    q = NoteQueue(max_age=5.0)
    for seq in range(5):
        q.add(_note(1, seq), 0.0)
    assert [i.note.block[1] for i in q.batch(1.0, 3)] == [0, 1, 2]
    q.batch(1.0, 5)[3].lost = True  # a dec_keys call with its keys got no answer
    assert [i.note.block[1] for i in q.batch(1.0, 8)] == [0, 1, 2]
    for item in q.batch(1.0, 3):
        q.pop(item)
    assert [i.note.block[1] for i in q.batch(1.0, 8)] == [3]  # asked for alone
    assert q.batch(9.0, 8) == [] and q.expired == 2


def test_a_refused_batch_is_asked_for_note_by_note_and_only_a_lost_note_is_skipped():
    assert on_refusal(3, 400, lost=False) == on_refusal(3, 400, True) == Refusal.ONE_BY_ONE
    assert on_refusal(1, 400, lost=False) == Refusal.WAIT  # the device lags
    assert on_refusal(1, 400, lost=True) == Refusal.SKIP   # an unanswered call took them
    assert on_refusal(1, 401, lost=False) == on_refusal(4, 403, True) == Refusal.FAIL


class InstantDevice:
    """The leader's device without HTTPS, for the window logic alone: answers Status and
    enc_keys at once from a stock of keys (503 when it holds fewer than asked)."""

    url, retried, reconnected = "https://device", False, False

    def __init__(self, stock: int, key_bytes: int):
        self.stock, self.key_bytes, self.asked = stock, key_bytes, []

    def call(self, call):
        if call.path.endswith("/status"):
            return 200, json.dumps({"max_key_per_request": 1024}).encode()
        number = json.loads(call.body)["number"]
        self.asked.append(number)
        if number > self.stock:
            return 503, json.dumps({"message": "not enough key"}).encode()
        self.stock -= number
        ids = [str(uuid.uuid4()) for _ in range(number)]
        return 200, key_container(ids, [secrets.token_bytes(self.key_bytes)] * number)


def _leader(stock: int) -> EtsiLeaderSource:
    src = EtsiLeaderSource("E", _topo(n=32, size=256).links[0].source, Path("/cfg"))
    src.device = InstantDevice(stock, 32)  # type: ignore[assignment]
    return src


def test_the_leader_never_has_more_blocks_out_than_its_window():
    src = _leader(stock=1 << 20)
    src.on_agreement(True, 0)
    first = src.fetch()
    assert len(first) == WINDOW_BLOCKS  # one call
    src.on_agreement(True, 0)  # they are on their way to the queue: counted all the same
    assert src.fetch() == [] and src.device.asked == [WINDOW_BLOCKS * 32]
    with src._cond:  # queued, then taken by the key manager: undecided
        src._queue.extend(first)
        src.queued(len(first))
    src.on_agreement(True, 0)
    assert src.fetch() == []
    src._queue.clear()
    src.on_agreement(True, WINDOW_BLOCKS - 3)  # 3 decided
    assert len(src.fetch()) == 3 and src.device.asked[-1] == 3 * 32
    assert [b for b, _ in first] == [(src.epoch, s) for s in range(WINDOW_BLOCKS)]


def test_a_device_short_of_key_for_a_batch_is_asked_for_fewer_blocks_at_once():
    src = _leader(stock=100)  # keys: enough for 3 blocks of 32, not for 8
    src.on_agreement(True, 0)
    got = []
    for _ in range(5):
        got += src.fetch()
    # halved at each 503, and not grown again at the next answer
    assert src.device.asked == [256, 128, 64, 64, 32] and len(got) == 3
    assert src.stats()["no_key"] == 0  # no backoff wait on the way down
    assert src.stats()["asked_fewer"] == 3


def test_the_batch_size_halves_at_a_503_and_grows_only_after_a_run_of_answers():
    size = BatchSize(8)
    size.refused(8)
    assert size.most == 4
    for _ in range(GROW_AFTER):
        size.answered()
        assert size.most == 4
    for want in (5, 6, 7, 8, 8):
        size.answered()
        assert size.most == want
    size.refused(2)
    assert size.most == 1


def test_a_device_holding_one_block_at_a_time_is_not_asked_for_two_every_other_call():
    src = _leader(stock=32)
    src.on_agreement(True, 0)
    got = []
    for _ in range(60):
        blocks = src.fetch()
        got += blocks
        src.queued(len(blocks))  # queued, read by the key manager and decided at once
        src.device.stock = 32  # its key comes one block at a time
        src.on_agreement(True, 0)
    fewer = src.stats()["asked_fewer"]
    assert len(got) == 60 - fewer  # every call but the 503s brought one block
    # one 503 per GROW_AFTER answers, where growing after each answer gave one per answer
    assert fewer <= 60 // GROW_AFTER + 3, src.device.asked
    # ... and after a run of answers it asks for two again: a device with more key
    # would give more
    assert src.device.asked.count(64) >= fewer - 3


def test_backoff_doubles_to_its_cap_and_starts_over():
    b = Backoff(0.1, 0.5)
    assert not b.failing
    assert [b.fail() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert b.failing
    b.reset()
    assert b.fail() == 0.1


def test_a_key_id_seen_before_is_refused():
    r = RecentIds(size=2)
    r.add(["a", "b"])
    with pytest.raises(BadAnswer, match="seen before"):
        r.check(["x", "b"])
    r.add(["c"])  # "a" falls out of the window
    r.check(["a"])


# ---- end to end: qkdnet's key API as the two devices ---------------------------------------

GKM = """block_size = "1MiB"
low_watermark = "48MiB"
high_watermark = "64MiB"
window = "16MiB"
pairs = [["A", "B"]]"""
DEVICES = """
[api]
workers = 1
graceful_shutdown_s = 2
[[saes]]
id = "la"
node = "A"
[[saes]]
id = "lb"
node = "B"
"""
KEYS_PER_CALL, KEY_BITS = 16, 8 * 65536  # 1 MiB blocks
def _status(prefix: str, node: str) -> dict | None:
    try:
        return json.loads((paths.node_dir(prefix, node) / "lkm-E.json").read_text())
    except (OSError, ValueError):
        return None


def _stored(prefix: str, node: str) -> int:
    st_ = _status(prefix, node)
    return st_["key"]["bytes_stored_ab"] + st_["key"]["bytes_stored_ba"] if st_ else 0


def _kill_api(prefix: str, node: str) -> int:
    """kill -9 a device's key API: the service and its Sanic worker(s)."""
    pid = _api_pid(prefix, node)
    assert pid is not None
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for p in [pid, *map(int, kids.split())]:
        os.kill(p, signal.SIGKILL)
    return pid


def _api_pid(prefix: str, node: str) -> int | None:
    state = json.loads((paths.node_dir(prefix, node) / "state.json").read_text())
    return next((m["pid"] for m in state["modules"] if m["name"] == "api" and m["alive"]),
                None)


def _ring_views(link_prefix: str, block: int) -> dict:
    """Both ends' rings, direction by direction: the range both hold, whether its bytes
    are equal, whole blocks only and never a block of zeros; a few samples."""
    out: dict = {"samples": []}
    for d in ("ab", "ba"):
        a, b = (KeyRing.attach(paths.ring_name(link_prefix, n, "E", d)) for n in ("A", "B"))
        try:
            lo = max(a.release_pos, b.release_pos)
            hi = min(a.write_pos, b.write_pos)
            x, y = a.read(lo, hi - lo), b.read(lo, hi - lo)
            out[d] = {"lo": lo, "hi": hi, "write": (a.write_pos, b.write_pos),
                      "equal": bool((x == y).all()),
                      "whole": lo % block == 0 and a.write_pos % block == 0
                      and b.write_pos % block == 0,
                      "zero_blocks": int((~x.reshape(-1, block).any(axis=1)).sum())}
            out["samples"] += [bytes(x[i:i + 16]) for i in range(0, hi - lo, 7 * block + 5)]
        finally:
            a.close()
            b.close()
    return out


@pytest.mark.netns
def test_two_link_ends_on_qkdnets_key_api_agree_and_survive_a_killed_device(tmp_path):
    from tests.test_tunnel import make_net

    dev = "t" + uuid.uuid4().hex[:7]  # the "devices": a qkdnet network with key APIs
    link = "t" + uuid.uuid4().hex[:7]  # the ETSI-sourced link's rings and status files
    block = KEYS_PER_CALL * KEY_BITS // 8
    ends: dict[str, InNetns] = {}
    t0 = time.monotonic()
    try:
        topo, _ = make_net(tmp_path, dev, two=True, gkm=GKM, key_rate=300, extra=DEVICES)
        t_up = time.monotonic() - t0
        (tmp_path / "link.key").write_bytes(secrets.token_bytes(32))
        (tmp_path / "link.key").chmod(0o600)  # a secret: refused if others may read it
        cfg = tmp_path / "etsi.toml"
        cfg.write_text(link_config(link, topo, tmp_path / "link.key", keys=KEYS_PER_CALL,
                                   bits=KEY_BITS, ring="512MiB",  # more than the devices
                                   poll_ms=50))                    # supply in the test
        for node in ("A", "B"):
            (tmp_path / node).mkdir()
            ends[node] = InNetns(paths.netns_name(dev, node), serve_link_end, str(cfg), node,
                                 str(tmp_path / node), str(tmp_path / f"lkm-{node}.log"))

        # 1. Key flows: the source's rate over a few seconds.
        # (the devices' key APIs hand out their global key: on a slow, busy machine
        # their stores took over 40 s to have some)
        wait_until(lambda: _stored(link, "B") >= 4 * block, 120, "first key through ETSI 014")
        s0, m0 = _stored(link, "B"), time.monotonic()
        time.sleep(4.0)
        s1, m1 = _stored(link, "B"), time.monotonic()
        rate = (s1 - s0) * 8 / (m1 - m0) / 1e6

        # 2. Kill each device's key API mid-run (the follower's first: its dec_keys calls
        # run back to back, so one is likely cut off mid-answer); its node restarts it.
        for node in ("B", "A"):
            before = _stored(link, "B")
            old = _kill_api(dev, node)
            wait_until(lambda n=node, o=old: _api_pid(dev, n) not in (None, o), 60,
                       f"{node}'s key API restarted")
            wait_until(lambda b=before: _stored(link, "B") >= b + 8 * block, 120,
                       f"key flowing again after {node}'s device came back")
        # 3. Stop both ends (as the node would), then look at what they stored.
        for p in ends.values():
            os.kill(p.proc.pid, signal.SIGTERM)
        for p in ends.values():
            p.result(20)
        st = {n: _status(link, n) for n in ("A", "B")}
        rings = _ring_views(link, block)
    finally:
        for p in ends.values():
            p.kill()
        for n in ("A", "B"):  # kept for a post-mortem
            (tmp_path / f"lkm-{n}.json").write_text(json.dumps(_status(link, n)))
        emulation.net_down(dev)
        emulation.net_down(link)
    stats = {n: st[n]["source"]["stats"] for n in st}
    print(f"\nETSI 014 source: {rate:.0f} Mb/s ({block >> 20} MiB blocks of {KEYS_PER_CALL} "
          f"x {KEY_BITS // 8 >> 10} KiB keys); devices up in {t_up:.1f} s, whole test "
          f"{time.monotonic() - t0:.1f} s; sources {stats}")
    assert rate > 1
    # Both device failures were seen and got over without a new agreement session: a call
    # while the key API was down failed (device error), or, when the end made none then,
    # its next call found the kept-alive connection closed and went on a new one.
    for n in ("A", "B"):
        assert stats[n]["device_errors"] + stats[n]["reconnects"] >= 1, stats
    # The follower named several notes' keys per dec_keys call (the leader's calls also
    # count its asks for fewer blocks when the devices ran short of key: unit-tested).
    assert stats["B"]["blocks"] > stats["B"]["calls"], stats
    assert st["A"]["agreement"]["resyncs"] == st["B"]["agreement"]["resyncs"] == 1
    # Both ends hold the same bytes at the same positions, whole blocks only, none empty.
    for d in ("ab", "ba"):
        r = rings[d]
        assert r["hi"] - r["lo"] >= 8 * block, r
        assert r["equal"] and r["whole"] and r["zero_blocks"] == 0, r
        assert abs(r["write"][0] - r["write"][1]) <= 8 * block, r  # at most a last Decide
    for n in ("A", "B"):
        assert (st[n]["key"]["bytes_stored_ab"] + st[n]["key"]["bytes_stored_ba"]) % block == 0
    # No key byte in the key managers' logs.
    logs = (tmp_path / "lkm-A.log").read_text() + (tmp_path / "lkm-B.log").read_text()
    assert "device" in logs
    for sample in rings["samples"]:
        assert sample.hex() not in logs and base64.b64encode(sample).decode()[:20] not in logs


def test_no_emulator_for_a_link_fed_by_a_device(tmp_path):
    """`net up` starts no emulator for such a link, and one started by hand refuses."""
    import subprocess

    from tests.nsutil import QKDCTL

    path = tmp_path / "etsi.toml"
    path.write_text(TOPO.format(extra=SOURCE.format(n=16, size=8192, kme="https://kme-a:443",
                                                    sa="la")))
    res = subprocess.run([QKDCTL, "emulator", "run", "--config", str(path), "--link", "A-B"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "takes its key from 'etsi014'" in res.stderr
