"""Topology configuration: one TOML file describes a whole QKD network.

Read and validated once, at the edge (pydantic), into frozen typed objects that inner code
takes. Every mistake is reported with the file, the field and what is wrong, all at once,
and nothing starts while any remain.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from control.core import paths
from control.core.sizing import (
    HEARTBEAT_MAX_S,
    MAX_FIXED_SHARE,
    GkmSizes,
    LinkSizes,
    gkm_sizes,
    link_sizes,
    lsdb_estimate,
    rate_floor,
    slower_share,
)
from dataplane.limits import (
    CONVENTIONAL_MTU,
    KEEPALIVE_MAX_S,
    MAX_API_KEY_BYTES,
    MAX_API_WORKERS,
    MAX_BLOCK_SIZE,
    MAX_GLOBAL_BLOCK,
    MAX_KEYS_PER_NOTE,
    MAX_PATHS,
    MAX_RELAY_BLOCKS,
    MAX_RING_CAPACITY,
    MAX_SAE_IDS,
    MAX_STORE,
    MAX_WORKERS,
    MIN_BLOCK_SIZE,
    MIN_CHUNK,
    MIN_GLOBAL_BLOCK,
    MIN_MTU,
)
from dataplane.tun import MAX_MTU

NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,7}")
PREFIX_RE = paths.PREFIX_RE
LINK_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,17}")
MAX_KEY_RATE_MBPS = 1e6  # a QKD link gives at most about 100 Mb/s; the emulator, more
# An SAE ID, wherever one is read (topology, the key API, the relay, the take socket):
# printable, no separator any record or message format of ours uses.
SAE_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
SAE_ID_PATTERN = f"^{SAE_ID_RE.pattern}$"  # the same, for a model field
_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30,
          "KB": 1000, "MB": 1000**2, "GB": 1000**3}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Accept 1048576, "1MiB", "64 KiB", "1MB"; refuse anything else with a clear reason."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 1048576 or '1MiB', got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).upper() in _UNITS:
            return int(m.group(1)) * _UNITS[m.group(2).upper()]
    raise ValueError(f"expected a size like 1048576 or '1MiB' (units B, KiB, MiB, GiB), "
                     f"got {value!r}")


def parse_ratio(value: object) -> tuple[int, int]:
    """'3:1' -> (3, 1): share of each block going a->b versus b->a."""
    if isinstance(value, str):
        parts = value.split(":")
        if len(parts) == 2 and all(p.strip().isascii() and p.strip().isdigit()
                                   for p in parts):  # ('²' is a digit to isdigit)
            a, b = (int(p) for p in parts)
            if a + b == 0:
                raise ValueError("ratio '0:0' sends key nowhere; at least one side must be > 0")
            if 0 in (a, b):
                # Every packet of a tunnel, its keepalives too, is under one-time pad from
                # its sender's ENC ring: an end given no key is silent, and its peer calls
                # the link down. A TCP stream needs its acknowledgements back, too.
                dead = "a->b" if a == 0 else "b->a"
                raise ValueError(f"ratio {value.strip()!r} gives {dead} no key: that end "
                                 f"could send nothing through the tunnel, not even the "
                                 f"keepalives that keep the link up (each is under "
                                 f"one-time pad), nor a TCP acknowledgement; give each "
                                 f"direction at least 1 (e.g. '1000:1')")
            if max(a, b) > 1000:
                raise ValueError("ratio terms must be at most 1000")
            return a, b
    raise ValueError(f"expected 'A_TO_B:B_TO_A' like '1:1' or '3:1', got {value!r}")


Size = Annotated[int, BeforeValidator(parse_size)]
Ratio = Annotated[tuple[int, int], BeforeValidator(parse_ratio)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NetworkSection(_Strict):
    name: str = Field(min_length=1, max_length=64, description="shown by status and the demo")
    prefix: str = Field(description="names namespaces, shared memory and run dirs")
    node_net: ipaddress.IPv4Network = Field(ipaddress.IPv4Network("10.88.0.0/24"),
                                            description="node addresses are taken from it")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not PREFIX_RE.fullmatch(v):
            raise ValueError("must be 2-8 lowercase letters or digits, starting with a letter")
        return v


class Ports(_Strict):
    agreement: int = Field(7001, ge=1, le=65535,
                           description="key agreement (TCP); link i uses this + i")
    tunnel: int = Field(7100, ge=1, le=65535,
                        description="OTP tunnel datagrams (UDP); per link and lane from here")
    relay: int = Field(7200, ge=1, le=65535, description="global key relay (ZeroMQ)")
    api: int = Field(8443, ge=1, le=65535, description="key API (HTTPS, mutual TLS)")


class EmulatorSource(_Strict):
    """The QKD link emulator: same random bytes to both ends at a set rate."""

    kind: Literal["emulator"] = "emulator"
    generator: Literal["urandom", "aes-ctr"] = Field(
        "urandom", description="where the emulated key comes from (aes-ctr: cheaper CPU)")


SSH_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "ssh-rsa")


def check_host_key(v: str | None) -> str | None:
    """A public host key as in known_hosts: 'ssh-ed25519 AAAA...' (a comment may follow)."""
    if v is None:
        return v
    parts = v.split()
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValueError(f"expected '<type> <base64 key>' with a type among "
                         f"{', '.join(SSH_KEY_TYPES)} (a line of the device's known_hosts "
                         f"without the host name)")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ValueError("the key is not valid base64") from None
    n = int.from_bytes(blob[:4], "big")
    if blob[4:4 + n] != parts[0].encode():
        raise ValueError(f"the key's bytes are not a {parts[0]} key")
    return v


class SftpEnd(_Strict):
    """One link end's QKD device, reached over SSH; its key files are fetched by SFTP."""

    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:\-]+$")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
    key_file: Path = Field(description="private key, OpenSSH format, no passphrase; "
                                       "relative paths: from the topology file")
    known_hosts: Path | None = Field(None, description="known_hosts file naming the device")
    host_key: str | None = Field(None, description="or the device's public host key")
    directory: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$")

    _host_key = field_validator("host_key")(check_host_key)

    @model_validator(mode="after")
    def _one_host_key(self) -> SftpEnd:
        if (self.known_hosts is None) == (self.host_key is None):
            raise ValueError("give exactly one of known_hosts and host_key (the device's "
                             "host key is always checked)")
        return self


