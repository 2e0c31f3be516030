"""Who may speak on the global key relay: the ZAP decision (pure), the key files, and real
CurveZMQ sockets on loopback configured as the key manager configures them."""

from __future__ import annotations

import os
import stat
import time

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from bench.topology import line, network, render
from control.gkm.relay_auth import (
    DOMAIN,
    ZAP_ENDPOINT,
    ZAP_VERSION,
    secure_dealer,
    secure_router,
    zap_reply,
)
from control.gkm.relay_keys import (
    RelayKeyError,
    load_relay_keys,
    public_path,
    secret_path,
    write_relay_keys,
)
from dataplane.limits import MAX_RELAY_FRAME

KEY_A = bytes(range(32))
ORIGINS = {KEY_A: ("A", "10.88.0.1")}


def request(key: bytes = KEY_A, address: bytes = b"10.88.0.1", mechanism: bytes = b"CURVE",
            domain: bytes = DOMAIN) -> list[bytes]:
    return [ZAP_VERSION, b"7", domain, address, b"", mechanism, key]


# ---- the ZAP decision ---------------------------------------------------------------------

def test_an_origins_key_from_its_address_is_admitted_as_that_node():
    d = zap_reply(request(), ORIGINS)
    assert d.node == "A" and d.reply == [ZAP_VERSION, b"7", b"200", b"OK", b"A", b""]


@pytest.mark.parametrize("frames,words", [
    (request(key=bytes(32)), "a key of no node that sends here"),
    (request(address=b"10.88.0.2"), "not from its node address"),
    (request(mechanism=b"NULL"), "without a CURVE key"),
    (request(mechanism=b"PLAIN")[:-1] + [b"A", b"secret"], "without a CURVE key"),
    (request(key=KEY_A[:31]), "without a CURVE key"),
    (request(domain=b"other"), "is not the relay's"),
    ([ZAP_VERSION, b"7"], "malformed"),
    ([b"2.0", *request()[1:]], "malformed"),
    ([], "malformed"),
])
def test_everything_else_is_refused_with_the_reason(frames, words):
    d = zap_reply(frames, ORIGINS)
    assert d.node is None and words in d.reason
    assert d.reply[0] == ZAP_VERSION and d.reply[2] in (b"400", b"500")
    assert d.reply[1] == (frames[1] if len(frames) > 1 else b"")  # libzmq matches it
    assert d.reply[4] == b""  # no User-Id


# ---- key files ----------------------------------------------------------------------------

def test_keys_are_written_private_and_read_back(tmp_path):
    d = tmp_path / "relay-keys"
    assert write_relay_keys(d, ["A", "B", "C"]) == ["A", "B", "C"]
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    a = load_relay_keys(d, "A", ["B", "C"])
    b = load_relay_keys(d, "B", ["A"])
    assert a.peers["B"] == b.public and b.peers["A"] == a.public
    assert zmq.curve_public(a.secret) == a.public
    assert a.raw_peers()[z85.decode(b.public)] == "B"
    # ZeroMQ's own tools read them (the layout of zmq.auth.create_certificates).
    assert zmq.auth.load_certificate(secret_path(d, "A")) == (a.public, a.secret)
    assert zmq.auth.load_certificate(public_path(d, "A")) == (a.public, None)
    # Only missing keys are made again, unless forced.
    assert write_relay_keys(d, ["A", "B", "C", "D"]) == ["D"]
    assert load_relay_keys(d, "A", []).public == a.public
    write_relay_keys(d, ["A"], force=True)
    assert load_relay_keys(d, "A", []).public != a.public


def test_a_peers_public_key_others_could_replace_is_refused(tmp_path):
    write_relay_keys(tmp_path, ["A", "B"])
    assert load_relay_keys(tmp_path, "A", ["B"]).peers["B"]
    os.chmod(public_path(tmp_path, "B"), 0o664)  # a group could put its own key there
    with pytest.raises(RelayKeyError, match=r"B.key .*mode 0664.*could be changed by others"):
        load_relay_keys(tmp_path, "A", ["B"])
    os.chmod(public_path(tmp_path, "B"), 0o644)
    os.chmod(tmp_path, 0o777)  # ... or replace the file in its directory
    try:
        with pytest.raises(RelayKeyError, match="a directory of mode 0777.*chmod go-w"):
            load_relay_keys(tmp_path, "A", ["B"])
    finally:
        os.chmod(tmp_path, 0o700)
    assert load_relay_keys(tmp_path, "A", ["B"]).peers["B"]


