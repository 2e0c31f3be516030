"""Key files fetched over SSH/SFTP from a link end's own QKD device, as in the paper.

Both devices of a link write the same key files: same names, same bytes. A file is named
``<epoch>-<seq>.key`` (decimal, no leading zeros, each below 2**64) and carries block
``(epoch, seq)``; blocks are fetched in numeric ``(epoch, seq)`` order. A device writes a
file under another name and renames it into place when it is complete, so a listed
``.key`` file is whole. Each end:

1. lists its device's directory and plans the files to fetch (:func:`plan_fetch`, pure):
   in order, after the last block delivered, of a size the link takes;
2. reads one file whole into memory (a partial read is discarded, the file stays and is
   fetched again later);
3. removes it from the device, and only once the removal is confirmed hands the block to
   the key manager: a restart can lose a block but never deliver one twice.

All SSH work, connecting included, runs in :class:`~control.lkm.source.FetchingSource`'s
thread, so a device that does not answer never stalls the key manager's loop. A lost
connection is reported to the key manager, which keeps running on stored key; reconnects
back off from 1 s to 30 s (:class:`Backoff`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import stat
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from control.lkm.source import Block, FetchingSource, SourceUnavailable
from dataplane.private import check_trusted, secret_file

if TYPE_CHECKING:
    import paramiko

    from control.core.config import SftpEnd

log = logging.getLogger("qkdnet.keysource.sftp")

KEY_NAME_RE = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})\.key")
MAX_ID = (1 << 64) - 1          # epoch and seq travel as u64 in the agreement messages
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 10.0             # a device silent this long mid-transfer is given up
KEEPALIVE_S = 5
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0

BlockId = tuple[int, int]


def parse_key_name(name: str) -> BlockId | None:
    """``"7-42.key"`` -> ``(7, 42)``; None for any other name (not a key file)."""
    m = KEY_NAME_RE.fullmatch(name)
    if not m:
        return None
    epoch, seq = int(m.group(1)), int(m.group(2))
    if epoch > MAX_ID or seq > MAX_ID:
        return None
    return epoch, seq


def key_name(block: BlockId) -> str:
    """The file name of block ``(epoch, seq)`` (what a device writes)."""
    return f"{block[0]}-{block[1]}.key"


@dataclass(frozen=True)
class Entry:
    """One directory entry as listed: name, size, whether it is a regular file."""

    name: str
    size: int
    regular: bool = True


@dataclass(frozen=True)
class Plan:
    """What to do with a listing: fetch these in order, refuse (leave) those, drop stale."""

    fetch: list[tuple[BlockId, Entry]]
    refused: list[tuple[Entry, str]]
    stale: list[tuple[BlockId, Entry]]


def plan_fetch(entries: list[Entry], after: BlockId | None, max_size: int) -> Plan:
    """Order a listing: key files in ``(epoch, seq)`` order; other names are ignored.

    A key file at or before ``after`` (the last block delivered) is stale: delivering it
    would break the in-order promise the agreement relies on, so it is dropped. A key file
    whose size is not ``max_size`` (the link's block size: both ends must store blocks of
    one length) or that is not a regular file is refused: left on the
    device, never delivered.
    """
    fetch: list[tuple[BlockId, Entry]] = []
    refused: list[tuple[Entry, str]] = []
    stale: list[tuple[BlockId, Entry]] = []
    for e in entries:
        block = parse_key_name(e.name)
        if block is None:
            continue
        if not e.regular:
            refused.append((e, "not a regular file"))
        elif e.size == 0:
            refused.append((e, "empty"))
        elif e.size != max_size:  # the two ends must store blocks of one length
            refused.append((e, f"{e.size} B, not the link's block size ({max_size} B)"))
        elif after is not None and block <= after:
            stale.append((block, e))
        else:
            fetch.append((block, e))
    fetch.sort(key=lambda t: t[0])
    stale.sort(key=lambda t: t[0])
    return Plan(fetch, refused, stale)


class Backoff:
    """Delay before the next connection attempt: doubles per failure, reset by success."""

    def __init__(self, first: float = BACKOFF_FIRST_S, limit: float = BACKOFF_MAX_S):
        self.first, self.limit = first, limit
        self.delay = 0.0
        self.next_try = 0.0

    def failed(self, now: float) -> None:
        self.delay = min(self.limit, self.delay * 2 if self.delay else self.first)
        self.next_try = now + self.delay

    def succeeded(self) -> None:
        self.delay = 0.0
        self.next_try = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.next_try


class SftpSource(FetchingSource):
    """A link end's key source: its QKD device's key directory over SFTP (paramiko)."""

    def __init__(self, end: SftpEnd, max_size: int, base_dir: Path, poll_s: float):
        self.end = end
        super().__init__(f"sftp {end.user}@{end.host}:{end.port}:{end.directory}")
        self.max_size = max_size
        self.key_file = _resolve(end.key_file, base_dir)
        self.known_hosts = _resolve(end.known_hosts, base_dir) if end.known_hosts else None
        self.idle_s = poll_s
        self.backoff = Backoff()
        self._last_error = ""
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._todo: deque[tuple[BlockId, Entry]] = deque()
        self._after: BlockId | None = None  # last block delivered by this process
        self._warned: set[str] = set()

    # -- FetchingSource hooks -------------------------------------------------------------
    def connect(self) -> None:
        """Called by the key manager's loop: never blocks. The SSH connection is made by
        the fetching thread; after a failure this refuses until the backoff delay ends."""
        if not self.backoff.ready(time.monotonic()):
            # Same message as the failure that set the delay, so the manager logs it once.
            raise SourceUnavailable(self._last_error)
        self._todo.clear()

    def fetch(self) -> list[Block]:
        try:
            blocks = self._fetch()
        except SourceUnavailable as e:
            self._last_error = str(e)
            self.backoff.failed(time.monotonic())
            raise
        self.backoff.succeeded()
        return blocks

    def _fetch(self) -> list[Block]:
        if self._sftp is None:
            try:
                self._connect()
            except SourceUnavailable:
                self.disconnect()
                raise
        if not self._todo:
            self._todo.extend(self._list())
            if not self._todo:
                return []
        block, entry = self._todo.popleft()
        data = self._read_whole(entry)
        if data is None:  # changed under us: list again later
            self._todo.clear()
            return []
        try:
            self._remove(entry.name, "after fetching it")
        except SourceUnavailable:
            _wipe(data)
            raise
        self._after = block
        return [(block, data)]

    def disconnect(self) -> None:
        for closable in (self._sftp, self._client):
            if closable is not None:
                with contextlib.suppress(Exception):  # closing a dead connection
                    closable.close()
        self._sftp = None
        self._client = None

    # -- the SSH side -------------------------------------------------------------------
    def _connect(self) -> None:
        import paramiko

        e = self.end
        where = f"{e.user}@{e.host}:{e.port}"
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            if self.known_hosts is not None:
                check_trusted(self.known_hosts, "known hosts file")  # whom we believe
                client.load_host_keys(str(self.known_hosts))
            else:
                kind, b64 = e.host_key.split()[:2]  # type: ignore[union-attr]
                client.get_host_keys().add(_host_entry(e.host, e.port), kind,
                                           paramiko.PKey.from_type_string(kind,
                                                                          _b64(b64)))
        except (OSError, paramiko.SSHException, ValueError) as err:
            raise SourceUnavailable(f"known hosts {self.known_hosts}: {err}") from None
        pkey = load_client_key(self.key_file)
        try:
            client.connect(e.host, e.port, username=e.user, pkey=pkey,
                           look_for_keys=False, allow_agent=False,
                           timeout=CONNECT_TIMEOUT_S, banner_timeout=CONNECT_TIMEOUT_S,
                           auth_timeout=CONNECT_TIMEOUT_S)
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(KEEPALIVE_S)
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(IO_TIMEOUT_S)
        except paramiko.BadHostKeyException:
            client.close()
            raise SourceUnavailable(f"device {where} presented a host key that does not "
                                    f"match the configured one") from None
        except paramiko.AuthenticationException as err:
            client.close()
            raise SourceUnavailable(f"device {where} refused the key {self.key_file}: "
                                    f"{err}") from None
        except paramiko.SSHException as err:  # includes an unknown host key
            client.close()
            raise SourceUnavailable(f"device {where}: {err}") from None
        except OSError as err:
            client.close()
            raise SourceUnavailable(f"cannot reach device {where}: {err}") from None
        except Exception as err:  # noqa: BLE001 - e.g. EOFError mid-handshake
            client.close()
            raise SourceUnavailable(f"device {where}: {_why(err)}") from None
        self._client, self._sftp = client, sftp
        try:
            sftp.chdir(e.directory)
        except OSError as err:
            raise SourceUnavailable(f"device {where}: directory {e.directory}: "
                                    f"{err}") from None

    def _list(self) -> list[tuple[BlockId, Entry]]:
        assert self._sftp is not None
        try:
            attrs = self._sftp.listdir_attr(".")
        except Exception as err:  # noqa: BLE001 - any failure: the connection is gone
            raise SourceUnavailable(f"listing {self.end.directory}: {_why(err)}") from None
        entries = [Entry(a.filename, a.st_size or 0,
                         a.st_mode is not None and stat.S_ISREG(a.st_mode)) for a in attrs]
        plan = plan_fetch(entries, self._after, self.max_size)
        for entry, why in plan.refused:
            if entry.name not in self._warned:
                self._warned.add(entry.name)
                log.warning("%s: refused key file %s (%s); left on the device",
                            self.description, entry.name, why)
        for _block, entry in plan.stale:
            # Behind a block already delivered: the agreement has moved on. It is
            # removed (a lost block) so it can never be delivered late.
            log.warning("%s: key file %s came after later blocks; removed unused",
                        self.description, entry.name)
            self._remove(entry.name, "arrived out of order")
        return plan.fetch

    def _read_whole(self, entry: Entry) -> bytearray | None:
        """The file's bytes, all of them, or None if it is not the size it was listed at.
        A failure mid-transfer raises; whatever was read is dropped."""
        assert self._sftp is not None
        buf = bytearray(entry.size)
        try:
            with self._sftp.open(entry.name, "rb") as f:
                f.prefetch(entry.size)
                got = f.readinto(buf)
                extra = f.read(1)
        except FileNotFoundError:
            return None
        except Exception as err:  # noqa: BLE001 - a partial read is discarded whole
            _wipe(buf)
            raise SourceUnavailable(f"fetching {entry.name}: {_why(err)}") from None
        if got != entry.size or extra:
            _wipe(buf)
            log.warning("%s: key file %s changed size while read; fetched again later",
                        self.description, entry.name)
            return None
        return buf

    def _remove(self, name: str, why: str) -> None:
        assert self._sftp is not None
        try:
            self._sftp.remove(name)
        except Exception as err:  # noqa: BLE001 - not removed: the block is not delivered
            raise SourceUnavailable(f"removing {name} {why}: {_why(err)}") from None


def _resolve(p: Path, base_dir: Path) -> Path:
    return p if p.is_absolute() else (base_dir / p)


def load_client_key(key_file: Path) -> paramiko.PKey:
    """The node's SSH key (read only if it is the node's alone: ``secret_file``) and its
    certificate ``<key>-cert.pub`` where there is one (from_path would look for it beside
    the checked descriptor's path instead); SourceUnavailable says what is wrong."""
    import paramiko

    try:
        with secret_file(key_file, "SSH private key") as checked:
            pkey = paramiko.PKey.from_path(checked)
        cert = Path(f"{key_file}-cert.pub")
        if cert.exists():
            check_trusted(cert, "SSH certificate")
            pkey.load_certificate(str(cert))
        return pkey
    except FileNotFoundError:
        raise SourceUnavailable(f"private key file {key_file} not found") from None
    except paramiko.PasswordRequiredException:
        raise SourceUnavailable(f"private key file {key_file} is encrypted; "
                                f"use a key without a passphrase") from None
    except (OSError, paramiko.SSHException, ValueError) as err:
        raise SourceUnavailable(f"private key file {key_file}: {err}") from None


def _host_entry(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _b64(s: str) -> bytes:
    import base64
    return base64.b64decode(s, validate=True)


def _why(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))