class SftpSource(_Strict):
    """Key files fetched over SSH/SFTP from each end's own QKD device (the paper's way);
    both devices write the same files, named ``<epoch>-<seq>.key``."""

    kind: Literal["sftp"]
    a: SftpEnd
    b: SftpEnd
    poll_ms: int = Field(100, ge=10, le=60_000, description="listing period when idle")


class Etsi014End(_Strict):
    """One link end's QKD device, whose key delivery API (ETSI GS QKD 014) the node calls
    as an SAE. Relative paths are from the topology file."""

    kme: str = Field(description="the device's KME, e.g. 'https://192.0.2.7:443'")
    sae_id: str = Field(min_length=1, max_length=64, pattern=SAE_ID_PATTERN,
                        description="this node's SAE ID at its device (its certificate's CN)")
    cert: Path = Field(description="client certificate (PEM) presented to the KME")
    key: Path = Field(description="its private key (PEM)")
    ca: Path = Field(description="CA certificate(s) (PEM) the KME's certificate must chain to")

    @field_validator("kme")
    @classmethod
    def _kme(cls, v: str) -> str:
        from urllib.parse import urlsplit

        try:
            u = urlsplit(v)
            port = u.port
        except ValueError as e:
            raise ValueError(f"not a URL: {e}") from None
        if u.scheme != "https" or not u.hostname:
            raise ValueError(f"must be an https:// URL with a host (ETSI GS QKD 014 needs "
                             f"mutual TLS), got {v!r}")
        if u.query or u.fragment or u.username or u.password:
            raise ValueError("must not have a query, a fragment or user info")
        if port == 0:
            raise ValueError("port 0 is not a port")
        return v.rstrip("/")


class Etsi014Source(_Strict):
    """A QKD device per link end speaking ETSI GS QKD 014: end a calls enc_keys at its
    device naming end b's SAE ID, tells b the key IDs, b calls dec_keys at its own."""

    kind: Literal["etsi014"]
    a: Etsi014End
    b: Etsi014End
    keys_per_call: int = Field(32, ge=1, le=MAX_KEYS_PER_NOTE,
                               description="keys per block")
    key_size: int = Field(256, description="bits per key")
    blocks_per_call: int = Field(8, ge=1, le=8,
                                 description="most blocks one enc_keys or dec_keys call "
                                             "fetches (the device's max_key_per_request "
                                             "permitting); 1: one call per block")
    poll_interval_ms: int = Field(100, ge=1, le=60_000,
                                  description="first wait when the device has no key; "
                                              "doubles while it stays without")
    timeout_s: float = Field(10.0, gt=0, le=300, description="one HTTPS request's limit")

    @field_validator("key_size")
    @classmethod
    def _key_size(cls, v: int) -> int:
        if v % 8 or not 8 <= v <= 8 * MAX_BLOCK_SIZE:
            raise ValueError(f"must be a multiple of 8 bits between 8 and {8 * MAX_BLOCK_SIZE}")
        return v

    @model_validator(mode="after")
    def _whole(self) -> Etsi014Source:
        if self.a.sae_id == self.b.sae_id:
            raise ValueError(f"a.sae_id and b.sae_id are both {self.a.sae_id!r}: each end "
                             f"is its own SAE")
        if not MIN_BLOCK_SIZE <= self.block_bytes <= MAX_BLOCK_SIZE:
            raise ValueError(f"keys_per_call x key_size = {self.block_bytes} B per block, "
                             f"must be between {MIN_BLOCK_SIZE} B and "
                             f"{MAX_BLOCK_SIZE >> 20} MiB")
        return self

    @property
    def block_bytes(self) -> int:
        return self.keys_per_call * self.key_size // 8


def _source_kind(v: object) -> str | None:
    """A source's ``kind``; a table without one is the emulator (older files omit it)."""
    if isinstance(v, dict):
        return v.get("kind", "emulator")
    return getattr(v, "kind", None)


# Every kind of key source a link may name; a union discriminated by ``kind``.
SourceConfig = Annotated[
    Annotated[EmulatorSource, Tag("emulator")] | Annotated[SftpSource, Tag("sftp")]
    | Annotated[Etsi014Source, Tag("etsi014")],
    Discriminator(_source_kind, custom_error_type="source_kind",
                  custom_error_message="unknown key source kind (known: 'emulator', "
                                       "'sftp', 'etsi014')")]


def _port_problems(raw: TopologyFile) -> list[tuple[str, str]]:
    """Every port a node uses within 1-65535, and the node address's two listeners apart:
    link i's agreement is ``agreement + i``; its tunnel manager and lanes use ``tunnel``
    and the ports after it (a lane per worker, MAX_WORKERS at most)."""
    p, out = raw.ports, []
    last_agreement = p.agreement + max(0, len(raw.links) - 1)
    last_tunnel = p.tunnel + MAX_WORKERS  # lanes 0 .. MAX_WORKERS - 1 at tunnel + 1 + lane
    if last_agreement > 65535:
        out.append(("ports.agreement", f"{p.agreement} + {len(raw.links) - 1} (one port per "
                                       f"link) passes 65535"))
    if last_tunnel > 65535:
        out.append(("ports.tunnel", f"{p.tunnel} + {MAX_WORKERS} (the tunnel manager's "
                                    f"port, then one per worker lane) passes 65535"))
    if p.relay == p.api:  # both listen on the node address
        out.append(("ports.api", f"{p.api} is already ports.relay"))
    return out


