"""Files and directories a node keeps to itself: key rings, counters, state, stores.

/dev/shm and a state directory may be writable by others, so a name alone proves nothing:
another local user could plant a file (to read the key written into it, or to feed us
positions and process ids), or a symbolic link to a file of ours. Every such file is
opened without following links (``O_NOFOLLOW``), created only if absent (``O_EXCL``), and
checked on the open descriptor (``fstat``, so nothing can be swapped in between): a
regular file, one link, owned by this process's effective uid, and no access for group
or others. Anything else is refused with a message that says what to do.

Node processes also start with umask 077, so whatever else they create (RocksDB files,
sockets, status files) is theirs alone (:func:`private_umask`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

PRIVATE_UMASK = 0o077


class NotPrivateError(OSError):
    """A file or directory that is not this process's own; refused, nothing written."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message alone, without "[Errno N]"


def _why_not_private(st: os.stat_result, want_dir: bool) -> str | None:
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        return f"is not a {'directory' if want_dir else 'regular file'}"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this process's uid {os.geteuid()}"
    if not want_dir and st.st_nlink != 1:
        return f"has {st.st_nlink} hard links"
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o} (group or others have access)"
    return None


def check_private_fd(fd: int, path: Path | str) -> None:
    """Refuse an open file that is not ours alone (NotPrivateError)."""
    why = _why_not_private(os.fstat(fd), want_dir=False)
    if why is not None:
        raise NotPrivateError(errno.EPERM, f"refusing {path}: it {why}; it was not made by "
                                           f"this node (planted by another user?): remove "
                                           f"it if it is stale")


def _open_no_link(path: Path | str, flags: int, what: str, fix: str) -> int:
    """``os.open`` never through a symbolic link at ``path`` (NotPrivateError saying
    ``fix``); any other OSError, FileNotFoundError too, as it comes."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotPrivateError(errno.ELOOP, f"refusing {what}: it is a symbolic link; "
                                               f"{fix}") from None
        raise


def open_private(path: Path | str, create: bool = False) -> int:
    """A descriptor (read-write) on a file of ours. ``create``: make it if it does not
    exist (exclusively: a file that appears meanwhile is opened and checked like any
    other). Raises FileNotFoundError if absent and not ``create``; NotPrivateError for a
    symbolic link or a file that is not ours alone."""
    base = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        if create:
            try:
                return os.open(path, base | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
        try:
            fd = _open_no_link(path, base, f"{path}", "remove it")
        except FileNotFoundError:
            if create:
                continue  # removed between the two opens: create it
            raise
        try:
            check_private_fd(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise NotPrivateError(errno.EAGAIN, f"{path} keeps appearing and disappearing")


def private_dir(path: Path | str) -> Path:
    """Make ``path`` (and missing parents) a directory of ours with mode 0700. An existing
    one of ours that others may only read is narrowed to 0700; a symbolic link, a
    directory of another user, or one others may write in (they could replace what we
    put there) is refused (NotPrivateError), and left as it is."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise NotPrivateError(errno.ELOOP, f"refusing directory {p}: it is a symbolic link")
    why = _why_not_private(st, want_dir=True)
    if why is not None and why.startswith("has mode") and not st.st_mode & 0o022:
        os.chmod(p, 0o700, follow_symlinks=False)
    elif why is not None:
        extra = " and others may write in it" if st.st_mode & 0o022 else ""
        raise NotPrivateError(errno.EPERM, f"refusing directory {p}: it {why}{extra}; "
                                           f"use a directory of this user with mode 0700")
    return p


@contextlib.contextmanager
def secret_file(path: Path | str, what: str) -> Iterator[str]:
    """A secret the operator provides (a private key of the node's) checked and held open:
    a regular file of this user's alone, never reached through a symbolic link. Yields a
    path to the checked descriptor (``/proc/self/fd/N``) for libraries that load from a
    path, so what they read is what was checked. NotPrivateError says what to do."""
    fd = _open_no_link(path, os.O_RDONLY | os.O_CLOEXEC, f"{what} {path}",
                       "name the file itself")
    try:
        st = os.fstat(fd)
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "is not a regular file"
        elif st.st_uid != os.geteuid() or st.st_mode & 0o077:
            why = (f"has mode {stat.S_IMODE(st.st_mode):04o} and owner uid {st.st_uid}: a "
                   f"secret must be this user's alone (chown it to uid {os.geteuid()}, "
                   f"chmod 600 {path})")
        if why is not None:
            raise NotPrivateError(errno.EPERM, f"refusing {what} {path}: it {why}")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def check_trusted(path: Path | str, what: str) -> None:
    """A file that decides whom the node trusts (a CA certificate, an SSH host key list):
    others may read it, but only its owner, this user or root, may write it, or whoever
    could would choose whom the node trusts. NotPrivateError says what to do."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotPrivateError(errno.EPERM, f"refusing {what} {path}: not a regular file")
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        fix = f"chmod go-w {path}" if st.st_uid in (os.geteuid(), 0) else \
            f"chown it to uid {os.geteuid()} or root, chmod go-w {path}"
        raise NotPrivateError(errno.EPERM, f"refusing {what} {path}: it has mode "
                                           f"{stat.S_IMODE(st.st_mode):04o} and owner uid "
                                           f"{st.st_uid}: only its owner, this user or "
                                           f"root, may write it ({fix})")


def write_private(path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` whole and atomically with ``data`` (temporary file, then rename),
    never writing through a link planted at either name."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crashed process with our pid, or a planted link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode & 0o600)
    try:
        os.fchmod(fd, mode)  # the mode asked, whatever the umask (made owner-only first)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, p)


def set_private_umask() -> int:
    """Files and directories this process makes from now on are its owner's alone;
    returns the previous umask."""
    return os.umask(PRIVATE_UMASK)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """umask 077 for the duration (the umask is per process: threads share it)."""
    old = set_private_umask()
    try:
        yield
    finally:
        os.umask(old)