def test_keys_made_by_zmq_auth_are_read_too(tmp_path):
    pub, sec = zmq.auth.create_certificates(str(tmp_path), "A")
    os.chmod(sec, 0o600)
    zmq.auth.create_certificates(str(tmp_path), "B")
    keys = load_relay_keys(tmp_path, "A", ["B"])
    assert (keys.public, keys.secret) == zmq.auth.load_certificate(sec)


def test_bad_key_files_are_refused_with_what_to_do(tmp_path):
    write_relay_keys(tmp_path, ["A", "B"])
    with pytest.raises(RelayKeyError, match="C.key is missing.*qkdctl keys init"):
        load_relay_keys(tmp_path, "A", ["C"])
    os.chmod(secret_path(tmp_path, "A"), 0o644)
    with pytest.raises(RelayKeyError, match="mode 0644.*chmod 600"):
        load_relay_keys(tmp_path, "A", ["B"])
    os.chmod(secret_path(tmp_path, "A"), 0o600)
    b_secret = secret_path(tmp_path, "B").read_bytes()
    a_public = public_path(tmp_path, "A").read_bytes()
    # B's secret key under A's public key: the pair does not match.
    text = b_secret.replace(b_secret.split(b'public-key = "')[1][:40],
                            a_public.split(b'public-key = "')[1][:40])
    secret_path(tmp_path, "A").write_bytes(text)
    with pytest.raises(RelayKeyError, match="does not belong to the secret key"):
        load_relay_keys(tmp_path, "A", ["B"])
    public_path(tmp_path, "B").write_bytes(b'metadata\ncurve\n    public-key = "short"\n')
    secret_path(tmp_path, "A").write_bytes(b_secret)
    with pytest.raises(RelayKeyError, match="B.key: public-key is not 40 Z85"):
        load_relay_keys(tmp_path, "A", ["B"])
    public_path(tmp_path, "B").write_bytes(b"nothing here\n")
    with pytest.raises(RelayKeyError, match="no public-key"):
        load_relay_keys(tmp_path, "A", ["B"])
    secret_path(tmp_path, "A").unlink()
    os.symlink(secret_path(tmp_path, "B"), secret_path(tmp_path, "A"))
    with pytest.raises(RelayKeyError, match="cannot read"):  # never through a link
        load_relay_keys(tmp_path, "A", [])


# ---- real CurveZMQ sockets, set up as the key manager sets them up ------------------------

class Server:
    """Node B's relay ROUTER and its ZAP handler, served from one poll loop (as gkm.py)."""

    def __init__(self, keys, admitted: dict[bytes, tuple[str, str]]):
        self.ctx = zmq.Context()
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.bind(ZAP_ENDPOINT)
        self.router = self.ctx.socket(zmq.ROUTER)
        secure_router(self.router, keys)
        self.router.setsockopt(zmq.LINGER, 0)
        self.port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.admitted = admitted
        self.refused: list[str] = []

    def pump(self, seconds: float, until: int = 0) -> list[tuple[str, list[bytes]]]:
        """(User-Id, frames) of what arrives within ``seconds`` (or once ``until`` did)."""
        got: list[tuple[str, list[bytes]]] = []
        poller = zmq.Poller()
        poller.register(self.zap, zmq.POLLIN)
        poller.register(self.router, zmq.POLLIN)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and len(got) >= until):
            for sock, _ in poller.poll(50):
                if sock is self.zap:
                    d = zap_reply(self.zap.recv_multipart(), self.admitted)
                    self.zap.send_multipart(d.reply)
                    if d.node is None:
                        self.refused.append(d.reason)
                else:
                    frames = self.router.recv_multipart(copy=False)
                    got.append((frames[1].get("User-Id"), [f.bytes for f in frames[1:]]))
                    self.router.send_multipart([frames[0], b"answer"])
        return got

    def close(self) -> None:
        self.zap.close(0)
        self.router.close(0)
        self.ctx.term()