def underlay_address_problem(iface: ipaddress.IPv4Interface,
                             on_a_wire: bool = False) -> str | None:
    """Why ``iface`` cannot be a link end's unicast address, if so: the kernel takes such
    an address without complaint, and the link then never comes up (the network and
    broadcast addresses of the prefix are not a host's; the others are not unicast, or
    never leave the host). ``on_a_wire``: the address goes on a veth or NIC (``net up``),
    where loopback is routed to ``lo`` and never reaches the link; two link ends on one
    host may use it (a lab, or the key manager tests)."""
    ip, net = iface.ip, iface.network
    kinds = ((ip.is_unspecified, "the unspecified address"),
             (on_a_wire and ip.is_loopback, "a loopback address (127.0.0.0/8: routed to "
                                            "lo, never onto the link)"),
             (ip.is_multicast, "a multicast address"),
             (ip.is_link_local, "a link-local address (169.254.0.0/16: the kernel's own, "
                                "for hosts without one)"),
             (ip == ipaddress.IPv4Address("255.255.255.255") or ip.is_reserved,
              "a reserved address (240.0.0.0/4), not a host's"))
    for hit, what in kinds:
        if hit:
            return f"{ip} is {what}: give each end a unicast address"
    if net.prefixlen <= 30 and ip in (net.network_address, net.broadcast_address):
        which = "network" if ip == net.network_address else "broadcast"
        return (f"{ip} is the {which} address of {net}: give each end a host address "
                f"({net[1]} - {net[-2]})")
    return None


def check_block_size(v: int | None) -> int | None:
    if v is not None and not MIN_BLOCK_SIZE <= v <= MAX_BLOCK_SIZE:
        raise ValueError(f"must be between {MIN_BLOCK_SIZE} B and {MAX_BLOCK_SIZE >> 20} MiB")
    return v


def check_ring_capacity(v: int | None) -> int | None:
    if v is not None and not 0 < v <= MAX_RING_CAPACITY:
        raise ValueError(f"must be between 1 B and {MAX_RING_CAPACITY >> 30} GiB")
    return v


class LinkDefaults(_Strict):
    key_rate_mbps: float = Field(1000.0, ge=0, le=MAX_KEY_RATE_MBPS, allow_inf_nan=False,
                                 description="0 = as fast as possible; at least what the "
                                             "keepalives and relay pings need (a few kb/s; "
                                             "check names it)")
    block_size: Size | None = Field(None, description="key block the source delivers; "
                                                      "default: 50 ms of the link's key "
                                                      "(4 KiB - 1 MiB)")
    ring_capacity: Size | None = Field(None, description="shared-memory key ring per "
                                                         "direction and link end; default: "
                                                         "2 s of the link's key (4 - 256 MiB)")
    ratio: Ratio = Field((1, 1), description="split of key a->b : b->a, each term 1-1000 "
                                             "(a direction without key could not even "
                                             "send its keepalives)")

    _block = field_validator("block_size")(check_block_size)
    _cap = field_validator("ring_capacity")(check_ring_capacity)


class DataplaneSection(_Strict):
    """The OTP tunnels (module 2): one TUN per link served by a pool of workers."""

    mode: Literal["proposed", "conventional"] = Field(
        "proposed", description="proposed: key claimed in chunks, large MTU; conventional: "
                                "key removed per packet, MTU 1500 (for comparison)")
    workers: int = Field(0, ge=0, le=MAX_WORKERS, description="per link end; 0 = cores")
    mtu: int = Field(0, ge=0, le=MAX_MTU, description="TUN MTU; 0 = largest")
    chunk_size: Size = Field(0, description="most key a worker claims from its ring at a "
                                            "time (claims follow its traffic); 0 = 10 ms "
                                            "of the link's key (4 KiB - 1 MiB)")
    key_wait_ms: int = Field(100, ge=0, le=10_000,
                             description="how long a packet may wait for key, then dropped")
    tunnel_net: ipaddress.IPv4Network = Field(ipaddress.IPv4Network("10.89.0.0/16"),
                                              description="TUN point-to-point addresses")
    guard: Literal["auto", "off", "require"] = Field(
        "auto", description="XDP guard on each underlay interface: auto = on where BPF "
                            "works (else off, said once), off, require = a node without it "
                            "does not start its tunnels")

    @field_validator("mtu")
    @classmethod
    def _mtu(cls, v: int) -> int:
        if v and v < MIN_MTU:
            raise ValueError(f"must be 0 (largest) or at least {MIN_MTU}")
        return v

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, v: int) -> int:
        if v and not MIN_CHUNK <= v <= MAX_BLOCK_SIZE:
            raise ValueError(f"must be 0 (from the key rate) or between {MIN_CHUNK} B and "
                             f"{MAX_BLOCK_SIZE >> 20} MiB")
        return v


