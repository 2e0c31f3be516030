"""`qkdctl pki init`: the certificates the key API's mutual TLS needs.

One private CA per network; per node a server certificate (its name and node address as
subject alternative names, for the HTTPS key API); per SAE a client certificate whose
subject Common Name is the SAE ID: the key API takes the SAE ID from that field of the
verified client certificate, and from nowhere else.

The CA's private key is not among the nodes' files: it goes to a directory of its own
(default ``<DIR>-ca`` beside the PKI directory ``DIR``), which no node reads, so that it
can be moved offline; whoever holds it can mint any SAE's identity. The nodes read only
``DIR`` (the CA certificate, their own certificate and key).

Keys are ECDSA P-256: small, fast TLS handshakes, and what every TLS 1.2+ client speaks.
Private keys are written with mode 0600, certificates 0644, directories 0700, each file
whole (a temporary file, then rename); nothing is overwritten unless asked (``force``),
which also narrows the modes of what is there already. ``issue_missing`` (`qkdctl pki
issue`) adds the certificates of nodes and SAEs new to the topology under the CA already
there, and touches no other: one more SAE needs no new CA (a node or SAE that lost its
key or its certificate gets both anew, the one left replaced).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.core.config import Topology
from dataplane.private import NotPrivateError, private_dir, write_private

VALID_DAYS = 825  # the longest validity common TLS clients accept for a leaf


class PkiError(Exception):
    """The PKI was not (re)written; the message says why and what to do."""


def default_ca_dir(root: Path) -> Path:
    """Where the CA key goes unless told: beside the PKI directory, not inside it."""
    return root.parent / f"{root.name}-ca"


@dataclass(frozen=True)
class PkiLayout:
    root: Path
    ca_dir: Path | None = None  # the CA key's directory; default: default_ca_dir(root)

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return (self.ca_dir or default_ca_dir(self.root)) / "ca.key"

    @property
    def legacy_ca_key(self) -> Path:
        """Where an older version kept the CA key: among the nodes' files."""
        return self.root / "ca.key"

    def node(self, name: str) -> tuple[Path, Path]:
        return self.root / "nodes" / f"{name}.crt", self.root / "nodes" / f"{name}.key"

    def sae(self, sae_id: str) -> tuple[Path, Path]:
        return self.root / "saes" / f"{sae_id}.crt", self.root / "saes" / f"{sae_id}.key"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()), 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_private(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _own_dir(path: Path, force: bool) -> Path:
    """A 0700 directory of ours; with ``force`` an existing one of ours is narrowed to
    0700 whatever its mode, and the private keys in it to 0600."""
    if force and path.is_dir() and not path.is_symlink() and \
            path.stat().st_uid == os.geteuid():
        os.chmod(path, 0o700)
        for f in path.iterdir():
            if f.suffix == ".key":  # through a descriptor that is the file itself: a link
                with contextlib.suppress(OSError):  # swapped in meanwhile is not followed
                    fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        if stat.S_ISREG(os.fstat(fd).st_mode):
                            os.fchmod(fd, 0o600)
                    finally:
                        os.close(fd)
    try:
        return private_dir(path)
    except NotPrivateError as e:
        raise PkiError(f"{e} (--force narrows the modes of a directory of this user)"
                       ) from None


def _name(cn: str, network: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"qkdnet {network}"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int,
             until: dt.datetime | None = None) -> x509.CertificateBuilder:
    """``days`` of validity, ending no later than ``until`` (the issuing CA's end)."""
    now = dt.datetime.now(dt.UTC)
    end = now + dt.timedelta(days=days)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(min(end, until) if until else end))