def _dealer(ctx: zmq.Context, port: int, keys=None, server: str = "B",
            raw: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        secure_dealer(s, keys, server)
    elif raw is not None:  # (server key, own public, own secret): a forger's own choice
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = raw
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


@pytest.fixture
def keys(tmp_path):
    write_relay_keys(tmp_path, ["A", "B", "C"])
    return {n: load_relay_keys(tmp_path, n, [p for p in "ABC" if p != n]) for n in "ABC"}


def test_only_an_admitted_origin_is_heard_and_it_is_named_by_its_key(keys):
    b = keys["B"]
    server = Server(b, {z85.decode(b.peers["A"]): ("A", "127.0.0.1")})
    ctx = zmq.Context()
    try:
        # C has a valid key of this network but sends nothing to B; a forger has B's
        # public key and a key of its own; another speaks without CURVE.
        c = _dealer(ctx, server.port, keys["C"])
        forger = _dealer(ctx, server.port, raw=(b.public, *zmq.curve_keypair()))
        plain = _dealer(ctx, server.port)
        for s in (c, forger, plain):
            s.send_multipart([b"QKGK forged", b"x"])
        a = _dealer(ctx, server.port, keys["A"])
        a.send_multipart([b"QKGK genuine", b"y"])
        got = server.pump(10, until=1)
        got += server.pump(1.5)  # anything the others might still get through
        assert got == [("A", [b"QKGK genuine", b"y"])]
        assert any("a key of no node that sends here" in r for r in server.refused)
        assert a.poll(5000) and a.recv_multipart() == [b"answer"]  # the reply comes back
        for s in (c, forger, plain):
            assert not s.poll(0)
    finally:
        ctx.destroy(0)
        server.close()


def test_an_origin_never_talks_to_a_server_without_the_destinations_key(keys):
    """A process that binds the destination's port (say, after its key manager died) with
    another key, or without CURVE, hears nothing and can answer nothing."""
    for impostor in (keys["C"], None):
        ctx = zmq.Context()
        fake = ctx.socket(zmq.ROUTER)
        fake.setsockopt(zmq.LINGER, 0)
        if impostor is not None:
            fake.curve_server = True
            fake.curve_secretkey = impostor.secret
        port = fake.bind_to_random_port("tcp://127.0.0.1")
        a = _dealer(ctx, port, keys["A"])  # expects B's key
        a.send_multipart([b"QKGK reserve"])
        try:
            assert not fake.poll(2000), "the impostor received a message"
        finally:
            ctx.destroy(0)


def test_a_frame_over_the_cap_drops_the_connection_and_nothing_arrives(keys):
    b = keys["B"]
    server = Server(b, {z85.decode(b.peers["A"]): ("A", "127.0.0.1")})
    ctx = zmq.Context()
    try:
        a = _dealer(ctx, server.port, keys["A"])
        a.send_multipart([b"QKGK", bytes(MAX_RELAY_FRAME)])  # over the cap, with CURVE's
        assert server.pump(3) == []                          # overhead
        a.send_multipart([b"QKGK", bytes(MAX_RELAY_FRAME - 1024)])  # the largest block fits
        got = server.pump(20, until=1)
        assert [(u, len(f[1])) for u, f in got] == [("A", MAX_RELAY_FRAME - 1024)]
    finally:
        ctx.destroy(0)
        server.close()


def test_qkdctl_keys_init_makes_a_pair_per_node_that_keeps_global_key(tmp_path):
    from typer.testing import CliRunner

    from control.tools.cli import app

    cfg = tmp_path / "net.toml"
    cfg.write_text(render(network("t", "tt", gkm={"pairs": [["A", "B"]]}),
                          line("ABC", 9, source=None)))
    d = tmp_path / "relay-keys"
    r = CliRunner().invoke(app, ["keys", "init", str(d), "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "new keys for A, B " in " ".join(r.output.split())
    assert "set [gkm] keys" in " ".join(r.output.split())  # not taken for markup
    assert sorted(p.name for p in d.iterdir()) == ["A.key", "A.key_secret", "B.key",
                                                   "B.key_secret"]  # C keeps none
    first = load_relay_keys(d, "A", ["B"]).public
    r = CliRunner().invoke(app, ["keys", "init", str(d), "--config", str(cfg)])
    assert "no node" in " ".join(r.output.split())
    assert load_relay_keys(d, "A", ["B"]).public == first
    r = CliRunner().invoke(app, ["keys", "init", str(d), "--config", str(cfg), "--force"])
    assert r.exit_code == 0 and load_relay_keys(d, "A", ["B"]).public != first