class GkmSection(_Strict):
    """The global key manager (module 3): global key blocks kept between two watermarks
    for every ordered pair of nodes, each pair filled by its origin."""

    block_size: Size | None = Field(None, description="global key block relayed and stored; "
                                                      "default: 250 ms of the slowest "
                                                      "link's key (4 KiB - 1 MiB)")
    low_watermark: Size | None = Field(None, description="below this, the origin restocks; "
                                                         "default: half the high one")
    high_watermark: Size | None = Field(None, description="restocking stops here; default: "
                                                          "32 s of the slowest link's key "
                                                          "(1 - 64 MiB)")
    pairs: Literal["all"] | list[tuple[str, str]] = Field(
        "all", description="node pairs that keep global key; each pair in both directions")
    window: Size | None = Field(None, description="bytes per pair sent and not yet "
                                                  "acknowledged; default: 1 s of the slowest "
                                                  "link's key (2 blocks - 16 MiB); the relay "
                                                  "also paces to its path's key rate")
    keys: Path | None = Field(None, description="the relay's CURVE keys (qkdctl keys init): "
                                                "<node>.key_secret of this node, <node>.key "
                                                "of each peer (net up makes none where the "
                                                "file points); default: made by net up in "
                                                "the run dir")
    paths: int = Field(1, ge=1, le=MAX_PATHS,
                       description="node-disjoint paths per ordered pair: each block leaves "
                                   "as this many XOR shares, one per path, so no single "
                                   "relay node can learn it (1: the whole block on the "
                                   "least-cost path)")
    paths_policy: Literal["wait", "fewer"] = Field(
        "wait", description='with fewer disjoint paths up than "paths": "wait" (the '
        "default: no block is relayed with less protection than asked) sends nothing until "
        'they are back; "fewer" sends over as many as there are (one: the whole block), '
        "counting such blocks in status and metrics")

    reserve_ahead_s: float = Field(
        0.1, ge=0.0, le=10.0,
        description="for a master SAE that keeps taking keys of one size for the same "
        "slaves at least twice in this long, keys reserved at the slave's node ahead of "
        "demand, this many seconds of it (keys up to 4 KiB, at most 64 KiB per pair; "
        "cancelled after 60 s unused): a take is then one local sync and no round trip; "
        "and as many taken ahead into each key API worker's hand (keys up to 2 KiB, at "
        "most 32 KiB per pair and worker; given back when the worker stops or after 60 s "
        "unused), which answers requests without asking the key manager. 0: never")

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int | None) -> int | None:
        if v is not None and not MIN_GLOBAL_BLOCK <= v <= MAX_GLOBAL_BLOCK:
            raise ValueError(f"must be between {MIN_GLOBAL_BLOCK} B and "
                             f"{MAX_GLOBAL_BLOCK >> 20} MiB")
        return v

    @field_validator("high_watermark", "low_watermark", "window")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and not 0 < v <= MAX_STORE:
            raise ValueError(f"must be between 1 B and {MAX_STORE >> 30} GiB")
        return v


class ApiSection(_Strict):
    """The key API (module 4): ETSI GS QKD 014 over HTTPS with mutual TLS, per node."""

    workers: int = Field(0, ge=0, le=MAX_API_WORKERS,
                         description="key API worker processes per node; 0 = cores")
    key_size: int = Field(256, description="bits; the size of a key when none is asked")
    max_key_per_request: int = Field(1024, ge=1, le=MAX_RELAY_BLOCKS,
                                     description="most keys one request may ask for")
    max_sae_id_count: int = Field(8, ge=0, le=MAX_SAE_IDS,
                                  description="additional_slave_SAE_IDs per request")
    pki: Path | None = Field(None, description="certificates (qkdctl pki init: net up "
                                               "makes none where the file points); "
                                               "default: made by net up in the run dir")
    graceful_shutdown_s: float = Field(10.0, ge=1.0, le=120.0,
                                       description="requests in flight may finish this long")
    sae_requests_per_s: float = Field(
        0.0, ge=0.0, le=1e6, description="requests per second one SAE may make to its "
                                         "KME (bursts of one second's worth; beyond: 503); "
                                         "0 = no limit")
    sae_store_share: float = Field(
        1.0, gt=0.0, le=1.0, description="share of a pair's store (its high watermark) one "
                                         "SAE may take at once, refilled over "
                                         "sae_share_window_s (beyond: 503); 1 = no limit")
    sae_share_window_s: float = Field(10.0, gt=0.0, le=86400.0,
                                      description="seconds over which an SAE's share refills")
    max_connections_per_address: int = Field(
        64, ge=0, le=65535, description="connections one SAE may hold open from one "
                                        "client address at each worker (more: their first "
                                        "request is answered 503 and they are closed, "
                                        "within 15 s at most); 0 = no limit")

    @field_validator("key_size")
    @classmethod
    def _key_size(cls, v: int) -> int:
        if v % 8 or not 8 <= v <= MAX_API_KEY_BYTES * 8:
            raise ValueError(f"must be a multiple of 8 bits between 8 and "
                             f"{MAX_API_KEY_BYTES * 8}")
        return v


class Node(_Strict):
    name: str = Field(description="1-8 letters, digits or '_', starting with a letter")
    id: int | None = Field(None, ge=1, le=65535, description="default: lowest free")
    address: ipaddress.IPv4Address | None = Field(
        None, description="the node's address (tunnels, relay, API); default: from node_net")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError("must be 1-8 letters, digits or '_', starting with a letter")
        return v


class Link(_Strict):
    a: str = Field(description="node at end a (leads the key agreement)")
    b: str = Field(description="node at end b")
    name: str | None = Field(None, description='default: "<a>-<b>"')
    underlay: tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface] = Field(
        description="the two ends' underlay addresses, a's first: host addresses of one "
                    "subnet (not its network or broadcast address; not multicast, "
                    "link-local or unspecified; not loopback for net up)")
    key_rate_mbps: float | None = Field(None, ge=0, le=MAX_KEY_RATE_MBPS, allow_inf_nan=False,
                                        description="default: [defaults]")
    block_size: Size | None = Field(None, description="default: [defaults]")
    ring_capacity: Size | None = Field(None, description="default: [defaults]")
    ratio: Ratio | None = Field(None, description="default: [defaults]")
    source: SourceConfig = Field(EmulatorSource(), description="where the link's key comes "
                                                               "from")
    auth_key_file: Path | None = Field(
        None, description="32-byte key authenticating the agreement channel, a regular "
                          "file of the node's user with mode 0600 (anything else is "
                          "refused); default: made by net up")

    _block = field_validator("block_size")(check_block_size)
    _cap = field_validator("ring_capacity")(check_ring_capacity)


class Sae(_Strict):
    id: str = Field(min_length=1, max_length=64, pattern=SAE_ID_PATTERN,
                    description="the SAE ID; its certificate's CN")
    node: str = Field(description="the node whose key API it calls")


class MetricsSection(_Strict):
    """Prometheus metrics, served per node on its node address (read from the status files
    at each scrape, so nothing is counted twice and the dataplane pays nothing)."""

    enabled: bool = Field(True, description="serve /metrics on every node")
    port: int = Field(9464, ge=1, le=65535, description="on the node address")