def init_pki(root: Path, topo: Topology, force: bool = False, days: int = VALID_DAYS,
             ca_dir: Path | None = None) -> PkiLayout:
    """Write a CA (its key in ``ca_dir``, default :func:`default_ca_dir`), one server
    certificate per node and one client certificate per SAE."""
    lay = PkiLayout(Path(root), Path(ca_dir) if ca_dir is not None else None)
    if lay.ca_key.parent.resolve().is_relative_to(lay.root.resolve()):
        raise PkiError(f"the CA key would be among the nodes' files in {lay.root}: give "
                       f"--ca-dir another directory (default {default_ca_dir(lay.root)})")
    held = [p for p in (lay.ca_cert, lay.ca_key, lay.legacy_ca_key) if p.exists()]
    if held and not force:
        raise PkiError(f"{lay.root} already holds a CA ({held[0]}); keep it, or pass "
                       f"--force to replace every certificate and key in it")
    if not topo.saes:
        raise PkiError(f"{topo.path} names no SAEs: add [[saes]] entries (id, node)")
    for d in (lay.root, lay.root / "nodes", lay.root / "saes", lay.ca_key.parent):
        _own_dir(d, force)
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
    _write_cert(lay.ca_key.parent / "ca.crt", ca)  # with its key, to issue more later
    lay.legacy_ca_key.unlink(missing_ok=True)

    _issue_leaves(lay, topo, ca, ca_key, days, topo.nodes, [s.id for s in topo.saes])
    return lay


def _issue_leaves(lay: PkiLayout, topo: Topology, ca: x509.Certificate,
                  ca_key: ec.EllipticCurvePrivateKey, days: int, nodes: Iterable[str],
                  saes: Iterable[str]) -> None:
    """A server certificate per node of ``nodes`` and a client certificate per SAE of
    ``saes``, signed by ``ca``; none outlives the CA."""
    def leaf(cn: str, usage, sans: list[x509.GeneralName] | None) -> tuple[x509.Certificate,
                                                                          ec.EllipticCurvePrivateKey]:
        key = _key()
        b = (_builder(_name(cn, topo.name), ca.subject, key.public_key(), days,
                      ca.not_valid_after_utc)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    for name in nodes:
        node = topo.nodes[name]
        cert, key = leaf(node.name, ExtendedKeyUsageOID.SERVER_AUTH,
                         [x509.DNSName(node.name), x509.DNSName("localhost"),
                          x509.IPAddress(node.address),
                          x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))])
        crt, k = lay.node(node.name)
        _write_key(k, key)
        _write_cert(crt, cert)
    for sae in saes:
        cert, key = leaf(sae, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        crt, k = lay.sae(sae)
        _write_key(k, key)
        _write_cert(crt, cert)


def issue_missing(root: Path, topo: Topology, days: int = VALID_DAYS,
                  ca_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """Under the CA already in ``root`` (its key in ``ca_dir``, default
    :func:`default_ca_dir`), the certificates of the nodes and SAEs of ``topo`` that
    lack one (certificate or key: both are made anew, the one left replaced); the others'
    files are left untouched, so the SAEs and nodes holding theirs go on. Returns (nodes,
    SAEs) given new ones."""
    lay = PkiLayout(Path(root), Path(ca_dir) if ca_dir is not None else None)
    if not lay.ca_cert.exists():
        raise PkiError(f"{lay.root} holds no CA ({lay.ca_cert}): make one with 'qkdctl "
                       f"pki init {lay.root} --config {topo.path}'")
    if not lay.ca_key.exists():
        raise PkiError(f"the CA key is not at {lay.ca_key}: give --ca-dir where it is kept"
                       + (f" (an older version left it at {lay.legacy_ca_key})"
                          if lay.legacy_ca_key.exists() else ""))
    try:
        ca = x509.load_pem_x509_certificate(lay.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(lay.ca_key.read_bytes(), None)
    except ValueError as e:
        raise PkiError(f"cannot read the CA: {e}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or \
            ca_key.public_key() != ca.public_key():
        raise PkiError(f"{lay.ca_key} is not the key of {lay.ca_cert}: give --ca-dir "
                       f"where this CA's key is kept")
    nodes = [n for n in topo.nodes if not all(p.exists() for p in lay.node(n))]
    saes = [s.id for s in topo.saes if not all(p.exists() for p in lay.sae(s.id))]
    for d in (lay.root, lay.root / "nodes", lay.root / "saes"):
        _own_dir(d, False)
    _issue_leaves(lay, topo, ca, ca_key, days, nodes, saes)
    return nodes, saes


def sae_id_of(cert: x509.Certificate) -> str | None:
    """The SAE ID a verified client certificate names: its subject Common Name."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    value = cns[0].value
    return value if isinstance(value, str) else None
