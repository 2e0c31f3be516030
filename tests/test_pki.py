"""`qkdctl pki init`: the chain verifies, the SAE ID is the client certificate's CN, and a
real mutual-TLS handshake (Python's ssl, over a socket pair) accepts exactly the SAEs."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from api.pki import PkiError, init_pki, sae_id_of
from control.core.config import load_topology
from control.tools.cli import app

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def pki(tmp_path):
    topo = load_topology(EXAMPLES / "triangle.toml")
    return topo, init_pki(tmp_path / "pki", topo)


def load(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def test_chain_names_and_key_modes(pki):
    topo, lay = pki
    ca = load(lay.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for node in topo.nodes.values():
        crt, key = lay.node(node.name)
        cert = load(crt)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert node.address in san.get_values_for_type(x509.IPAddress)
        assert ExtendedKeyUsageOID.SERVER_AUTH in \
            cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for sae in topo.saes:
        crt, key = lay.sae(sae.id)
        cert = load(crt)
        cert.verify_directly_issued_by(ca)
        assert sae_id_of(cert) == sae.id
        assert ExtendedKeyUsageOID.CLIENT_AUTH in \
            cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(lay.ca_key.stat().st_mode) == 0o600


def test_an_existing_ca_is_kept_unless_forced(pki, tmp_path):
    topo, lay = pki
    before = lay.ca_cert.read_bytes()
    with pytest.raises(PkiError, match="already holds a CA"):
        init_pki(lay.root, topo)
    assert lay.ca_cert.read_bytes() == before
    init_pki(lay.root, topo, force=True)
    assert lay.ca_cert.read_bytes() != before


def _handshake(lay, client_cert: tuple[Path, Path] | None, node: str = "A"):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.load_cert_chain(*lay.node(node))
    server.load_verify_locations(lay.ca_cert)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(lay.ca_cert))
    client.check_hostname = True
    if client_cert:
        client.load_cert_chain(*client_cert)
    a, b = socket.socketpair()
    result: dict = {}

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as s:
                der = s.getpeercert(binary_form=True)
                result["sae"] = sae_id_of(x509.load_der_x509_certificate(der))
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as e:
            result["error"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client.wrap_socket(b, server_hostname=node) as c:
            c.recv(2)
    except (ssl.SSLError, OSError) as e:
        result.setdefault("client_error", e)
    t.join(10)
    return result


def test_mutual_tls_accepts_an_sae_and_refuses_no_certificate(pki, tmp_path):
    topo, lay = pki
    assert _handshake(lay, lay.sae("SAE-A")) == {"sae": "SAE-A"}
    assert "error" in _handshake(lay, None)  # no client certificate: refused
    # A certificate from another CA (another network's PKI) is refused too.
    other = init_pki(tmp_path / "other", topo)
    assert "error" in _handshake(lay, other.sae("SAE-A"))


def test_cli_pki_init(tmp_path):
    r = CliRunner().invoke(app, ["pki", "init", str(tmp_path / "p"), "--config",
                                 str(EXAMPLES / "triangle.toml")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "saes" / "SAE-A.crt").exists()
    r = CliRunner().invoke(app, ["pki", "init", str(tmp_path / "p"), "--config",
                                 str(EXAMPLES / "triangle.toml")])
    assert r.exit_code == 1 and "already holds a CA" in r.output


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_ca_key_stays_out_of_the_files_nodes_read(pki, tmp_path):
    from api.server import server_context

    topo, lay = pki
    root = tmp_path / "pki"
    assert sorted(p.name for p in root.iterdir()) == ["ca.crt", "nodes", "saes"]
    assert lay.ca_key == tmp_path / "pki-ca" / "ca.key" and _mode(lay.ca_key) == 0o600
    for d in (root, root / "nodes", root / "saes", lay.ca_key.parent):
        assert _mode(d) == 0o700
    assert _mode(lay.ca_cert) == 0o644 and _mode(lay.node("A")[0]) == 0o644
    server_context(root, "A")  # a node needs nothing of the CA's but its certificate
    with pytest.raises(PkiError, match="among the nodes' files"):
        init_pki(root, topo, force=True, ca_dir=root)
    with pytest.raises(PkiError, match="among the nodes' files"):  # inside the tree too
        init_pki(root, topo, force=True, ca_dir=root / "nodes")
    other = init_pki(tmp_path / "p2", topo, ca_dir=tmp_path / "offline")
    assert other.ca_key == tmp_path / "offline" / "ca.key" and other.ca_key.exists()
    assert not (tmp_path / "p2-ca").exists()


def test_force_narrows_modes_and_moves_an_old_ca_key_out(pki, tmp_path):
    topo, lay = pki
    root = lay.root
    key = lay.sae("SAE-A")[1]
    for p in (root, root / "saes", lay.ca_key.parent):
        os.chmod(p, 0o775)
    os.chmod(key, 0o644)
    legacy = root / "ca.key"  # where an older version kept it
    legacy.write_bytes(lay.ca_key.read_bytes())
    with pytest.raises(PkiError, match="already holds a CA"):
        init_pki(root, topo)
    r = CliRunner().invoke(app, ["pki", "init", str(root), "--config",
                                 str(EXAMPLES / "triangle.toml"), "--force"])
    assert r.exit_code == 0, r.output
    assert not legacy.exists()
    for p in (root, root / "saes", lay.ca_key.parent):
        assert _mode(p) == 0o700
    assert _mode(key) == 0o600 and _mode(lay.ca_key) == 0o600


def test_issue_adds_a_new_saes_certificate_under_the_same_ca_and_keeps_the_rest(pki, tmp_path):
    """Adding one SAE used to need 'pki init --force': a new CA, and every SAE holding
    its certificate then got 401. 'pki issue' signs only what is missing."""
    from api.pki import issue_missing
    from control.core.config import parse_topology

    topo, lay = pki
    kept = {p: p.read_bytes() for p in [lay.ca_cert, lay.ca_key, *lay.sae("SAE-A"),
                                        *lay.node("A")]}
    text = (EXAMPLES / "triangle.toml").read_text() + '\n[[saes]]\nid = "SAE-D"\nnode = "B"\n'
    bigger = parse_topology(text, tmp_path / "t.toml")
    lay.node("C")[1].unlink()  # a node's key lost: its pair is issued again
    nodes, saes = issue_missing(lay.root, bigger)
    assert (nodes, saes) == (["C"], ["SAE-D"])
    assert {p: p.read_bytes() for p in kept} == kept
    crt, key = lay.sae("SAE-D")
    assert sae_id_of(load(crt)) == "SAE-D" and _mode(key) == 0o600
    load(crt).verify_directly_issued_by(load(lay.ca_cert))
    assert load(crt).not_valid_after_utc <= load(lay.ca_cert).not_valid_after_utc
    assert _handshake(lay, lay.sae("SAE-D"), node="C") == {"sae": "SAE-D"}
    assert issue_missing(lay.root, bigger) == ([], [])  # nothing missing: nothing made


def test_issue_needs_the_cas_own_key(pki, tmp_path):
    from api.pki import issue_missing

    topo, lay = pki
    with pytest.raises(PkiError, match="holds no CA"):
        issue_missing(tmp_path / "nothing", topo)
    with pytest.raises(PkiError, match="CA key is not at"):
        issue_missing(lay.root, topo, ca_dir=tmp_path / "elsewhere")
    other = init_pki(tmp_path / "other", topo)
    with pytest.raises(PkiError, match="is not the key of"):
        issue_missing(lay.root, topo, ca_dir=other.ca_key.parent)


def test_cli_pki_issue(pki):
    topo, lay = pki
    lay.sae("SAE-C")[0].unlink()
    r = CliRunner().invoke(app, ["pki", "issue", str(lay.root), "--config",
                                 str(EXAMPLES / "triangle.toml")])
    assert r.exit_code == 0, r.output
    assert "new certificates for SAE SAE-C" in r.output and lay.sae("SAE-C")[0].exists()