class RoutingSection(_Strict):
    """How the routers choose each node's path over the OTP links."""

    metric: Literal["hops", "key"] = Field(
        "hops", description='"key": a link whose ENC ring runs dry costs more (the time its '
        'key rate needs to refill it) until it has refilled, so traffic goes around it; with '
        'every ring stocked it routes exactly as "hops". "hops" (the default while "key" is '
        "new: a network's rings start empty, and its first seconds' routes follow which "
        "fills first): fewest links, whatever their key")


class TopologyFile(_Strict):
    network: NetworkSection
    ports: Ports = Ports()
    defaults: LinkDefaults = LinkDefaults()
    dataplane: DataplaneSection = DataplaneSection()
    gkm: GkmSection = GkmSection()
    api: ApiSection = ApiSection()
    metrics: MetricsSection = MetricsSection()
    routing: RoutingSection = RoutingSection()
    nodes: list[Node] = Field(min_length=2)
    links: list[Link] = Field(min_length=1)
    saes: list[Sae] = []


# ---- the typed objects inner code takes -------------------------------------------------

@dataclass(frozen=True)
class LinkSpec:
    """One QKD link with every default resolved. End `a` leads the key agreement."""

    index: int
    name: str
    a: str
    b: str
    underlay_a: ipaddress.IPv4Interface
    underlay_b: ipaddress.IPv4Interface
    key_rate_mbps: float
    block_size: int
    ring_capacity: int
    ratio: tuple[int, int]
    source: SourceConfig
    auth_key_file: Path | None
    sizes: LinkSizes  # every size, those not set in the file derived from the key rate
    ring_capacity_set_in: str | None = None  # the field setting it; None: derived

    def peer_of(self, node: str) -> str:
        return self.b if node == self.a else self.a

    def underlay_of(self, node: str) -> ipaddress.IPv4Interface:
        return self.underlay_a if node == self.a else self.underlay_b


@dataclass(frozen=True)
class DataplaneSpec:
    """The dataplane settings with defaults resolved (workers and MTU made concrete)."""

    mode: str
    workers: int
    mtu: int
    chunk_size: int
    key_wait_s: float
    tunnel_net: ipaddress.IPv4Network
    guard: str = "auto"

    @property
    def conventional(self) -> bool:
        return self.mode == "conventional"

    def tunnel_addresses(self, link_index: int) -> tuple[ipaddress.IPv4Address,
                                                          ipaddress.IPv4Address]:
        """Point-to-point addresses of a link's TUN: (end a, end b), a /30 per link."""
        base = self.tunnel_net.network_address + 4 * link_index
        return base + 1, base + 2


@dataclass(frozen=True)
class GkmSpec:
    """Global key settings with the pairs resolved to ordered (origin, destination)."""

    block_size: int
    low_watermark: int
    high_watermark: int
    window: int
    pairs: tuple[tuple[str, str], ...]
    keys: Path = Path("relay-keys")  # the relay's CURVE keys (control.gkm.relay_keys)
    paths: int = 1                   # node-disjoint paths (XOR shares) per block
    paths_policy: str = "wait"       # fewer disjoint paths up: "wait" or "fewer"
    reserve_ahead_s: float = 0.1     # seconds of a pair's demand reserved ahead (0: none)
    heartbeat_s: float = 5.0         # the relay connections' ping period (sizing)
    keys_given: bool = False         # named by the file (else made by net up in the run dir)
    # Per ordered pair, with paths > 1: the destination's share addresses, one per link
    # of the origin (inside node_net, from its top down): the routers route each along
    # the disjoint path that leaves the origin by that link, and along no other.
    share_addresses: dict[tuple[str, str], dict[str, ipaddress.IPv4Address]] = \
        field(default_factory=dict)

    def destinations_of(self, node: str) -> list[str]:
        """The nodes this node originates global key for (it fills its ENC stores)."""
        return [d for o, d in self.pairs if o == node]

    def origins_of(self, node: str) -> list[str]:
        """The nodes whose global key this node receives (its DEC stores)."""
        return [o for o, d in self.pairs if d == node]

    def addresses_at(self, node: str) -> list[ipaddress.IPv4Address]:
        """The share addresses ``node`` holds (it is their pairs' destination)."""
        return [a for (_, d), addrs in self.share_addresses.items() if d == node
                for a in addrs.values()]

    def nodes(self) -> list[str]:
        """The nodes that keep global key with some other node (each needs relay keys)."""
        return sorted({n for pair in self.pairs for n in pair})


@dataclass(frozen=True)
class ApiSpec:
    """Key API settings resolved: worker count, the PKI directory, Status limits (bits)."""

    workers: int
    pki: Path
    key_size: int
    max_key_size: int
    max_key_per_request: int
    max_sae_id_count: int
    graceful_shutdown_s: float
    sae_requests_per_s: float = 0.0
    sae_store_share: float = 1.0
    sae_share_window_s: float = 10.0
    max_connections_per_address: int = 64
    pki_given: bool = False  # named by the file (else made by net up in the run dir)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    id: int
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class Topology:
    path: Path
    name: str
    prefix: str
    ports: Ports
    nodes: dict[str, NodeSpec]
    links: tuple[LinkSpec, ...]
    saes: tuple[Sae, ...]
    dataplane: DataplaneSpec
    node_net: ipaddress.IPv4Network
    gkm: GkmSpec
    api: ApiSpec
    metrics: MetricsSection
    routing: RoutingSection

    def sae_node(self, sae_id: str) -> str | None:
        """The node an SAE is attached to (its KME), None if no such SAE."""
        for s in self.saes:
            if s.id == sae_id:
                return s.node
        return None

    def node(self, name: str) -> NodeSpec:
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(self.nodes)
            raise ConfigError(self.path, [("nodes", f"no node named {name!r} (known: {known})")])\
                from None

    def links_of(self, node: str) -> list[LinkSpec]:
        return [lk for lk in self.links if node in (lk.a, lk.b)]

    def link_between(self, x: str, y: str) -> LinkSpec | None:
        """The first link joining nodes ``x`` and ``y``, if any."""
        return next((lk for lk in self.links if {lk.a, lk.b} == {x, y}), None)

    def link(self, name: str) -> LinkSpec:
        for lk in self.links:
            if lk.name == name:
                return lk
        raise ConfigError(self.path, [("links", f"no link named {name!r}")])


