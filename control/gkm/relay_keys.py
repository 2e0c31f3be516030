"""The relay's CURVE keys: one keypair per node, as files in one directory.

Layout (the files ``zmq.auth.create_certificates`` writes, so ZeroMQ's own tools read
them too):

    <dir>/<node>.key_secret   the node's public and secret key (mode 0600)
    <dir>/<node>.key          its public key alone

A node reads its own ``.key_secret`` and the ``.key`` of every node it exchanges global
key with: the destinations it connects to (their key authenticates the server) and the
origins it accepts (their key is their identity). A deployment gives each host its own
secret file and the others' public files; `qkdctl net up` makes them all for an emulated
network. The secret file must be its owner's alone, or it is refused.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from dataplane.private import private_dir, write_private

_FIELD = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([^"]*)"\s*$', re.M)


class RelayKeyError(Exception):
    """A key file missing, malformed or not private: which file, and what to do."""


@dataclass(frozen=True)
class RelayKeys:
    """What one node's key manager needs: its own keypair, its peers' public keys (all
    Z85, 40 characters, as ZeroMQ's socket options take them)."""

    node: str
    public: bytes
    secret: bytes
    peers: dict[str, bytes]

    def raw_peers(self) -> dict[bytes, str]:
        """Each peer's 32-byte public key (what a ZAP request carries) -> its name."""
        return {z85.decode(k): name for name, k in self.peers.items()}


def secret_path(directory: Path, node: str) -> Path:
    return Path(directory) / f"{node}.key_secret"


def public_path(directory: Path, node: str) -> Path:
    return Path(directory) / f"{node}.key"


def certificate(public: bytes, secret: bytes | None) -> bytes:
    """A ZPL certificate as pyzmq writes one (secret: the secret file)."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    kind = "**Secret** Certificate" if secret else "Public Certificate"
    lines = [f"#   ****  Generated on {when} by qkdnet  ****",
             f"#   ZeroMQ CURVE {kind}",
             "#   The global key relay's key of one node (qkdctl keys init).",
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def write_relay_keys(directory: Path, nodes: Iterable[str], force: bool = False
                     ) -> list[str]:
    """A keypair for each node that has no secret file yet (every node with ``force``);
    the directory is made 0700, every file 0600. Returns the nodes given new keys."""
    private_dir(directory)
    made = []
    for node in nodes:
        if secret_path(directory, node).exists() and not force:
            continue
        public, secret = zmq.curve_keypair()
        write_private(secret_path(directory, node), certificate(public, secret))
        write_private(public_path(directory, node), certificate(public, None))
        made.append(node)
    return made


def _fields(path: Path, data: bytes) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for m in _FIELD.finditer(data):
        name, value = m.group(1).decode(), m.group(2)
        if name in found:
            raise RelayKeyError(f"{path}: {name}-key given twice")
        if len(value) != 40:
            raise RelayKeyError(f"{path}: {name}-key is not 40 Z85 characters")
        try:
            z85.decode(value)
        except (ValueError, KeyError, IndexError):
            raise RelayKeyError(f"{path}: {name}-key is not Z85") from None
        found[name] = value
    if "public" not in found:
        raise RelayKeyError(f"{path}: no public-key (write it with 'qkdctl keys init')")
    return found


def _read(path: Path, secret: bool) -> bytes:
    """The file's bytes; a secret file must be a regular file of this user's alone. A
    peer's public key is a trust anchor: whoever could replace it could pose as that peer
    (with a process in its namespace), so it must be a regular file that only this user
    (or root) may write, in a directory only they may write in."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RelayKeyError(f"{path} is missing: make the relay keys with 'qkdctl keys "
                            f"init DIR --config FILE' (net up makes them in emulation)") \
            from None
    except OSError as e:
        raise RelayKeyError(f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if secret and not stat.S_ISREG(st.st_mode):
            raise RelayKeyError(f"{path} is not a regular file")
        if secret and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
            raise RelayKeyError(f"{path} has mode {stat.S_IMODE(st.st_mode):04o} and owner "
                                f"uid {st.st_uid}: a secret key must be this user's alone "
                                f"(chown it to uid {os.geteuid()}, chmod 600 {path})")
        if not secret:
            for what, s in ((path, st), (path.parent, os.stat(path.parent))):
                kind = "regular file" if what == path else "directory"
                if (what == path and not stat.S_ISREG(s.st_mode)) or \
                        s.st_uid not in (os.geteuid(), 0) or s.st_mode & 0o022:
                    raise RelayKeyError(
                        f"{what} (a {kind} of mode {stat.S_IMODE(s.st_mode):04o}, owner uid "
                        f"{s.st_uid}) could be changed by others: a peer's public key must "
                        f"be a regular file that only this user or root may write, in a "
                        f"directory likewise (chmod go-w {what})")
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def load_relay_keys(directory: Path, node: str, peers: Iterable[str]) -> RelayKeys:
    """``node``'s keypair and the public keys of ``peers``; RelayKeyError says which file
    is wrong and how to fix it."""
    path = secret_path(directory, node)
    own = _fields(path, _read(path, secret=True))
    if "secret" not in own:
        raise RelayKeyError(f"{path}: no secret-key")
    if zmq.curve_public(own["secret"]) != own["public"]:
        raise RelayKeyError(f"{path}: the public key does not belong to the secret key")
    theirs = {}
    for peer in sorted(set(peers)):
        p = public_path(directory, peer)
        theirs[peer] = _fields(p, _read(p, secret=False))["public"]
    return RelayKeys(node, own["public"], own["secret"], theirs)
