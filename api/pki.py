"""`qkdctl pki init`: the certificates the key API's mutual TLS needs (module 4 groundwork).

One private CA per network; per node a server certificate (its name and node address as
subject alternative names, for the HTTPS key API); per SAE a client certificate whose
subject Common Name is the SAE ID: the key API takes the SAE ID from that field of the
verified client certificate, and from nowhere else.

Keys are ECDSA P-256: small, fast TLS handshakes, and what every TLS 1.2+ client speaks.
Private keys are written with mode 0600 and never overwritten unless asked (``force``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.config import Topology

VALID_DAYS = 825  # the longest validity common TLS clients accept for a leaf


class PkiError(Exception):
    """The PKI was not (re)written; the message says why and what to do."""


@dataclass(frozen=True)
class PkiLayout:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    def node(self, name: str) -> tuple[Path, Path]:
        return self.root / "nodes" / f"{name}.crt", self.root / "nodes" / f"{name}.key"

    def sae(self, sae_id: str) -> tuple[Path, Path]:
        return self.root / "saes" / f"{sae_id}.crt", self.root / "saes" / f"{sae_id}.key"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, network: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"qkdnet {network}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int
             ) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def init_pki(root: Path, topo: Topology, force: bool = False, days: int = VALID_DAYS
             ) -> PkiLayout:
    """Write a CA, one server certificate per node and one client certificate per SAE."""
    lay = PkiLayout(Path(root))
    if lay.ca_key.exists() and not force:
        raise PkiError(f"{lay.root} already holds a CA ({lay.ca_key}); keep it, or pass "
                       f"--force to replace every certificate and key in it")
    if not topo.saes:
        raise PkiError(f"{topo.path} names no SAEs: add [[saes]] entries (id, node)")
    ca_key = _key()
    ca_name = _name(f"qkdnet {topo.name} CA", topo.name)
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), days)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    _write_key(lay.ca_key, ca_key)
    _write_cert(lay.ca_cert, ca)

    def leaf(cn: str, usage, sans: list[x509.GeneralName] | None) -> tuple[x509.Certificate,
                                                                          ec.EllipticCurvePrivateKey]:
        key = _key()
        b = (_builder(_name(cn, topo.name), ca_name, key.public_key(), days)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    for node in topo.nodes.values():
        cert, key = leaf(node.name, ExtendedKeyUsageOID.SERVER_AUTH,
                         [x509.DNSName(node.name), x509.DNSName("localhost"),
                          x509.IPAddress(node.address),
                          x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))])
        crt, k = lay.node(node.name)
        _write_key(k, key)
        _write_cert(crt, cert)
    for sae in topo.saes:
        cert, key = leaf(sae.id, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        crt, k = lay.sae(sae.id)
        _write_key(k, key)
        _write_cert(crt, cert)
    return lay


def sae_id_of(cert: x509.Certificate) -> str | None:
    """The SAE ID a verified client certificate names: its subject Common Name."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    value = cns[0].value
    return value if isinstance(value, str) else None