class ConfigError(Exception):
    """A configuration refused whole: every problem with its field path."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.path = Path(path)
        self.problems = problems
        lines = [f"{self.path}: {field}: {msg}" if field else f"{self.path}: {msg}"
                 for field, msg in problems]
        super().__init__("\n".join(lines))


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _pydantic_problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors(include_url=False):
        # Drop pydantic's internal validator names from the location (e.g. 'function-before').
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the config reference in README.md)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        problems.append((_loc(loc), msg))
    return problems


def _cross_check(raw: TopologyFile) -> list[tuple[str, str]]:
    """Checks spanning several fields, each reported at the field to fix."""
    problems: list[tuple[str, str]] = []
    names = [n.name for n in raw.nodes]
    for i, n in enumerate(raw.nodes):
        if names.index(n.name) != i:
            problems.append((f"nodes[{i}].name", f"duplicate node name {n.name!r}"))
    ids = [n.id for n in raw.nodes if n.id is not None]
    for i, n in enumerate(raw.nodes):
        if n.id is not None and ids.count(n.id) > 1:
            problems.append((f"nodes[{i}].id", f"duplicate node id {n.id}"))
    addrs = [n.address for n in raw.nodes if n.address is not None]
    for i, n in enumerate(raw.nodes):
        if n.address is not None:
            if addrs.count(n.address) > 1:
                problems.append((f"nodes[{i}].address", f"duplicate address {n.address}"))
            if n.address not in raw.network.node_net:
                problems.append((f"nodes[{i}].address",
                                 f"{n.address} is outside network.node_net "
                                 f"{raw.network.node_net}"))
    if 4 * len(raw.links) > raw.dataplane.tunnel_net.num_addresses:
        problems.append(("dataplane.tunnel_net", "too small: every link needs a /30"))
    if raw.dataplane.tunnel_net.overlaps(raw.network.node_net):
        problems.append(("dataplane.tunnel_net",
                         f"overlaps network.node_net {raw.network.node_net}"))
    if len(raw.nodes) > raw.network.node_net.num_addresses - 2:
        problems.append(("network.node_net", "too small for the number of nodes"))
    if raw.gkm.paths > 1:
        n = len(raw.nodes)
        degree = {x: sum(x in (lk.a, lk.b) for lk in raw.links) for x in names}
        pairs = [(x, y) for x in names for y in names if x != y] \
            if raw.gkm.pairs == "all" else [p for x, y in raw.gkm.pairs for p in
                                             ((x, y), (y, x))]
        need = sum(degree.get(o, 0) for o, _ in pairs)
        if n + need > raw.network.node_net.num_addresses - 2:
            problems.append(("gkm.paths", f"network.node_net {raw.network.node_net} is too "
                                          f"small for {n} nodes and {need} share addresses "
                                          f"(one per ordered pair and link of its origin)"))
    seen_pairs: dict[frozenset[str], int] = {}
    link_names: dict[str, int] = {}
    all_ul: dict[ipaddress.IPv4Address, str] = {}
    for i, lk in enumerate(raw.links):
        where = f"links[{i}]"
        for end in ("a", "b"):
            if getattr(lk, end) not in names:
                problems.append((f"{where}.{end}",
                                 f"no node named {getattr(lk, end)!r} "
                                 f"(known: {', '.join(names)})"))
        if lk.a == lk.b:
            problems.append((f"{where}.b", "a link needs two different nodes"))
        pair = frozenset((lk.a, lk.b))
        if pair in seen_pairs:
            problems.append((where, f"nodes {lk.a} and {lk.b} are already joined by "
                                    f"links[{seen_pairs[pair]}]"))
        seen_pairs.setdefault(pair, i)
        name = lk.name or f"{lk.a}-{lk.b}"
        if not LINK_NAME_RE.fullmatch(name):
            problems.append((f"{where}.name", "must be 1-17 letters, digits, '_' or '-'"))
        if name in link_names:
            problems.append((f"{where}.name", f"duplicate link name {name!r}"))
        link_names.setdefault(name, i)
        ua, ub = lk.underlay
        for net, name_ in ((raw.network.node_net, "network.node_net"),
                           (raw.dataplane.tunnel_net, "dataplane.tunnel_net")):
            # an end's address, or the whole underlay subnet, inside the OTP network's own
            # (a wide underlay around it, a /8 LAN say, is fine: the more specific wins)
            if ua.ip in net or ub.ip in net or ua.network.subnet_of(net):
                problems.append((f"{where}.underlay",
                                 f"{ua.network} overlaps {name_} {net}: the underlay must be "
                                 f"outside the addresses the OTP network gives out"))
        if ua.network != ub.network:
            problems.append((f"{where}.underlay",
                             f"{ua} and {ub} are not in one subnet"))
        if ua.ip == ub.ip:
            problems.append((f"{where}.underlay", "both ends have the same address"))
        for j, iface in enumerate(lk.underlay):
            if (why := underlay_address_problem(iface)) is not None:
                problems.append((f"{where}.underlay[{j}]", why))
            if iface.ip in all_ul:
                problems.append((f"{where}.underlay[{j}]",
                                 f"{iface.ip} is already used by {all_ul[iface.ip]}"))
            all_ul.setdefault(iface.ip, f"{where}.underlay[{j}]")
        block = _block_size(lk, raw.defaults)
        if isinstance(lk.source, Etsi014Source) and lk.block_size not in (None, block):
            problems.append((f"{where}.block_size",
                             f"{lk.block_size} B, but each enc_keys call of its source gives "
                             f"{block} B (keys_per_call x key_size): leave block_size out"))
        cap = lk.ring_capacity or raw.defaults.ring_capacity
        if cap is not None and cap < block:
            problems.append((f"{where}.ring_capacity",
                             f"{cap} B is smaller than one key block ({block} B)"))
    problems += _rate_floor_problems(raw)
    g = _gkm_sizes(raw)
    if g.high_watermark - g.low_watermark < g.block_size:
        problems.append(("gkm.high_watermark",
                         f"{g.high_watermark} B must be at least one block "
                         f"({g.block_size} B) above gkm.low_watermark ({g.low_watermark} B)"))
    if g.high_watermark < g.block_size:
        problems.append(("gkm.high_watermark",
                         f"{g.high_watermark} B is smaller than one block ({g.block_size} B)"))
    if g.window < g.block_size:
        problems.append(("gkm.window", f"{g.window} B is smaller than one block "
                                       f"({g.block_size} B)"))
    if raw.gkm.pairs != "all":
        seen: set[frozenset[str]] = set()
        for i, (x, y) in enumerate(raw.gkm.pairs):
            for j, n in enumerate((x, y)):
                if n not in names:
                    problems.append((f"gkm.pairs[{i}][{j}]", f"no node named {n!r}"))
            if x == y:
                problems.append((f"gkm.pairs[{i}]", "a pair needs two different nodes"))
            if frozenset((x, y)) in seen:
                problems.append((f"gkm.pairs[{i}]", f"pair {x}, {y} is listed twice"))
            seen.add(frozenset((x, y)))
    sae_ids: set[str] = set()
    for i, s in enumerate(raw.saes):
        if s.node not in names:
            problems.append((f"saes[{i}].node", f"no node named {s.node!r}"))
        if s.id in sae_ids:
            problems.append((f"saes[{i}].id", f"duplicate SAE id {s.id!r}"))
        sae_ids.add(s.id)
    m = raw.metrics
    for other in ("relay", "api"):  # all three listen on the node address
        if m.enabled and m.port == getattr(raw.ports, other):
            problems.append(("metrics.port", f"{m.port} is already ports.{other}"))
    problems += _port_problems(raw)
    if raw.api.key_size > 8 * g.block_size:
        problems.append(("api.key_size", f"{raw.api.key_size} bits do not fit a global key "
                                         f"block (gkm.block_size = {g.block_size} B)"))
    return problems


def _relay_connections(raw: TopologyFile) -> int:
    """The relay's DEALERs in the network: per ordered pair one per path and a control
    one (what its ping period is sized by)."""
    nodes = len(raw.nodes)
    pairs = nodes * (nodes - 1) if raw.gkm.pairs == "all" else 2 * len(raw.gkm.pairs)
    return pairs * (raw.gkm.paths + 1)


def _rate_floor_problems(raw: TopologyFile) -> list[tuple[str, str]]:
    """Every link's key rate at or above what its fixed costs need (sizing.rate_floor),
    reported where the rate is set."""
    out = []
    lsdb, connections = _lsdb_bytes(raw), _relay_connections(raw)
    for i, lk in enumerate(raw.links):
        rate, ratio = _rate(lk, raw.defaults), lk.ratio or raw.defaults.ratio
        if rate <= 0 or 0 in ratio:  # 0: as fast as the source; a 0 side: refused already
            continue
        f = rate_floor(ratio, lsdb, connections)
        if rate >= f.mbps:
            continue
        where = f"links[{i}].key_rate_mbps" if lk.key_rate_mbps is not None \
            else "defaults.key_rate_mbps"
        share = 100 * slower_share(ratio)
        out.append((where, f"{rate:g} Mb/s for link {lk.name or f'{lk.a}-{lk.b}'} is below "
                           f"the {f.mbps:.4g} Mb/s this network needs: at their longest "
                           f"periods its keepalives (every {KEEPALIVE_MAX_S:g} s, with the "
                           f"link-state database: {f.keepalive_bps:.0f} B/s) and the global "
                           f"key relay's pings ({connections} connections every "
                           f"{HEARTBEAT_MAX_S:g} s: {f.ping_bps:.0f} B/s) would take over "
                           f"{MAX_FIXED_SHARE:.0%} of the key of its slower direction "
                           f"({share:.3g} % of the link's), leaving too little for data, "
                           f"or not even enough to stay up (docs/design.md, \"The slowest "
                           f"key rate\"); 0 = as fast as the source"))
    return out


def _rate(lk: Link, d: LinkDefaults) -> float:
    return d.key_rate_mbps if lk.key_rate_mbps is None else lk.key_rate_mbps


def _link_sizes(lk: Link, d: LinkDefaults, chunk: int, lsdb_bytes: int = 0) -> LinkSizes:
    """A link's sizes: those set in the file, the others from its key rate."""
    block = lk.source.block_bytes if isinstance(lk.source, Etsi014Source) \
        else lk.block_size or d.block_size
    return link_sizes(_rate(lk, d), lk.ratio or d.ratio, block,
                      lk.ring_capacity or d.ring_capacity, chunk or None, lsdb_bytes)


def _lsdb_bytes(raw: TopologyFile) -> int:
    return lsdb_estimate([(lk.name or f"{lk.a}-{lk.b}", lk.a, lk.b) for lk in raw.links])


def _block_size(lk: Link, d: LinkDefaults) -> int:
    """A link's key block: a device's answer to one call where the source fixes it."""
    return _link_sizes(lk, d, 0).block_size


def _gkm_sizes(raw: TopologyFile) -> GkmSizes:
    """Global key sizes: those set in the file, the others from the slowest link."""
    limited = [(r, lk) for lk in raw.links if (r := _rate(lk, raw.defaults)) > 0]
    directions = [r * slower_share(lk.ratio or raw.defaults.ratio) for r, lk in limited]
    g = raw.gkm
    return gkm_sizes(min(r for r, _ in limited) if limited else 0.0, g.block_size, g.window,
                     g.low_watermark, g.high_watermark,
                     min(directions) if directions else 0.0,
                     connections=_relay_connections(raw))


def share_addresses(net: ipaddress.IPv4Network, pairs: tuple[tuple[str, str], ...],
                    k: int, taken: set[ipaddress.IPv4Address],
                    links_of: dict[str, list[str]]
                    ) -> dict[tuple[str, str], dict[str, ipaddress.IPv4Address]]:
    """Per ordered pair, an address per link of its origin (``links_of``, in link
    order; none when ``k`` is 1), from the top of ``net`` down, skipping the nodes' own:
    every node resolves the same ones from the same file. A path keeps its address for
    as long as it leaves the origin by the same link, whatever happens to the others.
    Inside node_net, they have its protections (unreachable unless routed, never from
    an underlay)."""
    if k < 2:
        return {}
    top = int(net.broadcast_address) - 1  # counted down without listing a large net
    free = (a for i in range(top, int(net.network_address), -1)
            if (a := ipaddress.IPv4Address(i)) not in taken)
    return {(o, d): {link: next(free) for link in links_of.get(o, [])} for o, d in pairs}


def _resolve(path: Path, raw: TopologyFile) -> Topology:
    d = raw.defaults
    # Nodes without an explicit id or address get the lowest ones nobody asked for.
    taken_ids = {n.id for n in raw.nodes if n.id is not None}
    taken_addrs = {n.address for n in raw.nodes if n.address is not None}
    free_ids = (i for i in range(1, 65536) if i not in taken_ids)
    free_addrs = (a for a in raw.network.node_net.hosts() if a not in taken_addrs)
    nodes: dict[str, NodeSpec] = {}
    for n in raw.nodes:
        nodes[n.name] = NodeSpec(name=n.name, id=n.id or next(free_ids),
                                 address=n.address or next(free_addrs))
    links = []
    lsdb_bytes = _lsdb_bytes(raw)
    for i, lk in enumerate(raw.links):
        key_file = lk.auth_key_file
        if key_file is not None and not key_file.is_absolute():  # made absolute, but no
            key_file = Path(os.path.abspath(path.parent / key_file))  # link followed: the
            # key is then read without following one (link_end.load_link_key)
        sizes = _link_sizes(lk, d, raw.dataplane.chunk_size, lsdb_bytes)
        links.append(LinkSpec(
            index=i, name=lk.name or f"{lk.a}-{lk.b}", a=lk.a, b=lk.b,
            underlay_a=lk.underlay[0], underlay_b=lk.underlay[1],
            key_rate_mbps=_rate(lk, d), block_size=sizes.block_size,
            ring_capacity=sizes.ring_capacity,
            ratio=lk.ratio or d.ratio, source=lk.source, auth_key_file=key_file,
            sizes=sizes, ring_capacity_set_in=f"links[{i}].ring_capacity"
            if lk.ring_capacity is not None else "defaults.ring_capacity"
            if d.ring_capacity is not None else None))
    dp = raw.dataplane
    mtu = dp.mtu or (CONVENTIONAL_MTU if dp.mode == "conventional" else MAX_MTU)
    dataplane = DataplaneSpec(mode=dp.mode, workers=dp.workers or min(os.cpu_count() or 1,
                                                                        MAX_WORKERS),
                              mtu=mtu, chunk_size=dp.chunk_size,
                              key_wait_s=dp.key_wait_ms / 1000, tunnel_net=dp.tunnel_net,
                              guard=dp.guard)
    g = _gkm_sizes(raw)
    if raw.gkm.pairs == "all":
        unordered = [(x, y) for i, x in enumerate(nodes) for y in list(nodes)[i + 1:]]
    else:
        unordered = list(raw.gkm.pairs)
    ordered = tuple(p for x, y in unordered for p in ((x, y), (y, x)))
    keys = raw.gkm.keys
    if keys is None:
        keys = paths.network_dir(raw.network.prefix) / "relay-keys"
    elif not keys.is_absolute():
        keys = (path.parent / keys).resolve()
    gkm = GkmSpec(block_size=g.block_size, low_watermark=g.low_watermark,
                  high_watermark=g.high_watermark, window=g.window, pairs=ordered,
                  keys=keys, paths=raw.gkm.paths, paths_policy=raw.gkm.paths_policy,
                  reserve_ahead_s=raw.gkm.reserve_ahead_s, heartbeat_s=g.heartbeat_s,
                  keys_given=raw.gkm.keys is not None,
                  share_addresses=share_addresses(
                      raw.network.node_net, ordered, raw.gkm.paths,
                      {n.address for n in nodes.values()},
                      {n: [lk.name for lk in links if n in (lk.a, lk.b)] for n in nodes}))
    a = raw.api
    pki = a.pki
    if pki is None:
        pki = paths.network_dir(raw.network.prefix) / "pki"
    elif not pki.is_absolute():
        pki = (path.parent / pki).resolve()
    api = ApiSpec(workers=a.workers or min(os.cpu_count() or 1, MAX_API_WORKERS), pki=pki,
                  key_size=a.key_size,
                  max_key_size=8 * min(MAX_API_KEY_BYTES, g.block_size),
                  max_key_per_request=a.max_key_per_request,
                  max_sae_id_count=a.max_sae_id_count,
                  graceful_shutdown_s=a.graceful_shutdown_s,
                  sae_requests_per_s=a.sae_requests_per_s, sae_store_share=a.sae_store_share,
                  sae_share_window_s=a.sae_share_window_s,
                  max_connections_per_address=a.max_connections_per_address,
                  pki_given=a.pki is not None)
    return Topology(path=path, name=raw.network.name, prefix=raw.network.prefix,
                    ports=raw.ports, nodes=nodes, links=tuple(links), saes=tuple(raw.saes),
                    dataplane=dataplane, node_net=raw.network.node_net, gkm=gkm, api=api,
                    metrics=raw.metrics, routing=raw.routing)


def parse_topology(text: str, path: Path | str = "<string>") -> Topology:
    """Parse and validate TOML text; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [("", f"not valid TOML: {e}")]) from None
    try:
        raw = TopologyFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, _pydantic_problems(e)) from None
    problems = _cross_check(raw)
    if problems:
        raise ConfigError(path, problems)
    return _resolve(path, raw)


def load_topology(path: Path | str) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, a link loop
        raise ConfigError(path, [("", f"cannot read: {e}")]) from None
    return parse_topology(text, path)
